r"""Full-ranking top-:math:`K` evaluation (the MMRec protocol).

For a user :math:`u` with held-out (relevant) items :math:`\mathcal{R}_u`,
:math:`n_u = |\mathcal{R}_u|`, and ranked list :math:`\pi_u` (all items except
the masked ones, by decreasing score), let :math:`r_j = 1[\pi_u(j) \in
\mathcal{R}_u]` be the hit at position :math:`j = 1, 2, \ldots` Then

.. math::
    \mathrm{Recall@}K &= \frac{1}{n_u} \sum_{j=1}^{K} r_j, \qquad
    \mathrm{Precision@}K = \frac{1}{K} \sum_{j=1}^{K} r_j, \qquad
    \mathrm{Hit@}K = \max_{j \leq K} r_j,

    \mathrm{NDCG@}K &= \frac{\sum_{j=1}^{K} r_j / \log_2(j + 1)}
    {\sum_{j=1}^{\min(n_u, K)} 1 / \log_2(j + 1)},

    \mathrm{MAP@}K &= \frac{1}{\min(n_u, K)} \sum_{j=1}^{K} r_j \,
    \frac{\sum_{l=1}^{j} r_l}{j}.

These are MMRec's definitions (``recall_``, ``ndcg_``, ``precision_``, ``map_``
in its ``utils/metrics.py``), and the same as PyG's
:class:`~torch_geometric.metrics.LinkPredRecall`,
:class:`~torch_geometric.metrics.LinkPredNDCG`,
:class:`~torch_geometric.metrics.LinkPredPrecision`,
:class:`~torch_geometric.metrics.LinkPredMAP` (whose MAP normaliser is
``label_count.clamp(max=k)``, i.e. :math:`\min(n_u, K)`) and
:class:`~torch_geometric.metrics.LinkPredHitRatio`. A user with
:math:`n_u = 0` gets 0 for every metric (the evaluator never includes one).

This module depends on nothing but :mod:`torch`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = ['METRIC_NAMES', 'ranking_metrics', 'FullRankingEvaluator']

#: the metrics computed at every cut-off, in output order
METRIC_NAMES: tuple[str, ...] = ('recall', 'ndcg', 'precision', 'map', 'hit')

# Same as crane_pyg.data.schema.USER_ITEM; repeated so that this module
# depends on nothing but torch (docs/ARCHITECTURE.md).
_USER_ITEM = ('user', 'interacts', 'item')
_SPLIT_ATTR = {'valid': 'val_edge_index', 'test': 'test_edge_index'}


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks, )
    ks = tuple(ks)
    if len(ks) == 0:
        raise ValueError("'ks' must hold at least one cut-off")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every cut-off in 'ks' must be a positive int "
                             f"(got {ks})")
    if len(set(ks)) != len(ks):
        raise ValueError(f"'ks' has duplicates: {ks}")
    return ks


def ranking_metrics(
    topk_hits: Tensor,
    num_relevant: Tensor,
    ks: Sequence[int] = (10, 20, 50),
) -> dict[str, Tensor]:
    r"""Per-user Recall, NDCG, Precision, MAP and Hit at every cut-off in
    ``ks`` (formulas in :mod:`crane_pyg.metrics.ranking`).

    Args:
        topk_hits (BoolTensor): ``[B, K_max]``, ``topk_hits[b, j]`` is
            :obj:`True` when the item ranked at position ``j`` (0-based) for
            user ``b`` is relevant; ``K_max >= max(ks)``.
        num_relevant (LongTensor): ``[B]``, the number :math:`n_u` of relevant
            (held-out) items of every user, at least the number of hits.
        ks (Sequence[int]): the cut-offs :math:`K`.

    Returns:
        ``{f'{metric}@{k}': Tensor[B]}`` for ``metric`` in
        :data:`METRIC_NAMES` and ``k`` in ``ks`` (floating point, default
        dtype).
    """
    ks = _check_ks(ks)
    if not isinstance(topk_hits, Tensor) or topk_hits.dim() != 2:
        raise ValueError("'topk_hits' must be a 2-D tensor [batch, K_max]")
    if topk_hits.dtype != torch.bool:
        raise ValueError(f"'topk_hits' must be a bool tensor "
                         f"(got {topk_hits.dtype})")
    batch, k_max = topk_hits.shape
    if not isinstance(num_relevant, Tensor) or num_relevant.shape != (batch, ):
        raise ValueError(f"'num_relevant' must be a tensor of shape [{batch}] "
                         f"(got {getattr(num_relevant, 'shape', None)})")
    if num_relevant.is_floating_point() or num_relevant.dtype == torch.bool:
        raise ValueError(f"'num_relevant' must be an integer tensor "
                         f"(got {num_relevant.dtype})")
    if max(ks) > k_max:
        raise ValueError(f"'topk_hits' holds {k_max} positions but "
                         f"max(ks) = {max(ks)}")
    device = topk_hits.device
    num_relevant = num_relevant.to(device)
    dtype = torch.get_default_dtype()

    rel = topk_hits.to(dtype)
    num_hits = rel.cumsum(dim=1)  # [B, K_max]
    bad = num_hits[:, -1] > num_relevant
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"row {b} of 'topk_hits' has {int(num_hits[b, -1])} "
                         f"hits but num_relevant[{b}] = "
                         f"{int(num_relevant[b])}")
    pos = torch.arange(1, k_max + 1, device=device, dtype=dtype)
    discount = (pos + 1).log2()
    dcg = (rel / discount).cumsum(dim=1)
    idcg_table = torch.cat([discount.new_zeros(1),
                            (1.0 / discount).cumsum(dim=0)])  # [K_max + 1]
    ap_sum = (rel * num_hits / pos).cumsum(dim=1)
    n = num_relevant.to(dtype)
    has_rel = num_relevant > 0

    out: dict[str, Tensor] = {}
    for k in ks:
        hits_k = num_hits[:, k - 1]
        cut = num_relevant.clamp(max=k)
        denom = cut.to(dtype)
        zero = hits_k.new_zeros(())
        out[f'recall@{k}'] = torch.where(has_rel, hits_k / n.clamp(min=1),
                                         zero)
        out[f'ndcg@{k}'] = torch.where(
            has_rel, dcg[:, k - 1] / idcg_table[cut].clamp(min=1e-12), zero)
        out[f'precision@{k}'] = hits_k / k
        out[f'map@{k}'] = torch.where(has_rel,
                                      ap_sum[:, k - 1] / denom.clamp(min=1),
                                      zero)
        out[f'hit@{k}'] = (hits_k > 0).to(dtype)
    return {f'{name}@{k}': out[f'{name}@{k}']
            for name in METRIC_NAMES for k in ks}


class _CSR:
    r"""Deduplicated (user, item) pairs as a CSR over users plus the sorted
    global keys ``user * num_items + item``."""
    def __init__(self, edge_index: Tensor, num_users: int, num_items: int,
                 device: torch.device, what: str) -> None:
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 \
                or edge_index.size(0) != 2:
            shape = getattr(edge_index, 'shape', type(edge_index))
            raise ValueError(f"{what} must be a [2, E] tensor (got {shape})")
        if edge_index.is_floating_point():
            raise ValueError(f"{what} must be an integer tensor "
                             f"(got {edge_index.dtype})")
        edge_index = edge_index.to(device=device, dtype=torch.long)
        user, item = edge_index[0], edge_index[1]
        if user.numel() > 0:
            for name, idx, n in (('user', user, num_users),
                                 ('item', item, num_items)):
                bad = (idx < 0) | (idx >= n)
                if bool(bad.any()):
                    e = int(bad.nonzero()[0])
                    raise ValueError(
                        f"{what}[:, {e}] has {name} id {int(idx[e])}, outside "
                        f"[0, {n})")
        key = torch.unique(user * num_items + item)  # sorted
        self.key = key
        self.user = torch.div(key, num_items, rounding_mode='floor')
        self.item = key - self.user * num_items
        count = torch.bincount(self.user, minlength=num_users)
        self.count = count
        self.rowptr = torch.cat([count.new_zeros(1), count.cumsum(0)])
        self.num_items = num_items

    def gather(self, users: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(batch_row, item)`` of all pairs of the given users."""
        start = self.rowptr[users]
        count = self.rowptr[users + 1] - start
        batch_row = torch.repeat_interleave(
            torch.arange(users.numel(), device=users.device), count)
        offset = torch.cumsum(count, 0) - count
        pos = (torch.arange(batch_row.numel(), device=users.device)
               - offset[batch_row] + start[batch_row])
        return batch_row, self.item[pos]

    def contains(self, users: Tensor, items: Tensor) -> Tensor:
        r"""Bool tensor of ``items.shape``: is ``(users[b], items[b, j])`` a
        pair (sorted-key lookup, no ``[B, I]`` allocation)."""
        if self.key.numel() == 0:
            return torch.zeros_like(items, dtype=torch.bool)
        query = users.view(-1, 1) * self.num_items + items
        pos = torch.searchsorted(self.key, query)
        pos = pos.clamp_(max=self.key.numel() - 1)
        return self.key[pos] == query


