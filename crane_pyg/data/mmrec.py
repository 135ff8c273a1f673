r"""Loader for datasets in the `MMRec <https://github.com/enoche/MMRec>`_ format.

A dataset is a folder ``<name>/`` holding

* ``<name>.inter``: tab-separated interactions with the header
  ``userID  itemID  rating  timestamp  x_label``; ids are 0-based and
  contiguous, ``x_label`` is 0 (train), 1 (valid) or 2 (test);
* one ``<modality>_feat.npy`` per item modality (e.g. ``image_feat.npy``,
  ``text_feat.npy``): a floating-point matrix ``[num_items, d_m]`` whose row
  ``i`` describes item ``i``.  Interaction-only datasets have none.

:func:`load_mmrec` reads and validates such a folder into the
:class:`~torch_geometric.data.HeteroData` schema of ``docs/ARCHITECTURE.md``.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from .errors import DataFormatError
from .schema import ITEM, ITEM_USER, USER, USER_ITEM

__all__ = ['load_mmrec', 'INTER_COLUMNS', 'FEATURE_SUFFIX', 'SPLIT_NAMES']

#: the columns every ``.inter`` header must name
INTER_COLUMNS: Tuple[str, ...] = ('userID', 'itemID', 'rating', 'timestamp', 'x_label')
#: file-name suffix of a modality feature matrix: ``<modality>_feat.npy``
FEATURE_SUFFIX = '_feat.npy'
#: split names, indexed by ``x_label``
SPLIT_NAMES: Tuple[str, ...] = ('train', 'valid', 'test')

_PARSED_COLUMNS = ('userID', 'itemID', 'x_label')
_RESERVED_MODALITIES = frozenset({'num_nodes'})

PathLike = Union[str, os.PathLike]


def load_mmrec(
    root: PathLike,
    name: Optional[str] = None,
    *,
    duplicates: Literal['drop', 'error'] = 'drop',
) -> HeteroData:
    r"""Loads an MMRec-format dataset folder as a
    :class:`~torch_geometric.data.HeteroData` object.

    The folder is ``root/name`` or, when :obj:`name` is :obj:`None`, :obj:`root`
    itself (the dataset name is then the folder's basename).  With
    :math:`U = 1 + \max(\text{userID})` users, :math:`I = 1 + \max(\text{itemID})`
    items and :math:`E_s` interactions in split :math:`s`, the result holds

    * ``data.name`` (:obj:`str`) and ``data.modalities`` (sorted :obj:`list` of
      modality names, possibly empty);
    * ``data['user'].num_nodes = U``, ``data['item'].num_nodes = I``;
    * ``data['item'][m]``: :obj:`torch.float32` features ``[I, d_m]`` for every
      modality ``m`` (other floating dtypes are converted to float32);
    * ``data['user', 'interacts', 'item'].edge_index``: the training
      interactions ``[2, E_train]`` (:obj:`torch.long`, row 0 users, row 1
      items), sorted by (user, item);
    * ``data['item', 'rev_interacts', 'user'].edge_index``: its flip;
    * ``data['user', 'interacts', 'item'].val_edge_index`` /
      ``.test_edge_index``: the held-out interactions ``[2, E_valid]`` /
      ``[2, E_test]``, sorted by (user, item), never to be propagated;
    * ``data['user'].has_train``: :obj:`torch.bool` ``[U]``, :obj:`True` for
      users with at least one training interaction.  Users without one keep
      their id (they exist in the file) and a :class:`UserWarning` reports
      them; evaluation should skip them.

    Format details:

    * the ``.inter`` header must name the five columns ``userID``, ``itemID``,
      ``rating``, ``timestamp`` and ``x_label``.  Like MMRec, which reads its
      columns by name, the loader locates them by name, so their order does
      not matter and additional columns (of any content) are tolerated and
      ignored; every line must then have as many tab-separated fields as the
      header.  ``rating`` and ``timestamp`` are not read (implicit feedback).
    * every ``<modality>_feat.npy`` in the folder is loaded; the modality is the
      file-name prefix and must be a Python identifier.

    Args:
        root (str or os.PathLike): the dataset folder, or its parent when
            :obj:`name` is given.
        name (str, optional): the dataset name (sub-folder of :obj:`root`).
        duplicates (str, optional): what to do with a (user, item) pair that
            occurs on several lines of the same split: :obj:`"drop"` keeps the
            first occurrence and warns with the count and the first duplicate
            line; :obj:`"error"` raises.  A pair that occurs in two different
            splits is always an error. (default: :obj:`"drop"`)

    Raises:
        DataFormatError: the folder or ``.inter`` file is missing, or a file
            breaks the format.  The message names the file, the line (1-based,
            the header is line 1) or feature row, and the fault: header
            columns, field count, text that is not UTF-8, non-integer or
            negative ids, ``x_label``
            outside :math:`\{0, 1, 2\}`, non-contiguous ids, duplicate or
            conflicting (user, item) pairs, an empty split, feature files that
            are not 2-D floating-point ``[I, d]`` matrices or hold NaN/Inf, a
            directory named ``<modality>_feat.npy``.
    """
    if duplicates not in ('drop', 'error'):
        raise ValueError(f"'duplicates' must be 'drop' or 'error' (got {duplicates!r})")

    folder = Path(root) if name is None else Path(root) / name
    if not folder.is_dir():
        raise DataFormatError('dataset folder does not exist', path=folder)
    if name is None:
        name = Path(os.path.abspath(folder)).name
    inter_path = folder / f'{name}.inter'
    if not inter_path.is_file():
        found = sorted(p.name for p in folder.glob('*.inter'))
        hint = f' (found {found})' if found else ''
        raise DataFormatError(f'interaction file {inter_path.name!r} not found in the '
                              f'dataset folder{hint}', path=folder)

    users, items, labels = _read_inter(inter_path, duplicates)
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1

    splits: List[Tensor] = []
    keys = users * num_items + items
    for label, split in enumerate(SPLIT_NAMES):
        split_keys = np.sort(keys[labels == label])
        if split_keys.size == 0:
            raise DataFormatError(f'the {split} split (x_label={label}) is empty',
                                  path=inter_path)
        pairs = np.stack([split_keys // num_items, split_keys % num_items])
        splits.append(torch.from_numpy(pairs))
    train, val, test = splits

    has_train = np.bincount(users[labels == 0], minlength=num_users) > 0
    if not has_train.all():
        cold = np.flatnonzero(~has_train)
        shown = ', '.join(str(u) for u in cold[:10]) + (', ...' if cold.size > 10 else '')
        warnings.warn(
            f"{inter_path}: {cold.size} users have no training interaction "
            f"(userID {shown}); they are kept in the graph and flagged by "
            f"data['user'].has_train == False, and evaluation skips them",
            UserWarning, stacklevel=2)

    features = _load_features(folder, num_items)

    data = HeteroData()
    data.name = name
    data.modalities = sorted(features)
    data[USER].num_nodes = num_users
    data[USER].has_train = torch.from_numpy(has_train)
    data[ITEM].num_nodes = num_items
    for modality in data.modalities:
        data[ITEM][modality] = features[modality]
    data[USER_ITEM].edge_index = train
    data[USER_ITEM].val_edge_index = val
    data[USER_ITEM].test_edge_index = test
    data[ITEM_USER].edge_index = train.flip(0)
    return data


# ``.inter`` parsing ##########################################################

def _read_inter(path: Path, duplicates: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Parses and validates an ``.inter`` file; returns ``(users, items,
    x_labels)`` as int64 arrays with duplicate rows removed."""
    raw = path.read_bytes()
    newline = raw.find(b'\n')
    header_bytes = raw if newline < 0 else raw[:newline]
    header = header_bytes.decode('utf-8-sig', errors='replace').rstrip('\r').split('\t')
    columns = _check_header(path, header)

    body = np.frombuffer(raw, dtype=np.uint8)[len(raw) if newline < 0 else newline + 1:]
    num_rows = _check_field_counts(path, raw, body, len(header))
    if num_rows == 0:
        raise DataFormatError('the file holds a header but no interactions', path=path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            table = np.loadtxt(path, dtype=np.int64, delimiter='\t', skiprows=1,
                               usecols=columns, comments=None, ndmin=2, encoding='utf-8')
    except ValueError as error:
        _diagnose_tokens(path, raw, columns)  # raises a precise DataFormatError
        raise DataFormatError(f'cannot parse the file ({error})', path=path) from error
    if table.shape[0] != num_rows:  # pragma: no cover - guarded by the field count
        raise DataFormatError(f'parsed {table.shape[0]} rows but the file has {num_rows} '
                              'data lines', path=path)

    users, items, labels = (np.ascontiguousarray(table[:, j]) for j in range(3))
    for column, values in (('userID', users), ('itemID', items)):
        bad = np.flatnonzero(values < 0)
        if bad.size:
            raise DataFormatError(
                f'{column} is {values[bad[0]]}; ids must be non-negative (0-based) integers',
                path=path, line=int(bad[0]) + 2)
    bad = np.flatnonzero((labels < 0) | (labels > 2))
    if bad.size:
        raise DataFormatError(
            f'x_label is {labels[bad[0]]}; it must be 0 (train), 1 (valid) or 2 (test)',
            path=path, line=int(bad[0]) + 2)

    _check_contiguous(path, 'userID', users)
    _check_contiguous(path, 'itemID', items)

    keep = _find_duplicates(path, users, items, labels, duplicates)
    if keep is not None:
        users, items, labels = users[keep], items[keep], labels[keep]
    return users, items, labels


def _check_header(path: Path, header: Sequence[str]) -> List[int]:
    r"""Returns the positions of ``userID``, ``itemID`` and ``x_label``."""
    missing = [c for c in INTER_COLUMNS if c not in header]
    if missing:
        found = ' '.join(repr(c) for c in header)
        msg = (f"header is missing column(s) {', '.join(repr(c) for c in missing)}: "
               f"found {found}, expected the tab-separated columns "
               f"{' '.join(repr(c) for c in INTER_COLUMNS)}")
        if len(header) == 1 and ' ' in header[0]:
            msg += ' (the header has no tab: the file must be tab-separated)'
        raise DataFormatError(msg, path=path, line=1)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise DataFormatError(f"header names column(s) {repeated} more than once",
                              path=path, line=1)
    return [header.index(c) for c in _PARSED_COLUMNS]


def _check_field_counts(path: Path, raw: bytes, body: np.ndarray, num_fields: int) -> int:
    r"""Checks that every data line has :obj:`num_fields` tab-separated fields
    (vectorised over the bytes of the file); returns the number of data lines.
    Only the file's final newline may end an empty line."""
    line_ends = np.flatnonzero(body == ord('\n'))
    if body.size and body[-1] != ord('\n'):
        line_ends = np.append(line_ends, body.size)
    tabs = np.flatnonzero(body == ord('\t'))
    fields = np.diff(np.searchsorted(tabs, line_ends), prepend=0) + 1
    bad = np.flatnonzero(fields != num_fields)
    if bad.size:
        row = int(bad[0])
        start = 0 if row == 0 else int(line_ends[row - 1]) + 1
        text = bytes(body[start:line_ends[row]]).decode('utf-8', errors='replace').rstrip('\r')
        shown = 'an empty line' if not text.strip() else f'{text[:80]!r}'
        raise DataFormatError(
            f'expected {num_fields} tab-separated fields (as in the header), found '
            f'{fields[row]} in {shown}', path=path, line=row + 2)
    return int(line_ends.size)


#: what NumPy's int64 parser accepts: optional blanks and sign, ASCII digits
#: (Python's ``int`` also takes ``'2_0'`` and non-ASCII digits)
_INTEGER = re.compile(rb'[ ]*[+-]?[0-9]+[ ]*')


def _diagnose_tokens(path: Path, raw: bytes, columns: Sequence[int]) -> None:
    r"""Finds the first line that is not UTF-8 text or whose ``userID``,
    ``itemID`` or ``x_label`` field is not an int64 integer as NumPy reads
    it, and raises a :class:`DataFormatError` naming the line and the value.
    Runs only after the vectorised parser failed, so a per-line scan is
    affordable here."""
    lines = raw.split(b'\n')
    if lines and lines[-1] == b'':
        lines.pop()  # the empty string after the final newline is no line
    for lineno, line in enumerate(lines, start=1):
        line = line.rstrip(b'\r')
        try:
            line.decode('utf-8-sig' if lineno == 1 else 'utf-8')
        except UnicodeDecodeError as error:
            fields = line[:error.start].count(b'\t')
            header = lines[0].decode('utf-8-sig', errors='replace').rstrip('\r').split('\t')
            column = f' (column {header[fields]!r})' if lineno > 1 and fields < len(header) else ''
            raise DataFormatError(
                f'byte {line[error.start]:#04x} at position {error.start + 1}{column} is not '
                f'UTF-8 text: {line[:80]!r}', path=path, line=lineno) from None
        if lineno == 1:
            continue
        fields = line.split(b'\t')
        for name, col in zip(_PARSED_COLUMNS, columns):
            token = fields[col] if col < len(fields) else b''
            shown = token.decode('utf-8')
            if _INTEGER.fullmatch(token) is None:
                rule = ('ids must be non-negative integers' if name != 'x_label'
                        else 'x_label must be 0, 1 or 2')
                raise DataFormatError(f'{name} is {shown!r}, not an integer ({rule})',
                                      path=path, line=lineno)
            if not -2**63 <= int(token) < 2**63:
                raise DataFormatError(f'{name} {shown.strip()!r} does not fit in 64 bits',
                                      path=path, line=lineno)


def _check_contiguous(path: Path, column: str, ids: np.ndarray) -> None:
    r"""Ids must cover ``0 .. max(ids)`` without gaps."""
    count = int(ids.max()) + 1
    if count <= ids.size:  # cheap dense check
        missing = np.flatnonzero(np.bincount(ids, minlength=count) == 0)
        num_missing = missing.size
        first = int(missing[0]) if num_missing else None
    else:  # more ids than rows: certainly gaps; avoid a huge bincount
        unique = np.unique(ids)
        num_missing = count - unique.size
        gaps = np.flatnonzero(unique != np.arange(unique.size))
        first = int(gaps[0]) if gaps.size else unique.size
    if num_missing:
        raise DataFormatError(
            f'{column} {first} never occurs although the largest {column} is {count - 1}: '
            f'ids must be contiguous 0..{count - 1} ({num_missing} missing)', path=path)


def _find_duplicates(path: Path, users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                     duplicates: str) -> Optional[np.ndarray]:
    r"""Returns :obj:`None` when every (user, item) pair is unique, else the
    mask of rows to keep (first occurrences).  Raises on pairs that occur in two
    splits, and on any duplicate when :obj:`duplicates` is ``'error'``."""
    num_rows = users.size
    keys = users * (int(items.max()) + 1) + items
    order = np.argsort(keys, kind='stable')
    sorted_keys = keys[order]
    repeat = np.zeros(num_rows, dtype=bool)
    repeat[1:] = sorted_keys[1:] == sorted_keys[:-1]
    if not repeat.any():
        return None
    # For every row, the row of the first occurrence of its pair (stable sort:
    # the smallest row index of a group comes first).
    group_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(num_rows)))
    first_of = np.empty(num_rows, dtype=np.int64)
    first_of[order] = order[group_start]
    dup_rows = np.flatnonzero(first_of != np.arange(num_rows))

    conflicts = dup_rows[labels[dup_rows] != labels[first_of[dup_rows]]]
    if conflicts.size:
        row = int(conflicts[0])
        first = int(first_of[row])
        raise DataFormatError(
            f'userID {users[row]}, itemID {items[row]} is in the '
            f'{SPLIT_NAMES[labels[row]]} split here and in the '
            f'{SPLIT_NAMES[labels[first]]} split on line {first + 2}: a (user, item) '
            f'pair may belong to one split only', path=path, line=row + 2)

    row = int(dup_rows[0])
    first = int(first_of[row])
    if duplicates == 'error':
        raise DataFormatError(
            f'duplicate (user, item) pair: userID {users[row]}, itemID {items[row]} '
            f'already occurs on line {first + 2} ({dup_rows.size} duplicate rows in total; '
            f"load_mmrec(..., duplicates='drop') keeps first occurrences)",
            path=path, line=row + 2)
    warnings.warn(
        f'{path}: dropped {dup_rows.size} duplicate (userID, itemID) rows, keeping each '
        f"pair's first occurrence; the first duplicate is line {row + 2} (userID "
        f'{users[row]}, itemID {items[row]}, as on line {first + 2})',
        UserWarning, stacklevel=4)
    return first_of == np.arange(num_rows)


