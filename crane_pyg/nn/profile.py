r"""User multimodal profiles: users inherit the content of their items."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from torch_geometric.utils import scatter

from crane_pyg.nn.backend import gcn_norm_bipartite
from crane_pyg.nn.conv import _BipartitePropagation

NORMALIZATIONS = ('mean', 'sym', 'sum')


class UserProfileAggregation(_BipartitePropagation):
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

    Messages flow from ``edge_index[0]`` (items) to ``edge_index[1]``
    (users), PyG's ``source_to_target`` order: the graph is
    ``data['item', 'rev_interacts', 'user'].edge_index`` (or the flipped
    user-item edges), and in :class:`~torch_geometric.nn.HeteroConv` the
    layer sits on that edge type. With edge weights :math:`w_{iu}` the counts
    become weighted degrees (``mean``: :math:`\sum_i w_{iu}\mathbf{x}_i /
    \sum_i w_{iu}`). Item features may have any trailing shape, e.g.
    ``[I, d]`` for one modality or ``[I, M, d]`` for all :math:`M`
    modalities at once (one sparse product for all of them). **Users without
    items get a zero profile.** Items without users do not contribute; in
    ``sym`` mode :math:`|\mathcal{N}(i)|` is the item's degree in the given
    graph.

    Args:
        normalize (str): ``'mean'``, ``'sym'`` or ``'sum'``. (default: 'mean')
        cached (bool): reuse the adjacency built on the first call until
            :meth:`reset_cache` (a graph of different shape raises).
            (default: False)
        backend (str): sparse backend, see
            :func:`~crane_pyg.nn.backend.resolve_backend`. (default: 'auto')

    Shapes:
        - **input:** ``x`` = ``(x_item, x_user)`` (``x_user`` only gives
          :math:`U` and may be :obj:`None` when ``size`` is given) or
          ``x_item`` :math:`(I, *)` with ``size`` :math:`(I, U)`;
          ``edge_index`` :math:`(2, E)` item :math:`\to` user (or an
          ``EdgeIndex``, a ``SparseTensor`` / ``torch.sparse`` ``adj_t`` of
          size :math:`(U, I)`), ``edge_weight`` :math:`(E)` (optional);
        - **output:** :math:`(U, *)`.

    Cost: :math:`O(E F)` with :math:`F` the number of features per item.
    """

    NODE_NAMES = ('items', 'users')

    def __init__(self, normalize: str = 'mean', cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"UserProfileAggregation: normalize must be one of "
                             f"{list(NORMALIZATIONS)}, got {normalize!r}")
        super().__init__(normalize, cached, backend, **kwargs)

    def normalized_weight(self, edge_index: Tensor, edge_weight: Optional[Tensor],
                          num_items: int, num_users: int) -> Optional[Tensor]:
        if self.normalize == 'sym':
            return gcn_norm_bipartite(edge_index, num_items, num_users, edge_weight)
        if self.normalize == 'sum':
            return edge_weight
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
        deg = scatter(edge_weight, edge_index[1], 0, dim_size=num_users, reduce='sum')
        inv = deg.reciprocal().masked_fill(deg <= 0, 0.0)
        return edge_weight * inv[edge_index[1]]