class FullRankingEvaluator:
    r"""Full-ranking evaluation over all items, batched over users.

    For every evaluated user, the scores of all :math:`I` items are computed by
    ``score_fn``, the user's *training* items are set to :math:`-\infty`, the
    top-:math:`\max(K)` items are taken with :func:`torch.topk` and compared
    with the user's held-out items of ``split``; the per-user metrics of
    :func:`ranking_metrics` are averaged over the evaluated users.

    Evaluated users are those with at least one held-out interaction in
    ``split`` **and** at least one training interaction
    (``data['user'].has_train``); held-out users without training items are
    counted in :attr:`num_users_without_train` and excluded. Duplicate
    held-out pairs count once.

    Masking follows MMRec: for ``split='test'`` only the training items are
    masked, *not* the validation items (a validation item ranked in the top-K
    occupies a slot without being a hit). ``mask_valid_in_test=True`` also
    masks the validation items at test time (the stricter protocol: every
    item the user interacted with before the test period is excluded).
    Items scored :math:`-\infty` (masked, or so scored by the model) are
    never counted as hits; this only matters for users with fewer than
    :math:`\max(K)` unmasked items, and a catalogue smaller than
    :math:`\max(K)` pads the ranked list with misses.

    Args:
        data (HeteroData): from :func:`crane_pyg.data.load_mmrec`: training
            edges in ``data['user', 'interacts', 'item'].edge_index``, held-out
            ones in ``.val_edge_index`` / ``.test_edge_index``.
        split (str): ``'valid'`` or ``'test'``.
        ks (Sequence[int]): cut-offs (default ``(10, 20, 50)``).
        batch_size (int): users scored at once (memory :math:`O(B \cdot I)`).
        device (torch.device, optional): where the users passed to
            ``score_fn`` and the index structures live; default the device of
            the training ``edge_index``. Scores may come back on any device;
            masking and top-k run where the scores are.
        mask_valid_in_test (bool): for ``split='test'``, also mask validation
            items (default :obj:`False`, as MMRec).

    Example:
        >>> evaluator = FullRankingEvaluator(data, split='valid')
        >>> user_emb, item_emb = model.embeddings()
        >>> evaluator.evaluate(lambda u: user_emb[u] @ item_emb.t())
        {'recall@10': 0.05, ..., 'hit@50': 0.31}
    """
    def __init__(
        self,
        data: Any,
        split: str = 'valid',
        ks: Sequence[int] = (10, 20, 50),
        batch_size: int = 1024,
        device: Optional[Union[str, torch.device]] = None,
        mask_valid_in_test: bool = False,
    ) -> None:
        if split not in _SPLIT_ATTR:
            raise ValueError(f"'split' must be 'valid' or 'test' "
                             f"(got {split!r})")
        self.ks = _check_ks(ks)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
                or batch_size < 1:
            raise ValueError(f"'batch_size' must be a positive int "
                             f"(got {batch_size!r})")
        self.split = split
        self.batch_size = batch_size
        self.mask_valid_in_test = bool(mask_valid_in_test)

        store = data[_USER_ITEM]
        train = store.edge_index
        self.device = torch.device(device) if device is not None \
            else train.device
        U = int(data['user'].num_nodes)
        #: the number of items ranked for every user
        self.num_items: int = int(data['item'].num_nodes)
        attr = _SPLIT_ATTR[split]
        if attr not in store:
            raise ValueError(f"data[{_USER_ITEM}] has no {attr!r} (held-out "
                             f"interactions of split {split!r})")
        heldout = store[attr]

        masked = train
        if split == 'test' and self.mask_valid_in_test:
            if 'val_edge_index' not in store:
                raise ValueError(f"mask_valid_in_test=True but data"
                                 f"[{_USER_ITEM}] has no 'val_edge_index'")
            masked = torch.cat(
                [train, store.val_edge_index.to(train.device)], dim=1)
        I = self.num_items
        self._mask = _CSR(masked, U, I, self.device,
                          f"data[{_USER_ITEM}].edge_index")
        self._heldout = _CSR(heldout, U, I, self.device,
                             f"data[{_USER_ITEM}].{attr}")

        if 'has_train' in data['user']:
            has_train = data['user'].has_train.to(self.device, torch.bool)
            if has_train.shape != (U, ):
                raise ValueError(f"data['user'].has_train must have shape "
                                 f"[{U}] (got {tuple(has_train.shape)})")
        else:
            has_train = torch.bincount(train[0].to(self.device),
                                       minlength=U) > 0
        has_heldout = self._heldout.count > 0
        #: the evaluated users, ascending
        self.users: Tensor = (has_heldout & has_train).nonzero().view(-1)
        #: the number of evaluated users
        self.num_users: int = int(self.users.numel())
        #: users with held-out items in ``split`` but no training item
        #: (excluded)
        self.num_users_without_train: int = int(
            (has_heldout & ~has_train).sum())
        #: held-out items per evaluated user, aligned with :attr:`users`
        self.num_relevant: Tensor = self._heldout.count[self.users]
        if self.users.numel() == 0:
            raise ValueError(f"no user has both a training interaction and a "
                             f"held-out {split!r} interaction: nothing to "
                             f"evaluate")
        self.num_heldout_in_train = int(
            self._mask.contains(self._heldout.user, self._heldout.item.view(
                -1, 1)).sum()) if self._heldout.key.numel() else 0
        if self.num_heldout_in_train > 0:
            warnings.warn(
                f"{self.num_heldout_in_train} held-out {split!r} pairs are "
                f"also masked (training) pairs; they can never be hits but "
                f"count in Recall's denominator", stacklevel=2)

    @property
    def max_k(self) -> int:
        return max(self.ks)

    @torch.no_grad()
    def _masked_topk(self, score_fn: Callable[[Tensor], Tensor],
                     users: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores = score_fn(users)
        if not isinstance(scores, Tensor) or scores.shape != (
                users.numel(), self.num_items):
            raise ValueError(
                f"score_fn must return a tensor of shape [{users.numel()}, "
                f"{self.num_items}] (got "
                f"{getattr(scores, 'shape', type(scores))})")
        if not scores.is_floating_point():
            raise ValueError(f"score_fn must return floating scores "
                             f"(got {scores.dtype})")
        scores = scores.detach()
        if bool(torch.isnan(scores).any()):
            raise ValueError('score_fn returned NaN scores')
        dev = scores.device
        row, item = self._mask.gather(users)
        # Out of place: score_fn may return a view of the model's state.
        scores = scores.index_put(
            (row.to(dev), item.to(dev)),
            torch.tensor(float('-inf'), dtype=scores.dtype, device=dev))
        values, index = scores.topk(min(k, self.num_items), dim=1)
        return values.to(self.device), index.to(self.device)

    @torch.no_grad()
    def recommend(self, score_fn: Callable[[Tensor], Tensor],
                  users: Tensor, k: Optional[int] = None) -> Tensor:
        r"""Top-``k`` items (``k`` defaults to ``max(ks)``) for ``users``, with
        this evaluator's masking; ``[len(users), min(k, I)]``."""
        users = torch.as_tensor(users, dtype=torch.long, device=self.device)
        return self._masked_topk(score_fn, users.view(-1), k or self.max_k)[1]

    @torch.no_grad()
    def evaluate_per_user(
            self, score_fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        r"""Per-user metrics, ``{name: Tensor[num_users]}`` aligned with
        :attr:`users` (e.g. for significance tests)."""
        k_max = self.max_k
        chunks: list[dict[str, Tensor]] = []
        for start in range(0, self.num_users, self.batch_size):
            users = self.users[start:start + self.batch_size]
            values, index = self._masked_topk(score_fn, users, k_max)
            hits = self._heldout.contains(users, index)
            hits &= values != float('-inf')
            if hits.size(1) < k_max:  # catalogue smaller than max(ks)
                hits = torch.cat([hits, hits.new_zeros(
                    hits.size(0), k_max - hits.size(1))], dim=1)
            chunks.append(ranking_metrics(
                hits, self.num_relevant[start:start + self.batch_size],
                self.ks))
        return {name: torch.cat([c[name] for c in chunks])
                for name in chunks[0]}

    @torch.no_grad()
    def evaluate(self,
                 score_fn: Callable[[Tensor], Tensor]) -> dict[str, float]:
        r"""Metrics averaged over the evaluated users, keys
        ``'{metric}@{k}'`` (e.g. ``'recall@20'``), metric-major order.

        Args:
            score_fn: ``users: LongTensor[B] -> Tensor[B, I]`` scores of all
                items (higher is better); it is called under
                :func:`torch.no_grad` and its output is not modified.
        """
        per_user = self.evaluate_per_user(score_fn)
        return {name: float(value.double().mean())
                for name, value in per_user.items()}

    def __repr__(self) -> str:
        extra = ', mask_valid_in_test=True' if self.mask_valid_in_test else ''
        return (f'{self.__class__.__name__}(split={self.split!r}, '
                f'ks={self.ks}, num_users={self.num_users}, '
                f'num_items={self.num_items}, '
                f'batch_size={self.batch_size}{extra})')