# features ####################################################################

def _load_features(folder: Path, num_items: int) -> Dict[str, Tensor]:
    r"""Loads every ``<modality>_feat.npy`` of :obj:`folder` as float32 tensor."""
    features: Dict[str, Tensor] = {}
    for path in sorted(folder.glob('*' + FEATURE_SUFFIX)):
        if path.is_dir():
            raise DataFormatError(f'is a directory, not a <modality>{FEATURE_SUFFIX} '
                                  f'feature file', path=path)
        modality = path.name[:-len(FEATURE_SUFFIX)]
        if not modality.isidentifier() or modality in _RESERVED_MODALITIES:
            raise DataFormatError(
                f'modality name {modality!r} (the file-name prefix) must be a Python '
                f"identifier other than {sorted(_RESERVED_MODALITIES)}", path=path)
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataFormatError(f'cannot be read as a .npy array ({error})',
                                  path=path) from error
        if not isinstance(array, np.ndarray):
            raise DataFormatError('is not a single .npy array (an .npz archive?)', path=path)
        if array.ndim != 2:
            raise DataFormatError(
                f'features must be a 2-D matrix [num_items, dim]; found shape '
                f'{tuple(array.shape)} ({array.ndim}-D)', path=path)
        if not np.issubdtype(array.dtype, np.floating):
            raise DataFormatError(f'features must be floating point; found dtype '
                                  f'{array.dtype}', path=path)
        if array.shape[0] != num_items:
            raise DataFormatError(
                f'has {array.shape[0]} rows but the interaction file has {num_items} items '
                f'(largest itemID {num_items - 1}); row i must describe item i', path=path)
        if array.shape[1] == 0:
            raise DataFormatError('features have 0 columns', path=path)
        with np.errstate(over='ignore'):  # overflow becomes Inf, reported below
            array = np.ascontiguousarray(array, dtype=np.float32)
        # A row is finite iff its (float64) sum is, up to overflow of huge
        # finite values; confirm the candidates exactly.  O(I) extra memory.
        with np.errstate(over='ignore', invalid='ignore'):
            candidates = np.flatnonzero(~np.isfinite(array.sum(axis=1, dtype=np.float64)))
        bad = candidates[~np.isfinite(array[candidates]).all(axis=1)]
        if bad.size:
            raise DataFormatError(
                f'features hold NaN or Inf (after conversion to float32) in {bad.size} '
                f'row(s); the first is item {bad[0]}', path=path, row=int(bad[0]))
        features[modality] = torch.from_numpy(array)
    return features
