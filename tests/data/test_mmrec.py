import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch

from crane_pyg.data import (ITEM, ITEM_USER, USER, USER_ITEM, DataFormatError,
                            load_mmrec)
from conftest import require_dataset

HEADER = 'userID\titemID\trating\ttimestamp\tx_label'

# A valid toy dataset: 3 users, 4 items.  Written unsorted on purpose.
TOY_ROWS = [
    (1, 3, 0), (0, 2, 0), (0, 0, 0), (1, 1, 0), (2, 3, 0), (2, 0, 0),
    (0, 1, 1), (1, 0, 1), (2, 2, 1),
    (0, 3, 2), (1, 2, 2), (2, 1, 2),
]


def write_dataset(root: Path, name: str = 'toy', rows: Sequence = TOY_ROWS,
                  header: str = HEADER, lines: Optional[Sequence[str]] = None,
                  features: Optional[Dict[str, np.ndarray]] = None,
                  newline: str = '\n') -> Path:
    """Writes ``root/name/name.inter`` (from ``rows`` (user, item, x_label) or raw
    ``lines``) and ``<m>_feat.npy`` files; returns the folder."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if lines is None:
        lines = [f'{u}\t{i}\t1\t0\t{x}' for u, i, x in rows]
    (folder / f'{name}.inter').write_text(newline.join([header, *lines]) + newline)
    for modality, array in (features or {}).items():
        np.save(folder / f'{modality}_feat.npy', array)
    return folder


def toy_features(num_items: int = 4) -> Dict[str, np.ndarray]:
    return {
        'text': np.arange(num_items * 3, dtype=np.float32).reshape(num_items, 3),
        'image': -np.arange(num_items * 2, dtype=np.float64).reshape(num_items, 2),
    }


def expect_error(folder: Path, *fragments: str, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        load_mmrec(folder, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'
    return info.value


# valid input #################################################################

def test_toy_schema_exact(tmp_path):
    folder = write_dataset(tmp_path, features=toy_features())
    data = load_mmrec(folder)

    assert data.name == 'toy'
    assert data.modalities == ['image', 'text']
    assert data[USER].num_nodes == 3 and data[ITEM].num_nodes == 4
    train = data[USER_ITEM].edge_index
    assert train.dtype == torch.long
    assert train.tolist() == [[0, 0, 1, 1, 2, 2], [0, 2, 1, 3, 0, 3]]
    assert torch.equal(data[ITEM_USER].edge_index, train.flip(0))
    assert data[USER_ITEM].val_edge_index.tolist() == [[0, 1, 2], [1, 0, 2]]
    assert data[USER_ITEM].test_edge_index.tolist() == [[0, 1, 2], [3, 2, 1]]
    assert data[USER].has_train.dtype == torch.bool
    assert data[USER].has_train.tolist() == [True, True, True]
    assert data[ITEM]['text'].dtype == torch.float32
    assert torch.equal(data[ITEM]['text'], torch.arange(12.).view(4, 3))
    assert data[ITEM]['image'].dtype == torch.float32  # float64 file, converted
    assert torch.equal(data[ITEM]['image'], -torch.arange(8.).view(4, 2))
    assert set(data.edge_types) == {USER_ITEM, ITEM_USER}


def test_name_argument_and_no_modalities(tmp_path):
    write_dataset(tmp_path, name='other')
    data = load_mmrec(tmp_path, 'other')
    assert data.name == 'other'
    assert data.modalities == []
    assert data[USER_ITEM].edge_index.size(1) == 6


def test_columns_by_name_extra_columns_and_crlf(tmp_path):
    header = 'x_label\tcomment\titemID\ttimestamp\tuserID\trating'
    lines = [f'{x}\tsome text\t{i}\t17\t{u}\t4.5' for u, i, x in TOY_ROWS]
    folder = write_dataset(tmp_path, header=header, lines=lines, newline='\r\n')
    data = load_mmrec(folder)
    assert data[USER_ITEM].edge_index.tolist() == [[0, 0, 1, 1, 2, 2], [0, 2, 1, 3, 0, 3]]
    assert data[USER_ITEM].test_edge_index.tolist() == [[0, 1, 2], [3, 2, 1]]


def test_users_without_train_kept_and_warned(tmp_path):
    # user 3 only has valid/test interactions
    rows = TOY_ROWS + [(3, 0, 1), (3, 1, 2)]
    folder = write_dataset(tmp_path, rows=rows)
    with pytest.warns(UserWarning, match=r'1 users have no training interaction \(userID 3\)'):
        data = load_mmrec(folder)
    assert data[USER].num_nodes == 4
    assert data[USER].has_train.tolist() == [True, True, True, False]
    assert data[USER_ITEM].val_edge_index[:, -1].tolist() == [3, 0]


def test_duplicates_dropped_with_warning(tmp_path):
    rows = TOY_ROWS[:3] + [(0, 2, 0)] + TOY_ROWS[3:] + [(0, 0, 0)]
    folder = write_dataset(tmp_path, rows=rows)
    with pytest.warns(UserWarning) as record:
        data = load_mmrec(folder)
    message = str(record[0].message)
    assert 'toy.inter' in message and 'dropped 2 duplicate' in message
    assert 'first duplicate is line 5' in message and 'as on line 3' in message
    assert data[USER_ITEM].edge_index.tolist() == [[0, 0, 1, 1, 2, 2], [0, 2, 1, 3, 0, 3]]


def test_no_warning_on_clean_data(tmp_path):
    folder = write_dataset(tmp_path, features=toy_features())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_mmrec(folder)


# malformed input: one test per fault ###########################################

def test_missing_folder(tmp_path):
    expect_error(tmp_path / 'nope', 'nope', 'dataset folder does not exist')


def test_missing_inter_file(tmp_path):
    folder = write_dataset(tmp_path)
    (folder / 'toy.inter').rename(folder / 'wrong.inter')
    expect_error(folder, "'toy.inter' not found", "found ['wrong.inter']")


def test_misspelled_header_column(tmp_path):
    folder = write_dataset(tmp_path, header='userID\titemId\trating\ttimestamp\tx_label')
    err = expect_error(folder, 'toy.inter', 'line 1', "missing column(s) 'itemID'",
                       "found 'userID' 'itemId'")
    assert err.line == 1 and err.path.endswith('toy.inter')


def test_missing_header_column(tmp_path):
    folder = write_dataset(tmp_path, header='userID\titemID\trating\ttimestamp',
                           lines=[f'{u}\t{i}\t1\t0' for u, i, _ in TOY_ROWS])
    expect_error(folder, 'toy.inter', 'line 1', "missing column(s) 'x_label'")


def test_space_separated_header(tmp_path):
    folder = write_dataset(tmp_path, header='userID itemID rating timestamp x_label')
    expect_error(folder, 'toy.inter', 'line 1', 'must be tab-separated')


def test_wrong_number_of_fields(tmp_path):
    lines = [f'{u}\t{i}\t1\t0\t{x}' for u, i, x in TOY_ROWS]
    lines[3] = '1\t1\t1\t0'
    folder = write_dataset(tmp_path, lines=lines)
    err = expect_error(folder, 'toy.inter', 'line 5', 'expected 5 tab-separated fields',
                       'found 4')
    assert err.line == 5


def test_empty_line_in_the_middle(tmp_path):
    lines = [f'{u}\t{i}\t1\t0\t{x}' for u, i, x in TOY_ROWS]
    lines.insert(2, '')
    folder = write_dataset(tmp_path, lines=lines)
    expect_error(folder, 'toy.inter', 'line 4', 'found 1 in an empty line')


@pytest.mark.parametrize('token,column', [('1.5', 'itemID'), ('abc', 'itemID'),
                                          ('', 'userID'), ('x', 'x_label')])
def test_non_integer_field(tmp_path, token, column):
    lines = [f'{u}\t{i}\t1\t0\t{x}' for u, i, x in TOY_ROWS]
    fields = lines[6].split('\t')
    fields[{'userID': 0, 'itemID': 1, 'x_label': 4}[column]] = token
    lines[6] = '\t'.join(fields)
    folder = write_dataset(tmp_path, lines=lines)
    expect_error(folder, 'toy.inter', 'line 8', f'{column} is {token!r}, not an integer')


def test_negative_id(tmp_path):
    rows = list(TOY_ROWS)
    rows[4] = (-1, 3, 0)
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', 'line 6', 'userID is -1', 'non-negative')


def test_x_label_out_of_range(tmp_path):
    rows = list(TOY_ROWS)
    rows[7] = (1, 0, 3)
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', 'line 9', 'x_label is 3')


def test_non_contiguous_item_ids(tmp_path):
    rows = [(u, 7 if i == 2 else i, x) for u, i, x in TOY_ROWS]  # item 2 -> 7
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', 'itemID 2 never occurs', 'largest itemID is 7',
                 '(4 missing)')


def test_non_contiguous_user_ids_huge_id(tmp_path):
    rows = [(10**12 if u == 1 else u, i, x) for u, i, x in TOY_ROWS]
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', 'userID 1 never occurs')


def test_duplicates_error_mode(tmp_path):
    rows = TOY_ROWS + [(2, 0, 0)]
    folder = write_dataset(tmp_path, rows=rows)
    err = expect_error(folder, 'toy.inter', 'line 14', 'duplicate (user, item) pair',
                       'userID 2, itemID 0', 'already occurs on line 7', duplicates='error')
    assert err.line == 14


def test_pair_in_two_splits(tmp_path):
    rows = TOY_ROWS + [(0, 2, 2)]  # (0, 2) is a train pair
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', 'line 14', 'userID 0, itemID 2 is in the test split',
                 'train split on line 3', 'one split only')


@pytest.mark.parametrize('label,split', [(0, 'train'), (1, 'valid'), (2, 'test')])
def test_empty_split(tmp_path, label, split):
    rows = [(u, i, x) for u, i, x in TOY_ROWS if x != label]
    rows += [(0, 0, (label + 1) % 3)] if label == 0 else []  # keep ids contiguous
    rows = list(dict(((u, i), (u, i, x)) for u, i, x in rows).values())
    folder = write_dataset(tmp_path, rows=rows)
    expect_error(folder, 'toy.inter', f'the {split} split (x_label={label}) is empty')


def test_header_only(tmp_path):
    folder = write_dataset(tmp_path, lines=[])
    expect_error(folder, 'toy.inter', 'no interactions')


def test_feature_row_count_mismatch(tmp_path):
    folder = write_dataset(tmp_path, features={'image': np.zeros((5, 2), np.float32)})
    expect_error(folder, 'image_feat.npy', 'has 5 rows', '4 items')


def test_feature_not_2d(tmp_path):
    folder = write_dataset(tmp_path, features={'image': np.zeros(4, np.float32)})
    expect_error(folder, 'image_feat.npy', '2-D', 'shape (4,)')


def test_feature_not_floating(tmp_path):
    folder = write_dataset(tmp_path, features={'audio': np.zeros((4, 2), np.int64)})
    expect_error(folder, 'audio_feat.npy', 'floating point', 'int64')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_feature_nan_or_inf(tmp_path, bad):
    array = np.ones((4, 3), np.float32)
    array[2, 1] = bad
    array[3, 0] = bad
    folder = write_dataset(tmp_path, features={'text': array})
    err = expect_error(folder, 'text_feat.npy', 'row 2', 'NaN or Inf', 'in 2 row(s)')
    assert err.row == 2


def test_feature_float64_overflowing_float32(tmp_path):
    array = np.ones((4, 3), np.float64)
    array[1, 2] = 1e300
    folder = write_dataset(tmp_path, features={'text': array})
    expect_error(folder, 'text_feat.npy', 'row 1', 'NaN or Inf')


def test_feature_large_finite_values_are_fine(tmp_path):
    array = np.full((4, 3), 3e38, np.float32)  # row sums overflow float32, not float64
    data = load_mmrec(write_dataset(tmp_path, features={'text': array}))
    assert torch.equal(data[ITEM]['text'], torch.full((4, 3), 3e38))


def test_feature_unreadable(tmp_path):
    folder = write_dataset(tmp_path)
    (folder / 'image_feat.npy').write_bytes(b'not a numpy file')
    expect_error(folder, 'image_feat.npy', 'cannot be read')


def test_feature_file_that_is_a_directory(tmp_path):
    folder = write_dataset(tmp_path, features=toy_features())
    (folder / 'image_feat.npy').unlink()
    (folder / 'image_feat.npy').mkdir()
    expect_error(folder, 'image_feat.npy', 'is a directory')


def _long_file_lines(num_lines: int = 150):
    """Valid data lines for 3 users x 50 items, every split non-empty."""
    rows = [(u, i, (u + i) % 3) for u in range(3) for i in range(num_lines // 3)]
    return [f'{u}\t{i}\t1\t0\t{x}' for u, i, x in rows]


@pytest.mark.parametrize('line, shown', [
    (b'2_0\t3\t1\t0\t0', "userID is '2_0'"),       # int() reads it as 20, NumPy does not
    (b'2\t3\t\xff\t0\t0', "byte 0xff at position 5 (column 'rating') is not UTF-8"),
    (b'2\t\xd9\xa3\t1\t0\t0', "itemID is '\u0663'"),  # an Arabic-Indic digit 3
])
def test_bad_token_is_reported_on_its_own_line(tmp_path, line, shown):
    """A fault on line 102 is reported on line 102 with its value, not as an
    empty userID on the line after the last one (the diagnosis used to accept
    what int() accepts and then trip on the text after the final newline)."""
    lines = _long_file_lines()
    folder = write_dataset(tmp_path, lines=lines)
    inter = folder / 'toy.inter'
    data = inter.read_bytes().split(b'\n')
    data[101] = line  # line 102 of the file (the header is line 1)
    inter.write_bytes(b'\n'.join(data))
    err = expect_error(folder, 'toy.inter', 'line 102', shown)
    assert err.line == 102 and f'line {len(lines) + 2}' not in str(err)


def test_bad_duplicates_argument(tmp_path):
    with pytest.raises(ValueError, match="'duplicates'"):
        load_mmrec(write_dataset(tmp_path), duplicates='keep')


# real data ####################################################################

def check_real(data, users, items, counts):
    train, val, test = (data[USER_ITEM][k] for k in
                        ('edge_index', 'val_edge_index', 'test_edge_index'))
    assert data[USER].num_nodes == users and data[ITEM].num_nodes == items
    assert (train.size(1), val.size(1), test.size(1)) == counts
    for edges in (train, val, test):
        key = edges[0] * items + edges[1]
        assert bool((key[1:] > key[:-1]).all())  # sorted by (user, item), unique
    all_keys = torch.cat([e[0] * items + e[1] for e in (train, val, test)])
    assert all_keys.unique().numel() == sum(counts)  # splits disjoint
    assert torch.equal(data[ITEM_USER].edge_index, train.flip(0))


@pytest.mark.realdata
def test_tiktok():
    path = require_dataset('tiktok')
    with pytest.warns(UserWarning, match='10 users have no training interaction'):
        data = load_mmrec(path)
    assert data.name == 'tiktok'
    check_real(data, 9308, 6710, (59541, 3051, 6130))
    assert data.modalities == ['audio', 'image']
    for m in data.modalities:
        assert data[ITEM][m].shape == (6710, 128) and data[ITEM][m].dtype == torch.float32
    assert int((~data[USER].has_train).sum()) == 10
    assert torch.nonzero(~data[USER].has_train).flatten().tolist() == [
        288, 3045, 4371, 5457, 6469, 6534, 7821, 7840, 9001, 9178]


@pytest.mark.realdata
@pytest.mark.parametrize('name,users,items,counts', [
    ('baby-cf', 19445, 7050, (118551, 20559, 21682)),
    ('sports-cf', 35598, 18357, (218409, 37899, 40029)),
])
def test_amazon(name, users, items, counts):
    path = require_dataset(name)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        data = load_mmrec(path.parent, name)
    check_real(data, users, items, counts)
    assert data.modalities == []
    assert bool(data[USER].has_train.all())
