r"""Your own data to an MMRec folder (``crane-pyg prepare``).

:func:`prepare_mmrec` reads an interaction table (CSV, TSV or Parquet:
user, item, optionally timestamp and rating columns, names configurable),
optionally an item table (text columns and/or a column of image paths, keyed
by item) or a folder of images named after the items, and writes
``<output_root>/<name>/``:

* ``<name>.inter``: tab-separated, header ``userID itemID rating timestamp
  x_label``, 0-based contiguous ids, one line per (user, item) pair, each
  user's lines in chronological order, ``x_label`` 0 / 1 / 2 = train /
  valid / test;
* ``user_map.csv`` / ``item_map.csv``: ``userID,original_id`` /
  ``itemID,original_id``;
* ``text_feat.npy`` / ``image_feat.npy``: float32 ``[I, d]``, row = itemID
  (:mod:`crane_pyg.data.features`);
* ``README.md``: where the data came from, the options, the statistics and
  the encoder versions.

Processing, in this order:

1. rows with an empty user or item are errors (file and line named);
   ratings below ``min_rating`` are dropped; a (user, item) pair seen
   several times keeps its earliest occurrence (by timestamp, then file
   order);
2. **k-core**: users and items with fewer than ``k_core`` interactions are
   removed, repeatedly, until every remaining user and item has at least
   ``k_core`` (``k_core=1``: no filter);
3. **ids**: users and items are numbered 0, 1, ... in the order of their
   original ids (numeric order when every id is an integer, else string
   order);
4. **split**, per user: the last ``n_test = max(1, round(test_ratio * n))``
   interactions go to test, the ``n_valid = max(1, round(valid_ratio * n))``
   before them to validation, the rest to training (``round`` half up;
   users with fewer than 3 interactions keep at least one training
   interaction and fill test before validation). "Last" is chronological
   (timestamp, ties in file order) when the table has timestamps
   (``split='auto'`` or ``'time'``), else a random order seeded with
   ``seed`` (``split='random'``, or ``'auto'`` without timestamps);
5. features of the remaining items; the folder is then read back with
   :func:`~crane_pyg.data.load_mmrec` (all of its checks) before it is moved
   into place: the output appears complete or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np

from .errors import DataFormatError
from .features import (DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, encode_images, encode_texts,
                       encoder_versions, load_image_model, load_text_model)
from .mmrec import INTER_COLUMNS, load_mmrec

__all__ = ['PrepareConfig', 'prepare_mmrec', 'read_table', 'k_core_filter', 'split_counts',
           'USER_MAP', 'ITEM_MAP', 'IMAGE_SUFFIXES']

USER_MAP = 'user_map.csv'
ITEM_MAP = 'item_map.csv'
#: image file types looked up in an image folder (``<item id><suffix>``)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
_INTEGER = re.compile(r'-?\d+')
PathLike = Union[str, os.PathLike]


@dataclass
class PrepareConfig:
    r"""Options of :func:`prepare_mmrec` (the ``crane-pyg prepare`` flags).

    Attributes:
        user_col (str): user column of the interaction table. (default: ``'user'``)
        item_col (str): item column. (default: ``'item'``)
        time_col (str, optional): timestamp column (numbers, or dates that
            pandas parses); ``None``: ``'timestamp'`` when the table has one.
        rating_col (str, optional): rating column (numbers); ``None``:
            ``'rating'`` when present. Without one every rating is 1.
        sep (str, optional): field separator; ``None``: by file suffix
            (``.csv`` comma, ``.tsv`` / ``.txt`` / ``.inter`` tab).
        min_rating (float, optional): drop interactions rated below this.
        k_core (int): minimum interactions per user and per item. (default: ``5``)
        valid_ratio (float): share of each user's interactions for validation.
            (default: ``0.1``)
        test_ratio (float): share for test. (default: ``0.1``)
        split (str): ``'auto'`` (chronological with timestamps, else random),
            ``'time'`` or ``'random'``. (default: ``'auto'``)
        seed (int): seed of the random split. (default: ``0``)
        items (str, optional): item table (CSV / TSV / Parquet) with text
            and/or image-path columns.
        item_key (str, optional): the item table's key column; ``None``:
            ``item_col``.
        text_cols (list of str, optional): text columns of the item table
            (several are joined with a space); ``None``: ``['text']`` when the
            table has that column.
        image_col (str, optional): item-table column of image file paths
            (relative to the table's folder).
        images (str, optional): a folder of images named
            ``<original item id><suffix>``.
        text_model (str): sentence-transformers model. (default:
            ``'all-MiniLM-L6-v2'``)
        image_model (str): image CNN. (default: ``'efficientnet-lite0'``)
        text_batch_size (int): texts per encoder batch. (default: ``128``)
        image_batch_size (int): images per CNN batch. (default: ``32``)
        device (str): where the encoders run. (default: ``'cpu'``)
    """
    user_col: str = 'user'
    item_col: str = 'item'
    time_col: Optional[str] = None
    rating_col: Optional[str] = None
    sep: Optional[str] = None
    min_rating: Optional[float] = None
    k_core: int = 5
    valid_ratio: float = 0.1
    test_ratio: float = 0.1
    split: Literal['auto', 'time', 'random'] = 'auto'
    seed: int = 0
    items: Optional[str] = None
    item_key: Optional[str] = None
    text_cols: Optional[list] = None
    image_col: Optional[str] = None
    images: Optional[str] = None
    text_model: str = DEFAULT_TEXT_MODEL
    image_model: str = DEFAULT_IMAGE_MODEL
    text_batch_size: int = 128
    image_batch_size: int = 32
    device: str = 'cpu'

    def __post_init__(self) -> None:
        for name in ('k_core', 'text_batch_size', 'image_batch_size'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be an int >= 1, got {value!r}')
        for name in ('valid_ratio', 'test_ratio'):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f'{name} must lie in (0, 1), got {value!r}')
        if self.valid_ratio + self.test_ratio >= 1:
            raise ValueError(f'valid_ratio + test_ratio must be < 1, got '
                             f'{self.valid_ratio} + {self.test_ratio}')
        if self.split not in ('auto', 'time', 'random'):
            raise ValueError(f"split must be 'auto', 'time' or 'random', got {self.split!r}")
        if self.image_col is not None and self.items is None:
            raise ValueError('image_col names a column of the item table: give items too')
        if self.image_col is not None and self.images is not None:
            raise ValueError('give either an image folder (images) or a column of image '
                             'paths (image_col), not both')
        if self.text_cols is not None:
            self.text_cols = list(self.text_cols)
            if self.items is None:
                raise ValueError('text_cols name columns of the item table: give items too')


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
def _where(path: Path, index: int) -> dict:
    r"""Line (text tables, header = line 1) or row (Parquet) of data row :obj:`index`."""
    if path.suffix.lower() == '.parquet':
        return {'path': path, 'row': index}
    return {'path': path, 'line': index + 2}


def read_table(path: PathLike, sep: Optional[str] = None) -> Any:
    r"""A CSV / TSV / Parquet table as a :class:`pandas.DataFrame` of
    strings (ids are kept exactly as written; empty fields are ``''``).

    Raises:
        DataFormatError: missing, empty or unparsable file (named).
    """
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise DataFormatError('file not found', path=path)
    suffix = path.suffix.lower()
    try:
        if suffix == '.parquet':
            try:
                frame = pd.read_parquet(path)
            except ImportError as exc:
                raise DataFormatError(f'reading Parquet needs pyarrow ({exc}); '
                                      f"pip install 'crane_pyg[features]'", path=path) from None
            frame = frame.astype(object)
            frame = frame.where(frame.notna(), '').astype(str)  # missing -> '' as in CSV
        else:
            if sep is None:
                sep = ',' if suffix == '.csv' else '\t'
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                                na_filter=False, encoding='utf-8-sig')
    except DataFormatError:
        raise
    except pd.errors.EmptyDataError:
        raise DataFormatError('the file is empty (a header line is needed)', path=path) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataFormatError(f'cannot parse the table ({message})', path=path) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _column(frame: Any, path: Path, name: str, what: str, flag: str) -> Any:
    if name not in frame.columns:
        found = ', '.join(repr(c) for c in frame.columns)
        raise DataFormatError(f'no {what} column {name!r} (columns: {found}); name it with '
                              f'{flag}', path=path, line=1)
    return frame[name].astype(str).str.strip()


def _numbers(values: Any, path: Path, name: str) -> np.ndarray:
    import pandas as pd
    numbers = pd.to_numeric(values, errors='coerce').to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        raise DataFormatError(f'{name} is {values.iloc[bad[0]]!r}, not a number',
                              **_where(path, int(bad[0])))
    return numbers


def _time_keys(values: Any, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    r"""``(sort keys, values to write)``: numbers as they are, dates as
    seconds since 1970 (UTC)."""
    import pandas as pd
    numeric = pd.to_numeric(values, errors='coerce').to_numpy(dtype=np.float64)
    if np.isfinite(numeric[0]):  # a numeric column: every value must be a number
        bad = np.flatnonzero(~np.isfinite(numeric))
        if bad.size:
            raise DataFormatError(f'{name} is {values.iloc[bad[0]]!r}, not a number like the '
                                  f'first row\'s', **_where(path, int(bad[0])))
        return numeric, values.to_numpy(dtype=object)
    try:
        dates = pd.to_datetime(values, errors='coerce', utc=True, format='mixed')
    except (TypeError, ValueError):
        dates = pd.to_datetime(values, errors='coerce', utc=True)
    bad = np.flatnonzero(dates.isna().to_numpy())
    if bad.size:
        raise DataFormatError(f'{name} is {values.iloc[bad[0]]!r}: neither a number nor a date',
                              **_where(path, int(bad[0])))
    seconds = (dates - pd.Timestamp(0, tz='UTC')) // pd.Timedelta(seconds=1)
    seconds = seconds.to_numpy(dtype=np.int64)
    return seconds.astype(np.float64), seconds.astype(str).astype(object)


def _sorted_ids(ids: np.ndarray) -> np.ndarray:
    r"""Unique ids in numeric order when all are integers, else string order."""
    unique = np.unique(ids.astype(str))
    if all(_INTEGER.fullmatch(u) for u in unique):
        return unique[np.argsort([int(u) for u in unique], kind='stable')]
    return unique


# ---------------------------------------------------------------------------
# filtering and splitting
# ---------------------------------------------------------------------------
def k_core_filter(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    r"""Mask of the interactions kept by the iterated :obj:`k`-core filter
    (every kept user and item has at least :obj:`k` kept interactions);
    :obj:`users` / :obj:`items` are integer codes."""
    keep = np.ones(users.size, dtype=bool)
    if k <= 1:
        return keep
    while True:
        user_deg = np.bincount(users[keep], minlength=int(users.max()) + 1 if users.size else 0)
        item_deg = np.bincount(items[keep], minlength=int(items.max()) + 1 if items.size else 0)
        drop = keep & ((user_deg[users] < k) | (item_deg[items] < k))
        if not drop.any():
            return keep
        keep &= ~drop


def _half_up(n: np.ndarray, ratio: float) -> np.ndarray:
    r"""``round(ratio * n)`` with halves rounded up, exactly (rational arithmetic)."""
    frac = Fraction(str(ratio))
    return (2 * n * frac.numerator + frac.denominator) // (2 * frac.denominator)


def split_counts(n: np.ndarray, valid_ratio: float,
                 test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    r"""``(n_valid, n_test)`` for users with :obj:`n` interactions (see the
    module docstring, step 4)."""
    n = np.asarray(n, dtype=np.int64)
    n_test = np.maximum(1, _half_up(n, test_ratio))
    n_test = np.minimum(n_test, np.maximum(n - 1, 0))
    n_valid = np.maximum(1, _half_up(n, valid_ratio))
    n_valid = np.minimum(n_valid, np.maximum(n - 1 - n_test, 0))
    return n_valid, n_test


# ---------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------
def prepare_mmrec(
    interactions: PathLike,
    output_root: PathLike,
    name: str,
    config: Optional[PrepareConfig] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    text_encoder: Optional[Callable[[list], np.ndarray]] = None,
) -> dict[str, Any]:
    r"""Writes the MMRec folder ``<output_root>/<name>/`` from a raw
    interaction table (see the module docstring).

    Args:
        interactions (path): the interaction table.
        output_root (path): the data root; the dataset goes to
            ``output_root/name``.
        name (str): the dataset name.
        config (PrepareConfig, optional): the options (defaults otherwise).
        overwrite (bool): replace an existing ``output_root/name``.
        progress (bool): progress bars on stderr.
        log (callable, optional): where the stage lines go (default stderr).
        text_encoder (callable, optional): ``texts -> float32 [N, d]`` used
            instead of loading ``config.text_model`` (tests, custom models).

    Returns:
        dict: the statistics written to the README (``users``, ``items``,
        ``interactions``, ``train``/``valid``/``test``, what was dropped,
        the features) plus ``folder``.

    Raises:
        DataFormatError: a table is malformed (file, line and value named),
            a column is missing, nothing survives the filters, or the result
            fails :func:`~crane_pyg.data.load_mmrec`'s checks.
        FeatureExtractorUnavailable: features requested without the encoder.
        FileExistsError: the output exists and :obj:`overwrite` is off.
    """
    config = config or PrepareConfig()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if not name or '/' in name or name in ('.', '..') or name.startswith('.'):
        raise ValueError(f'the dataset name must be a plain folder name, got {name!r}')
    output_root = Path(output_root)
    target = output_root / name
    if target.exists() and not overwrite:
        raise FileExistsError(f'{target} exists; choose another name or overwrite it')
    source = Path(interactions)
    started = time.perf_counter()
    stats: dict[str, Any] = {}

    # --- the encoders first: a missing extra fails before any work -------------
    frame_items, text_cols, image_paths_col = None, [], None
    if config.items is not None:
        items_path = Path(config.items)
        frame_items = read_table(items_path)
        key = config.item_key or config.item_col
        _column(frame_items, items_path, key, 'item key', '--item-key')
        if config.text_cols is not None:
            text_cols = list(config.text_cols)
            for col in text_cols:
                _column(frame_items, items_path, col, 'text', '--text-col')
        elif 'text' in frame_items.columns:
            text_cols = ['text']
        if config.image_col is not None:
            _column(frame_items, items_path, config.image_col, 'image path', '--image-col')
            image_paths_col = config.image_col
        if not text_cols and image_paths_col is None:
            raise DataFormatError("the item table has no 'text' column and no text or image "
                                  'column was named (--text-col, --image-col)', path=items_path,
                                  line=1)
    text_model = image_model = None
    if text_cols and text_encoder is None:
        text_model = load_text_model(config.text_model, config.device, progress)
    if image_paths_col is not None or config.images is not None:
        if config.images is not None and not Path(config.images).is_dir():
            raise DataFormatError('image folder not found', path=config.images)
        image_model = load_image_model(config.image_model, config.device)

    # --- interactions ------------------------------------------------------------
    log(f'reading {source}')
    frame = read_table(source, config.sep)
    stats['input_rows'] = len(frame)
    if len(frame) == 0:
        raise DataFormatError('the table has a header but no rows', path=source)
    users = _column(frame, source, config.user_col, 'user', '--user-col')
    items = _column(frame, source, config.item_col, 'item', '--item-col')
    for what, values in (('user', users), ('item', items)):
        empty = np.flatnonzero((values == '').to_numpy())
        if empty.size:
            raise DataFormatError(f'empty {what} id', **_where(source, int(empty[0])))
    time_col = config.time_col or ('timestamp' if 'timestamp' in frame.columns else None)
    if config.split == 'time' and time_col is None:
        raise DataFormatError("split 'time' needs a timestamp column (--time-col)", path=source,
                              line=1)
    use_time = time_col is not None and config.split != 'random'
    if time_col is not None:
        time_key, time_out = _time_keys(_column(frame, source, time_col, 'timestamp',
                                                '--time-col'), source, time_col)
    else:
        time_key = np.zeros(len(frame))
        time_out = np.full(len(frame), '0', dtype=object)
    rating_col = config.rating_col or ('rating' if 'rating' in frame.columns else None)
    if rating_col is not None:
        rating_text = _column(frame, source, rating_col, 'rating', '--rating-col')
        ratings = _numbers(rating_text, source, rating_col)
        rating_out = rating_text.to_numpy(dtype=object)
    else:
        ratings = np.ones(len(frame))
        rating_out = np.full(len(frame), '1', dtype=object)

    keep = np.ones(len(frame), dtype=bool)
    if config.min_rating is not None:
        keep &= ratings >= config.min_rating
    stats['dropped_low_rating'] = int((~keep).sum())
    user_codes, user_ids = _codes(users.to_numpy(dtype=object))
    item_codes, item_ids = _codes(items.to_numpy(dtype=object))
    row_order = np.arange(len(frame))
    # duplicates: keep the earliest (timestamp, then file order) of each pair
    order = np.lexsort((row_order, time_key, item_codes, user_codes))
    order = order[keep[order]]
    pair = user_codes[order] * (int(item_codes.max()) + 1) + item_codes[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    stats['dropped_duplicates'] = int((~first).sum())
    rows = np.sort(order[first])
    log(f'{len(frame)} rows, {rows.size} distinct (user, item) pairs')

    kept = k_core_filter(user_codes[rows], item_codes[rows], config.k_core)
    stats['dropped_k_core'] = int((~kept).sum())
    rows = rows[kept]
    if rows.size == 0:
        raise DataFormatError(f'no interaction is left after the {config.k_core}-core filter '
                              f'(every user and item needs {config.k_core} interactions); '
                              f'lower k_core (--k-core)', path=source)

    # --- ids ---------------------------------------------------------------------------
    user_orig = user_ids[user_codes[rows]].astype(str)
    item_orig = item_ids[item_codes[rows]].astype(str)
    user_map, item_map = _sorted_ids(user_orig), _sorted_ids(item_orig)
    uid, iid = _index_of(user_map, user_orig), _index_of(item_map, item_orig)
    num_users, num_items = user_map.size, item_map.size

    # --- split ---------------------------------------------------------------------------
    if use_time:
        within = time_key[rows]
    else:
        within = np.random.default_rng(config.seed).permutation(rows.size).astype(np.float64)
    order = np.lexsort((rows, within, uid))
    uid, iid, rows = uid[order], iid[order], rows[order]
    counts = np.bincount(uid, minlength=num_users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(uid.size) - start[uid]
    n_valid, n_test = split_counts(counts, config.valid_ratio, config.test_ratio)
    from_end = counts[uid] - position  # 1 for a user's last interaction
    labels = np.where(from_end <= n_test[uid], 2,
                      np.where(from_end <= n_test[uid] + n_valid[uid], 1, 0))
    split_mode = (f"chronological (column '{time_col}', ties in file order)" if use_time
                  else f'random (seed {config.seed})')
    stats.update(users=int(num_users), items=int(num_items), interactions=int(uid.size),
                 train=int((labels == 0).sum()), valid=int((labels == 1).sum()),
                 test=int((labels == 2).sum()), split=split_mode,
                 density=float(uid.size) / (num_users * num_items))
    log(f'{num_users} users, {num_items} items, {uid.size} interactions after the '
        f'{config.k_core}-core filter; split {split_mode}: train {stats["train"]}, '
        f'valid {stats["valid"]}, test {stats["test"]}')

    output_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=output_root, prefix=f'.{name}.prepare-'))
    work = scratch / name
    work.mkdir()
    try:
        lines = ['\t'.join(INTER_COLUMNS)]
        lines += [f'{u}\t{i}\t{r}\t{t}\t{x}' for u, i, r, t, x in zip(
            uid.tolist(), iid.tolist(), rating_out[rows], time_out[rows], labels.tolist())]
        (work / f'{name}.inter').write_text('\n'.join(lines) + '\n', encoding='utf-8')
        _write_map(work / USER_MAP, 'userID', user_map)
        _write_map(work / ITEM_MAP, 'itemID', item_map)

        features: dict[str, Any] = {}
        if frame_items is not None:
            table = _item_rows(frame_items, Path(config.items),
                               config.item_key or config.item_col, item_map)
            if text_cols:
                columns = [frame_items[c].astype(str).str.strip().tolist() for c in text_cols]
                texts = [' '.join(col[r] for col in columns) if r >= 0 else '' for r in table]
                missing = sum(1 for r in table if r < 0)
                log(f'encoding the text of {num_items} items with '
                    f'{config.text_model if text_encoder is None else "a custom encoder"}')
                array = (text_encoder(texts) if text_encoder is not None else
                         encode_texts(texts, text_model, batch_size=config.text_batch_size,
                                      device=config.device, progress=progress))
                array = np.ascontiguousarray(array, dtype=np.float32)
                np.save(work / 'text_feat.npy', array)
                features['text'] = {'shape': list(array.shape), 'items_without_text': missing,
                                    'model': (config.text_model if text_encoder is None
                                              else 'custom encoder (Python API)'),
                                    'columns': text_cols}
            if image_paths_col is not None:
                base = Path(config.items).parent
                column = frame_items[image_paths_col].astype(str).str.strip().tolist()
                paths = [base / column[r] if r >= 0 and column[r] else None for r in table]
                features['image'] = _write_images(work, paths, image_model, config, progress,
                                                  log)
        if config.images is not None:
            folder = Path(config.images)
            index = {p.stem: p for p in sorted(folder.iterdir())
                     if p.suffix.lower() in IMAGE_SUFFIXES}
            paths = [index.get(str(item)) for item in item_map]
            features['image'] = _write_images(work, paths, image_model, config, progress, log)
        stats['features'] = features

        log('checking the folder with load_mmrec')
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter('error', UserWarning)  # e.g. users without training items
                load_mmrec(work)
        except (DataFormatError, UserWarning) as exc:
            problem = str(exc).replace(str(work), str(target))
            raise DataFormatError(f"the prepared folder fails the loader's checks: {problem}",
                                  path=target) from None
        stats['seconds'] = round(time.perf_counter() - started, 1)
        (work / 'README.md').write_text(_readme(name, source, config, stats),
                                        encoding='utf-8')
        _move_into_place(work, target, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f'wrote {target}')
    return {'folder': str(target), **stats}


def _index_of(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    r"""Position of every value in :obj:`ids` (all present)."""
    sorter = np.argsort(ids)
    return sorter[np.searchsorted(ids, values, sorter=sorter)]


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), uniques


def _write_map(path: Path, column: str, ids: np.ndarray) -> None:
    import csv
    with path.open('w', encoding='utf-8', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow([column, 'original_id'])
        writer.writerows(enumerate(ids.tolist()))


def _item_rows(frame: Any, path: Path, key: str, item_map: np.ndarray) -> list[int]:
    r"""Row of the item table for every item (``-1``: none); duplicate keys
    are errors."""
    keys = frame[key].astype(str).str.strip().tolist()
    rows: dict[str, int] = {}
    for index, value in enumerate(keys):
        if value in rows:
            raise DataFormatError(f'item {value!r} appears a second time in the item table '
                                  f'(key column {key!r})', **_where(path, index))
        rows[value] = index
    return [rows.get(str(item), -1) for item in item_map.tolist()]


def _write_images(work: Path, paths: list, model: Any, config: PrepareConfig,
                  progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    present = [i for i, p in enumerate(paths) if p is not None]
    for i in present:
        if not Path(paths[i]).is_file():
            raise DataFormatError(f'image of item {i} not found', path=paths[i])
    if not present:
        raise DataFormatError('no item has an image (file names must be <item id><suffix>, '
                              f'suffix one of {", ".join(IMAGE_SUFFIXES)})',
                              path=config.images or config.items)
    log(f'encoding {len(present)} images with {config.image_model}')
    encoded = encode_images([paths[i] for i in present], model,
                            batch_size=config.image_batch_size, device=config.device,
                            progress=progress)
    array = np.empty((len(paths), encoded.shape[1]), dtype=np.float32)
    array[:] = encoded.mean(axis=0)  # items without an image: the mean image vector
    array[present] = encoded
    np.save(work / 'image_feat.npy', array)
    return {'shape': list(array.shape), 'items_without_image': len(paths) - len(present),
            'model': config.image_model}


def _move_into_place(work: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            raise FileExistsError(f'{target} exists; choose another name or overwrite it')
        old = target.with_name(f'.{target.name}.old-{os.getpid()}')
        os.replace(target, old)
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, target)


def _readme(name: str, source: Path, config: PrepareConfig, stats: dict[str, Any]) -> str:
    options = {k: v for k, v in dataclasses.asdict(config).items()
               if v != getattr(PrepareConfig, k, None)}
    lines = [f'# {name}', '',
             f'MMRec-format dataset written by `crane-pyg prepare` (crane_pyg '
             f'{_package_version()}) from `{source}`'
             + (f' and `{config.items}`' if config.items else '')
             + (f' and images in `{config.images}`' if config.images else '') + '.', '',
             '## Files', '',
             '| file | content |', '|---|---|',
             f'| `{name}.inter` | tab-separated `userID itemID rating timestamp x_label`, '
             f'0-based ids, x_label 0 train / 1 valid / 2 test |',
             f'| `{USER_MAP}`, `{ITEM_MAP}` | new id -> original id |']
    for modality, info in stats.get('features', {}).items():
        lines.append(f'| `{modality}_feat.npy` | float32 {info["shape"]}, row = itemID, '
                     f'model `{info["model"]}` |')
    lines += ['', '## Statistics', '', '| | value |', '|---|---|',
              f'| users | {stats["users"]:,} |', f'| items | {stats["items"]:,} |',
              f'| interactions | {stats["interactions"]:,} |',
              f'| density | {100 * stats["density"]:.4f} % |',
              f'| train / valid / test | {stats["train"]:,} / {stats["valid"]:,} / '
              f'{stats["test"]:,} |',
              f'| split | {stats["split"]}, last {config.test_ratio:g} of each user to test, '
              f'the {config.valid_ratio:g} before to valid (rounded half up, at least 1) |',
              f'| rows read | {stats["input_rows"]:,} |']
    if config.min_rating is not None:
        lines.append(f'| dropped: rating below {config.min_rating:g} | '
                     f'{stats["dropped_low_rating"]:,} |')
    lines += [f'| dropped: repeated (user, item) pairs | {stats["dropped_duplicates"]:,} |',
              f'| dropped: {config.k_core}-core filter | {stats["dropped_k_core"]:,} |']
    for modality, info in stats.get('features', {}).items():
        missing = info.get('items_without_text', info.get('items_without_image'))
        fill = ('encoded as empty text' if modality == 'text' else 'given the mean image vector')
        lines.append(f'| items without {modality} ({fill}) | {missing:,} |')
    lines += ['', '## Options', '', '```json', json.dumps(options, indent=2, default=str), '```']
    if stats.get('features'):
        lines += ['', '## Encoder versions', '']
        lines += [f'- {pkg} {ver}' for pkg, ver in
                  encoder_versions(list(stats['features'])).items() if ver]
    lines += ['', f'Prepared in {stats["seconds"]} s; checked with `crane_pyg.data.load_mmrec`.',
              '']
    return '\n'.join(lines)


def _package_version() -> str:
    import crane_pyg
    return crane_pyg.__version__
