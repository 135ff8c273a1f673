r"""CRANE's training loss with a cache of the items' semantic codes
(``train.semantic_cache``), in the spirit of historical embeddings
(Fey et al., "GNNAutoScale", ICML 2021).

The exact loss (:meth:`crane_pyg.models.CRANE.loss`) runs the modality
encoders and RCA on *every* item at every step, so a step costs
:math:`O(I (R M d^2 + \sum_m d_m d))` and an epoch grows with the square of
the catalogue. :class:`CachedSemanticCRANE` runs them only on the rows the
step reads directly: the batch's positive, negative and contrastive items
(and the batch's users' profiles, which CRANE precomputes per user). Every
other item's RCA code :math:`\mathbf{z}_i` comes from a cache: computed for
all items without gradient (dropout off) at the first step of every epoch and
then every ``refresh_every`` steps of it, and stored in float32. The step's
fresh codes replace their rows of the cache, and the rest of the semantic
view is computed as in the exact loss from that mixed table: the item-graph
smoothing :math:`\hat{\mathbf{S}}^{L_{ii}} \mathbf{z}`, the users' item mean
and the normalisation are sparse or row-wise products of cost :math:`O(\mathrm{nnz}\,
d)` and :math:`O(I d)`, not :math:`O(I d^2)`. Gradient reaches the encoders
and RCA through the batch's rows only (a neighbour's code is a constant of
the step, as a historical embedding is).

Right after a refresh the cache holds the codes the current weights give
(with ``rca_dropout = 0`` they equal the exact loss's), so the loss *value*
equals the exact one; between refreshes the neighbours' codes lag the
weights by at most ``refresh_every - 1`` optimizer steps.

Evaluation does not use the cache (:meth:`~crane_pyg.models.CRANE.embeddings`
computes every item exactly): the trainer's evaluation with the cache on is
that with it off. The cache is refreshed at every epoch start, so it is
rebuilt from the checkpoint's weights on resume and a resumed run is exact.

Needs ``precompute_profiles=True`` (CRANE's default) when the user view uses
the profiles: otherwise a user's profile reads every item's encoding.

The codes and their schedule are a :class:`SemanticCodeCache`; the
sampled-subgraph loss :class:`~crane_pyg.models.MiniBatchCRANE` reads the
same cache (``train.semantic_cache`` with ``train.num_neighbors``), so that
neither the propagation nor the content side of a step grows with the
catalogue.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from crane_pyg.models.crane import CRANE

__all__ = ['CachedSemanticCRANE', 'SemanticCodeCache']


class SemanticCodeCache:
    r"""The cache of every item's RCA code :math:`\mathbf{z}_i` of a
    :class:`~crane_pyg.models.CRANE`, ``[I, d]`` in float32, and its refresh
    schedule (see the module docstring): :meth:`next_step` returns the codes
    a training step reads, refreshing them first at the first step of an
    epoch and every ``refresh_every`` steps of it. Shared by the full-graph
    :class:`CachedSemanticCRANE` and the sampled-subgraph
    :class:`~crane_pyg.models.MiniBatchCRANE`.

    Args:
        model (CRANE): the model whose codes are cached.
        refresh_every (int): steps between refreshes. (default: ``1``)
    """

    def __init__(self, model: nn.Module, refresh_every: int = 1) -> None:
        if not isinstance(model, CRANE):
            raise TypeError(f'train.semantic_cache supports CRANE only, got '
                            f'{type(model).__name__}; set train.semantic_cache to null')
        if int(refresh_every) < 1:
            raise ValueError(f'refresh_every must be >= 1, got {refresh_every!r}')
        if model.needs_z_user and model.use_profiles and not model.precompute_profiles:
            # a user's profile would read every item's encoding in each step
            raise ValueError('train.semantic_cache needs CRANE precompute_profiles=True (the '
                             'default) when the user view uses the profiles')
        self.model = model
        self.refresh_every = int(refresh_every)
        #: the cached codes (``None`` before the first refresh)
        self.codes: Optional[Tensor] = None
        #: refreshes done (for tests and logs)
        self.refreshes = 0
        self._step = 0
        self._refreshed_at = -1  # the step (of the epoch) of the last refresh

    def on_epoch_start(self, epoch: int) -> None:
        r"""Restarts the step count: the next step refreshes the cache
        (unless :meth:`refresh` is called first)."""
        self._step = 0
        self._refreshed_at = -1

    @torch.no_grad()
    def refresh(self) -> None:
        r"""Recomputes every item's code (no gradient, dropout off, under the
        caller's autocast; stored in float32)."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            self.codes = model.rca(model.encode_items()).float()
        finally:
            model.train(was_training)
        self._refreshed_at = self._step
        self.refreshes += 1

    def skip_next_refresh(self) -> None:
        r"""The next step reads the current codes even when a refresh is due
        (benchmarks time the steps and the refreshes apart)."""
        self._refreshed_at = self._step

    def next_step(self) -> Tensor:
        r"""The codes of the coming training step, refreshed first when due."""
        if self.codes is None or (self._step % self.refresh_every == 0
                                  and self._refreshed_at != self._step):
            self.refresh()
        self._step += 1
        return self.codes

    def __repr__(self) -> str:
        return f'{type(self).__name__}(refresh_every={self.refresh_every})'


