r"""User multimodal profiles: users inherit the content of their items."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from torch_geometric.utils import scatter

from crane_pyg.nn.backend import (
    Adjacency,
    _check_edge_index,
    _check_edge_weight,
    _check_index_range,
    gcn_norm_bipartite,
)
from crane_pyg.nn.conv import GraphInput, _AdjacencyPropagation, _check_nodes

NORMALIZATIONS = ('mean', 'sym', 'sum')


class UserProfileAggregation(_AdjacencyPropagation):
    r"""Builds user profiles from item features with one sparse
    message-passing step item :math:`\to` user (CRANE, Sec. "user
    multimodal profiles"):

    .. math::
        \text{mean:}\quad \mathbf{p}_u = \frac{1}{|\mathcal{N}(u)|}
            \sum_{i \in \mathcal{N}(u)} \mathbf{x}_i, \qquad
        \text{sym:}\quad \mathbf{p}_u = \sum_{i \in \mathcal{N}(u)}
            \frac{\mathbf{x}_i}{\sqrt{|\mathcal{N}(u)|\,|\mathcal{N}(i)|}},
        \qquad
        \text{sum:}\quad \mathbf{p}_u = \sum_{i \in \mathcal{N}(u)} \mathbf{x}_i.

    With edge weights :math:`w_{ui}` the counts become weighted degrees
    (``mean``: :math:`\sum_i w_{ui}\mathbf{x}_i / \sum_i w_{ui}`). Item
    features may have any trailing shape, e.g. ``[I, d]`` for one modality or
    ``[I, M, d]`` for all :math:`M` modalities at once (one sparse product
    for all of them). **Users without items get a zero profile.** Items
    without users do not contribute; in ``sym`` mode :math:`|\mathcal{N}(i)|`
    is the item's degree in the given graph.

    Args:
        normalize (str): ``'mean'``, ``'sym'`` or ``'sum'``. (default: 'mean')
        cached (bool): reuse the adjacency built on the first call until
            :meth:`reset_cache` (a graph of different shape raises).
            (default: False)
        backend (str): sparse backend, see
            :func:`~crane_pyg.nn.backend.resolve_backend`. (default: 'auto')

    Shapes:
        - **input:** ``x_item`` :math:`(I, *)`, ``edge_index`` :math:`(2, E)`
          (row 0 user ids, row 1 item ids) or an
          :class:`~crane_pyg.nn.backend.Adjacency` of size :math:`(U, I)`
          (used as given), ``num_users`` :math:`U`, ``edge_weight``
          :math:`(E)` (optional);
        - **output:** :math:`(U, *)`.

    Cost: :math:`O(E F)` with :math:`F` the number of features per item.
    """

    def __init__(self, normalize: str = 'mean', cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(cached=cached, backend=backend, **kwargs)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"UserProfileAggregation: normalize must be one of "
                             f"{list(NORMALIZATIONS)}, got {normalize!r}")
        self.normalize = normalize

    def adjacency(self, edge_index: GraphInput, num_users: int, num_items: int,
                  edge_weight: Optional[Tensor] = None) -> Adjacency:
        r"""The normalised ``[U, I]`` aggregation matrix (cached when
        ``cached=True``)."""
        if isinstance(edge_index, Adjacency):
            return edge_index
        _check_edge_index(edge_index)
        _check_edge_weight(edge_weight, edge_index.size(1))

        def build() -> Adjacency:
            _check_index_range(edge_index, num_users, num_items, 'users', 'items')
            weight = edge_weight
            if self.normalize == 'sym':
                weight = gcn_norm_bipartite(edge_index, num_users, num_items, edge_weight)
            elif self.normalize == 'mean':
                if weight is None:
                    weight = torch.ones(edge_index.size(1), device=edge_index.device)
                deg = scatter(weight, edge_index[0], 0, dim_size=num_users, reduce='sum')
                inv = deg.reciprocal().masked_fill(deg <= 0, 0.0)
                weight = weight * inv[edge_index[0]]
            return Adjacency.from_edge_index(edge_index, weight, size=(num_users, num_items),
                                             backend=self.backend)

        key = (int(num_users), int(num_items), int(edge_index.size(1)))
        return self._from_cache(key, edge_weight, edge_index.device, build)

    def forward(self, x_item: Tensor, edge_index: GraphInput, num_users: int,
                edge_weight: Optional[Tensor] = None) -> Tensor:
        _check_nodes(x_item, 'x_item')
        adj = self.adjacency(edge_index, int(num_users), x_item.size(0), edge_weight)
        if adj.size != (int(num_users), x_item.size(0)):
            raise ValueError(f"UserProfileAggregation: the adjacency has size "
                             f"{adj.size} but num_users={num_users} and x_item has "
                             f"{x_item.size(0)} rows")
        return self._propagate_adj(adj, x_item)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(normalize={self.normalize!r}, '
                f'cached={self.cached}, backend={self.backend!r})')
