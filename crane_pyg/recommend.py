r"""Top-k recommendations from a trained run (``crane-pyg recommend``).

:func:`recommend_batches` ranks the whole catalogue for batches of users
with the model's own scores (:meth:`Recommender.recommend
<crane_pyg.models.Recommender.recommend>`), or through a faiss inner-product
index (``index='faiss'``, optional extra ``crane_pyg[faiss]``: exact
``IndexFlatIP`` search without a dense ``[users, items]`` score matrix in
torch; the same ranking, since every model scores by the inner product of
:meth:`~crane_pyg.models.Recommender.embeddings`). A user's training items are
never recommended; ``exclude_heldout=True`` also excludes the validation and
test items. :func:`write_recommendations` writes CSV (``user,rank,item,score``)
or JSON lines (``{"user", "items", "scores"}``) in the dataset's original ids
when ``user_map.csv`` / ``item_map.csv`` exist.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from crane_pyg.data.prepare import ITEM_MAP, USER_MAP
from crane_pyg.data.schema import USER_ITEM

__all__ = ['INDEXES', 'FORMATS', 'UnknownIdError', 'read_id_map', 'parse_user_ids',
           'read_user_file', 'excluded_pairs', 'recommend_batches', 'write_recommendations']

#: ranking back-ends: the model's scores in torch, or a faiss inner-product index
INDEXES = ('torch', 'faiss')
#: output formats
FORMATS = ('csv', 'jsonl')


class UnknownIdError(ValueError):
    r"""A requested user id is not in the dataset."""


def read_id_map(folder: Optional[Path], kind: str) -> Optional[list[str]]:
    r"""Original ids by new id from ``user_map.csv`` / ``item_map.csv`` of
    :obj:`folder` (written by ``crane-pyg prepare``), or :obj:`None`."""
    if folder is None:
        return None
    path = Path(folder) / (USER_MAP if kind == 'user' else ITEM_MAP)
    if not path.is_file():
        return None
    with path.open(encoding='utf-8', newline='') as f:
        rows = list(csv.reader(f))
    ids = [row[1] for row in rows[1:]]
    if [row[0] for row in rows[1:]] != [str(i) for i in range(len(ids))]:
        raise ValueError(f'{path}: the first column must list the ids 0, 1, 2, ... in order')
    return ids


def parse_user_ids(tokens: Iterable[tuple[str, str]], num_users: int,
                   id_map: Optional[Sequence[str]]) -> Tensor:
    r"""User ids (``LongTensor``) from ``(token, where)`` pairs: original ids
    when :obj:`id_map` is given, else 0-based ids. ``where`` names the source
    in errors (e.g. ``'users.txt, line 3'``)."""
    lookup = {original: i for i, original in enumerate(id_map)} if id_map is not None else None
    out = []
    for token, where in tokens:
        if lookup is not None:
            if token not in lookup:
                raise UnknownIdError(f'{where}: unknown user {token!r} (not in {USER_MAP})')
            out.append(lookup[token])
            continue
        try:
            value = int(token)
        except ValueError:
            raise UnknownIdError(f'{where}: user {token!r} is not an integer id') from None
        if not 0 <= value < num_users:
            raise UnknownIdError(f'{where}: unknown user {value} (ids are 0..{num_users - 1})')
        out.append(value)
    return torch.tensor(out, dtype=torch.long)


def read_user_file(path: Path) -> list[tuple[str, str]]:
    r"""``(id, 'file, line n')`` for every non-empty line of :obj:`path`
    (lines starting with ``#`` are comments)."""
    try:
        text = Path(path).read_text(encoding='utf-8-sig')
    except OSError as exc:
        raise UnknownIdError(f'{path}: cannot read the user file ({exc.strerror})') from None
    return [(line.strip(), f'{path}, line {n}') for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith('#')]


def excluded_pairs(data, heldout: bool = False) -> Tensor:
    r"""The ``[2, E]`` (user, item) pairs never recommended: the training
    interactions, plus validation and test ones when :obj:`heldout`."""
    store = data[USER_ITEM]
    parts = [store.edge_index]
    if heldout:
        parts += [store[name] for name in ('val_edge_index', 'test_edge_index') if name in store]
    return torch.cat(parts, dim=1)


def _faiss_topk(user_emb: Tensor, item_emb: Tensor, users: Tensor, k: int,
                excluded_keys: Tensor, excluded_count: Tensor,
                index) -> tuple[Tensor, Tensor]:
    num_items = item_emb.size(0)
    extra = int(excluded_count[users].max()) if users.numel() else 0
    depth = min(k + extra, num_items)
    scores, items = index.search(user_emb[users].float().contiguous().numpy(), depth)
    scores, items = torch.from_numpy(scores), torch.from_numpy(items).long()
    if excluded_keys.numel():
        query = users.view(-1, 1) * num_items + items.clamp(min=0)
        position = torch.searchsorted(excluded_keys, query).clamp(max=excluded_keys.numel() - 1)
        banned = (excluded_keys[position] == query) | (items < 0)
    else:
        banned = items < 0
    order = torch.argsort(banned.to(torch.int8), dim=1, stable=True)[:, :k]
    scores, items = scores.gather(1, order), items.gather(1, order)
    gone = banned.gather(1, order)
    scores[gone], items[gone] = -math.inf, -1
    if scores.size(1) < k:  # catalogue too small after exclusion
        pad = k - scores.size(1)
        scores = torch.cat([scores, scores.new_full((scores.size(0), pad), -math.inf)], 1)
        items = torch.cat([items, items.new_full((items.size(0), pad), -1)], 1)
    return scores, items


@torch.no_grad()
def recommend_batches(model, data, users: Tensor, k: int, *, exclude_heldout: bool = False,
                      batch_size: int = 1024,
                      index: str = 'torch') -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    r"""Yields ``(users, scores, items)`` for consecutive batches of
    :obj:`users`; ``scores`` / ``items`` are ``[B, k]`` by decreasing score
    (``item -1`` pads a user with fewer than :obj:`k` items left).

    Raises:
        ValueError: :obj:`k` larger than the catalogue or below 1, an unknown
            index.
        RuntimeError: ``index='faiss'`` without the faiss package.
    """
    if index not in INDEXES:
        raise ValueError(f'index must be one of {list(INDEXES)}, got {index!r}')
    num_items = model.num_items
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f'k must be a positive int, got {k!r}')
    if k > num_items:
        raise ValueError(f'k = {k} is larger than the catalogue ({num_items} items)')
    exclude = excluded_pairs(data, exclude_heldout)
    model.eval()
    embeddings = model.embeddings()
    if index == 'torch':
        for start in range(0, users.numel(), batch_size):
            batch = users[start:start + batch_size]
            scores, items = model.recommend(batch, k, exclude=exclude, batch_size=batch_size,
                                            embeddings=embeddings)
            yield batch, scores, items
        return
    try:
        import faiss
    except ImportError as exc:
        raise RuntimeError(f"index 'faiss' needs the faiss-cpu package ({exc}); "
                           f"pip install 'crane_pyg[faiss]' or use --index torch") from None
    user_emb, item_emb = (e.detach().float().cpu() for e in embeddings)
    search = faiss.IndexFlatIP(item_emb.size(1))
    search.add(item_emb.contiguous().numpy())
    keys = torch.unique(exclude[0].long() * num_items + exclude[1].long())  # sorted
    count = torch.bincount(keys // num_items, minlength=model.num_users)
    for start in range(0, users.numel(), batch_size):
        batch = users[start:start + batch_size]
        scores, items = _faiss_topk(user_emb, item_emb, batch, k, keys, count, search)
        yield batch, scores, items


def write_recommendations(batches: Iterable[tuple[Tensor, Tensor, Tensor]], out: IO[str],
                          fmt: str = 'csv', user_ids: Optional[Sequence[str]] = None,
                          item_ids: Optional[Sequence[str]] = None) -> int:
    r"""Writes :func:`recommend_batches`' output to :obj:`out`; returns the
    number of users written. CSV: header ``user,rank,item,score``, one line
    per recommended item, rank from 1; JSON lines: one object per user,
    ``{"user": ..., "items": [...], "scores": [...]}``. Ids are the
    original ones when :obj:`user_ids` / :obj:`item_ids` are given."""
    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {list(FORMATS)}, got {fmt!r}')
    writer = csv.writer(out, lineterminator='\n') if fmt == 'csv' else None
    if writer is not None:
        writer.writerow(['user', 'rank', 'item', 'score'])
    written = 0
    for users, scores, items in batches:
        for user, row_scores, row_items in zip(users.tolist(), scores.tolist(), items.tolist()):
            name = user_ids[user] if user_ids is not None else user
            kept = [(i, s) for i, s in zip(row_items, row_scores) if i >= 0]
            names = [item_ids[i] if item_ids is not None else i for i, _ in kept]
            values = [float(f'{s:.6g}') for _, s in kept]
            if writer is not None:
                writer.writerows([name, rank, item, value]
                                 for rank, (item, value) in enumerate(zip(names, values), 1))
            else:
                out.write(json.dumps({'user': name, 'items': names, 'scores': values}) + '\n')
            written += 1
    return written