class CachedSemanticCRANE(nn.Module):
    r"""The training loss of a :class:`~crane_pyg.models.CRANE` with the
    semantic cache (see the module docstring); ``forward(users, pos_items,
    neg_items) -> (loss, parts)`` like the model's :meth:`loss`.

    Args:
        model (CRANE): the model (shares its parameters).
        refresh_every (int): refresh the cache every this many steps of an
            epoch (and at its first step). (default: ``1``: every step, the
            cost of the exact forward without its backward)
    """

    def __init__(self, model: nn.Module, refresh_every: int = 1) -> None:
        super().__init__()
        #: the items' codes and their refresh schedule
        self.cache = SemanticCodeCache(model, refresh_every)
        self.model = model
        self.last_stats: Dict[str, int] = {}

    @property
    def refreshes(self) -> int:
        r"""Refreshes of the cache so far."""
        return self.cache.refreshes

    def on_epoch_start(self, epoch: int) -> None:
        r"""The next step refreshes the cache (:meth:`SemanticCodeCache.on_epoch_start`)."""
        self.cache.on_epoch_start(epoch)

    def forward(self, users: Tensor, pos_items: Tensor,
                neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        model = self.model
        cache = self.cache.next_step()
        model.check_batch(users, pos_items, neg_items)
        batch_users, user_pos = torch.unique(users, return_inverse=True)
        parts = model.behavioural_parts(train_graph=model.training)
        e_user, e_item = model.sum_parts(parts)
        batch_items = pos_items[:0]
        if model.lambda_cl > 0:
            batch_items, = model.cl_subset(torch.unique(pos_items))
        rows = torch.cat([pos_items, neg_items, batch_items])
        fresh = torch.unique(rows)
        z_fresh, z_user = model.semantic_codes(model.encode_items(fresh), batch_users)
        z_item = cache.index_copy(0, fresh, z_fresh.to(cache.dtype))
        h_user, h_item = model.semantic_from_codes(z_item, z_user, batch_users)
        self.last_stats = {'fresh_items': int(fresh.numel()), 'items': int(cache.size(0))}
        e_user = e_user.index_select(0, batch_users)
        e_rows, h_rows = e_item.index_select(0, rows), h_item.index_select(0, rows)
        return model.objective(users, pos_items, neg_items, user_pos, e_user, h_user,
                               e_rows, h_rows,
                               model.contrastive_views(parts, batch_users, batch_items))

    def extra_repr(self) -> str:
        return f'refresh_every={self.cache.refresh_every}'
