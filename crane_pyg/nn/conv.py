r"""Parameter-free propagation layers for the dual graph of CRANE.

* :class:`UserItemConv`: one LightGCN step on a (bipartite) graph;
* :class:`ItemItemConv`: one weighted step on a homogeneous (item-item) graph;
* :class:`LayerCombination`: :math:`L` steps of either, combined over layers
  (both directions of the user-item graph).

One convention, PyG's: messages flow from ``edge_index[0]`` to
``edge_index[1]`` (``flow='source_to_target'``), a sparse matrix is PyG's
``adj_t`` (rows receive), and a bipartite layer takes ``(x_src, x_dst)`` and
returns the target side, so the layers compose in
:class:`~torch_geometric.nn.HeteroConv` and :func:`~torch_geometric.nn.to_hetero`.

Every layer is a :class:`~torch_geometric.nn.conv.MessagePassing` with
PyG's edge-level path (:meth:`message` + PyG's sum aggregation, the
``'scatter'`` backend) and a fused sparse path (:meth:`message_and_aggregate`,
the ``'torch_csr'`` and ``'edge_index'`` backends); see
:mod:`crane_pyg.nn.backend`.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
from typing import Any, Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torch_geometric.nn.conv import MessagePassing
from torch_geometric.typing import PairTensor
from torch_geometric.utils import is_sparse, spmm, to_edge_index

from crane_pyg.nn.precision import float32_sparse
from crane_pyg.nn.backend import (
    Adjacency,
    EdgeIndex,
    _check_edge_index,
    _check_edge_weight,
    _check_index_range,
    gcn_norm_bipartite,
    resolve_backend,
    sym_norm,
)

#: what the layers accept as a graph: PyG's ``Adj`` (an ``edge_index`` tensor,
#: an ``EdgeIndex``, a ``SparseTensor`` or a ``torch.sparse`` matrix) or a
#: prebuilt :class:`~crane_pyg.nn.backend.Adjacency`
GraphInput = Any


def _check_nodes(x: Tensor, name: str, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"'{name}' must have at least {min_dim} dimension(s) "
                         f"[num_nodes, ...], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"'{name}' must be a floating point tensor, got {x.dtype}")


class _AdjacencyPropagation(MessagePassing):
    r"""Base class: computes :math:`\mathbf{A}\mathbf{X}` for an
    :class:`~crane_pyg.nn.backend.Adjacency` through
    :meth:`MessagePassing.propagate`, and keeps the normalised adjacency
    when ``cached=True``.

    Subclasses build their adjacency in :meth:`adjacency`.
    """
    SUPPORTS_FUSED_EDGE_INDEX = True  # `EdgeIndex` sorted by target -> fused path

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if 'propagate' not in cls.__dict__:  # see propagate() below
            cls.propagate = _AdjacencyPropagation.propagate

    def propagate(self, edge_index: Any, size: Optional[Tuple[int, int]] = None,
                  **kwargs: Any) -> Tensor:
        r""":meth:`MessagePassing.propagate`, unchanged. Defined in every
        subclass (:meth:`__init_subclass__`) so that PyG does not render its
        ``propagate`` template into a module file in the temporary directory
        for each layer class (it leaves classes with their own ``propagate``
        as they are); those files were never removed."""
        return super().propagate(edge_index, size=size, **kwargs)

    def __init__(self, cached: bool = False, backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(aggr='add', node_dim=0, **kwargs)
        self.cached = bool(cached)
        self.backend = resolve_backend(backend)
        self._cached_adj: Optional[Adjacency] = None
        self._cache_key: Optional[Hashable] = None

    def reset_parameters(self) -> None:
        r"""The layer has no parameters; this drops the cached adjacency."""
        super().reset_parameters()
        self.reset_cache()

    def reset_cache(self) -> None:
        r"""Drops the cached adjacency; the next call rebuilds it from the
        graph it is given (call it after changing the graph, e.g. after edge
        dropout)."""
        self._cached_adj = None
        self._cache_key = None

    def _from_cache(self, key: Hashable, edge_weight: Optional[Tensor],
                    device: torch.device, build) -> Adjacency:
        if not self.cached:
            return build()
        if edge_weight is not None and edge_weight.requires_grad:
            raise ValueError(f"{self.__class__.__name__}(cached=True) cannot cache an "
                             f"adjacency built from an edge_weight that requires "
                             f"grad; use cached=False for learned edge weights")
        if self._cached_adj is None:
            self._cached_adj = build()
            self._cache_key = key
        elif self._cache_key != key:
            raise ValueError(f"{self.__class__.__name__}(cached=True) was called with "
                             f"a graph of a different shape ({key}) than the cached "
                             f"one ({self._cache_key}); call reset_cache() after "
                             f"changing the graph")
        if self._cached_adj.device != device:
            self._cached_adj = self._cached_adj.to(device)
        return self._cached_adj

    def _propagate_adj(self, adj: Adjacency, x: Tensor) -> Tensor:
        r"""Computes ``adj @ x`` through :meth:`propagate` (``x``: ``[n_cols, *]``)."""
        if x.size(0) != adj.num_cols:
            raise ValueError(f"{self.__class__.__name__}: expected {adj.num_cols} "
                             f"source nodes for a {adj.num_rows} x {adj.num_cols} "
                             f"adjacency, got features of shape {list(x.shape)}")
        edge_index, edge_weight, size = adj.propagate_inputs()
        x2, fp32 = float32_sparse(x.reshape(x.size(0), -1))  # float32 under train.precision
        with fp32:
            out = self.propagate(edge_index, x=x2, edge_weight=edge_weight, size=size,
                                 adjacency=adj)
        return out.reshape(adj.num_rows, *x.shape[1:])

    def message(self, x_j: Tensor, edge_weight: Optional[Tensor]) -> Tensor:
        r"""Edge-level message :math:`w_{ij} \mathbf{x}_j`."""
        if edge_weight is None:
            return x_j
        return edge_weight.to(x_j.dtype).view(-1, 1) * x_j

    def message_and_aggregate(self, edge_index: Any, x: Tensor,
                              adjacency: Optional[Adjacency] = None) -> Tensor:
        r"""Fused sparse product :math:`\mathbf{A}\mathbf{X}` of the
        :class:`~crane_pyg.nn.backend.Adjacency` the sparse ``edge_index``
        came from (``torch.sparse.mm`` or the row-sorted ``EdgeIndex``
        product); PyG's :func:`~torch_geometric.utils.spmm` without it."""
        if adjacency is not None:
            return adjacency.matmul(x)
        return spmm(edge_index, x, reduce='sum')


def _remove_rendered_templates(pid: int = os.getpid()) -> None:
    r"""At exit, deletes the module files PyG rendered from its
    ``MessagePassing`` templates into the temporary directory in this process
    (e.g. for PyG's own ``LGConv`` in mini-batch mode), so that runs leave no
    files in ``$TMPDIR``. Such a module is named ``<module>_<class>_propagate``
    (or ``_edge_updater``) and its file ``<that name>_<random>.py``."""
    if os.getpid() != pid:  # a forked child: the files are its parent's
        return
    tmp = os.path.realpath(tempfile.gettempdir())
    for name, module in list(sys.modules.items()):
        path = getattr(module, '__file__', None)
        if (name.endswith(('_propagate', '_edge_updater')) and path
                and os.path.dirname(os.path.realpath(path)) == tmp
                and os.path.basename(path).startswith(f'{name}_')):
            with contextlib.suppress(OSError):
                os.unlink(path)


atexit.register(_remove_rendered_templates)


def _edges(edge_index: GraphInput, edge_weight: Optional[Tensor]
           ) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``(edge_index, edge_weight)`` in PyG's source-to-target order from any
    of PyG's adjacency types: an ``edge_index`` tensor or
    :class:`~torch_geometric.EdgeIndex` ``[2, E]`` (row 0 sends, row 1
    receives), or a :class:`torch_sparse.SparseTensor` / ``torch.sparse``
    matrix in PyG's ``adj_t`` form (rows receive, columns send; its values,
    if any, are the weights)."""
    if is_sparse(edge_index):
        if edge_weight is not None:
            raise ValueError('edge_weight must be None for a sparse adjacency '
                             '(its values are the weights)')
        if isinstance(edge_index, Tensor):  # torch.sparse
            (row, col), value = to_edge_index(edge_index)
        else:  # SparseTensor
            row, col, value = edge_index.coo()
        return torch.stack([col, row]), value  # rows of adj_t receive
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a Tensor, EdgeIndex, SparseTensor or "
                        f"torch.sparse tensor, got {type(edge_index).__name__}")
    if EdgeIndex is not None and isinstance(edge_index, EdgeIndex):
        edge_index = edge_index.as_tensor()
    return edge_index, edge_weight


def _pair(x: Union[Tensor, PairTensor, Tuple[Tensor, Optional[Tensor]]],
          size: Optional[Tuple[int, int]], name: str) -> Tuple[Tensor, int]:
    r"""``(x_src, num_dst)`` of a layer input ``x`` (a tensor, or a pair
    ``(x_src, x_dst)`` whose ``x_dst`` only gives the number of targets and
    may be :obj:`None` when ``size = (num_src, num_dst)`` is given)."""
    if isinstance(x, Tensor):
        x_src, x_dst = x, x
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        x_src, x_dst = x
    else:
        raise TypeError(f"{name}: x must be a tensor or a pair (x_src, x_dst), "
                        f"got {type(x).__name__}")
    _check_nodes(x_src, f'{name}: x_src')
    if size is not None and size[1] is not None:
        num_dst = int(size[1])
    elif x_dst is not None:
        num_dst = x_dst.size(0)
    else:
        raise ValueError(f"{name}: give x_dst or size=(num_src, num_dst) for the "
                         f"number of target nodes")
    return x_src, num_dst


class _BipartitePropagation(_AdjacencyPropagation):
    r"""Base of the layers below: ``forward(x, edge_index, edge_weight,
    size)`` with ``x`` a tensor or ``(x_src, x_dst)``, messages flowing from
    ``edge_index[0]`` to ``edge_index[1]``; the output is the target side.
    Subclasses give :meth:`normalized_weight`."""
    NODE_NAMES = ('source nodes', 'target nodes')  # for error messages

    def __init__(self, normalize: Any, cached: bool = False, backend: str = 'auto',
                 **kwargs: Any) -> None:
        super().__init__(cached=cached, backend=backend, **kwargs)
        self.normalize = normalize

    def normalized_weight(self, edge_index: Tensor, edge_weight: Optional[Tensor],
                          num_src: int, num_dst: int) -> Optional[Tensor]:
        r"""The edge weights of :math:`\hat{\mathbf{A}}`: :meth:`norm` of the
        given ones with ``normalize=True``, the given ones else."""
        if not self.normalize:
            return edge_weight
        return self.norm(edge_index, edge_weight, num_src, num_dst)

    def adjacency(self, edge_index: GraphInput, num_src: int, num_dst: int,
                  edge_weight: Optional[Tensor] = None) -> Adjacency:
        r"""The normalised :math:`\hat{\mathbf{A}}` (``[num_dst, num_src]``,
        rows receive) this layer propagates with, taken from / stored in the
        cache when ``cached=True``. An
        :class:`~crane_pyg.nn.backend.Adjacency` is used as given."""
        if isinstance(edge_index, Adjacency):
            return edge_index
        edge_index, edge_weight = _edges(edge_index, edge_weight)
        _check_edge_index(edge_index)
        _check_edge_weight(edge_weight, edge_index.size(1))

        def build() -> Adjacency:
            _check_index_range(edge_index, num_src, num_dst, *self.NODE_NAMES)
            weight = self.normalized_weight(edge_index, edge_weight, num_src, num_dst)
            adj = Adjacency.from_edge_index(edge_index.flip(0), weight,
                                            size=(num_dst, num_src), backend=self.backend)
            if self.cached:
                adj.t()  # the reverse direction, built once, too
            return adj

        key = (int(num_src), int(num_dst), int(edge_index.size(1)))
        return self._from_cache(key, edge_weight, edge_index.device, build)

    def forward(self, x: Union[Tensor, PairTensor], edge_index: GraphInput,
                edge_weight: Optional[Tensor] = None,
                size: Optional[Tuple[int, int]] = None) -> Tensor:
        name = self.__class__.__name__
        x_src, num_dst = _pair(x, size, name)
        adj = self.adjacency(edge_index, x_src.size(0), num_dst, edge_weight)
        if adj.size != (num_dst, x_src.size(0)):
            raise ValueError(f"{name}: the adjacency is {adj.size} (targets x sources) "
                             f"but the input has {x_src.size(0)} source and {num_dst} "
                             f"target nodes")
        return self._propagate_adj(adj, x_src)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(normalize={self.normalize!r}, '
                f'cached={self.cached}, backend={self.backend!r})')


class UserItemConv(_BipartitePropagation):
    r"""One LightGCN step (He et al., `"LightGCN"
    <https://arxiv.org/abs/2002.02126>`_) from source to target nodes of a
    (bipartite) graph, e.g. users :math:`\to` items:

    .. math::
        \mathbf{x}_i' = \sum_{u \in \mathcal{N}(i)}
            \frac{w_{ui}}{\sqrt{d_u \, d_i}} \mathbf{x}_u,
        \qquad d_u = \sum_{i'} w_{ui'}, \quad d_i = \sum_{u'} w_{u'i},

    with :math:`w_{ui} = 1` without edge weights (so :math:`d` are the
    degrees) and :math:`\hat{w}_{ui} = w_{ui}` with ``normalize=False``.
    Messages flow from ``edge_index[0]`` to ``edge_index[1]``, as in PyG's
    ``MessagePassing(flow='source_to_target')``; the output is the target
    side, so the layer composes in :class:`~torch_geometric.nn.HeteroConv`
    (one instance per edge type, e.g. ``('user', 'interacts', 'item')`` and
    ``('item', 'rev_interacts', 'user')``) and equals PyG's
    :class:`~torch_geometric.nn.conv.LGConv` on the homogeneous graph. Both
    directions of the symmetric :math:`(U+I) \times (U+I)` LightGCN step are
    :class:`LayerCombination`'s job (it reuses one cached adjacency and its
    transpose). Isolated targets get zero output.

    Args:
        normalize (bool): apply the symmetric normalisation. (default: True)
        cached (bool): build the normalised adjacency on the first call and
            reuse it (as PyG's ``gcn_norm``-based layers do); call
            :meth:`reset_cache` when the graph changes. A call with a graph of
            another shape (number of sources, targets or edges) raises.
            (default: False)
        backend (str): sparse backend, see
            :func:`~crane_pyg.nn.backend.resolve_backend`. (default: 'auto')

    Shapes:
        - **input:** ``x`` :math:`(N, *)` or ``(x_src, x_dst)``
          :math:`((N_s, *), (N_t, *))` (``x_dst`` only gives :math:`N_t`; it
          may be :obj:`None` when ``size`` is given), ``edge_index``
          :math:`(2, E)` / :class:`~torch_geometric.EdgeIndex`, or a
          ``SparseTensor`` / ``torch.sparse`` ``adj_t`` of size
          :math:`(N_t, N_s)`, ``edge_weight`` :math:`(E)` (optional),
          ``size`` :math:`(N_s, N_t)` (optional);
        - **output:** :math:`(N_t, *)`.

    Cost: :math:`O(E F)` time per call (:math:`F` = features per node),
    :math:`O(E)` extra memory for the adjacency.
    """

    norm = staticmethod(lambda index, weight, n_src, n_dst:
                        gcn_norm_bipartite(index, n_src, n_dst, weight))

    def __init__(self, normalize: bool = True, cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(bool(normalize), cached, backend, **kwargs)


class ItemItemConv(_BipartitePropagation):
    r"""One weighted propagation step on a homogeneous (item-item) graph, the
    semantic kNN graph of CRANE / FREEDOM:

    .. math::
        \mathbf{h}_i' = \sum_{j \in \mathcal{N}(i)} w_{ji} \, \mathbf{h}_j,
        \qquad \mathbf{H}' = \hat{\mathbf{A}} \mathbf{H}, \quad
        \hat{A}_{ij} = w_{ji},

    for every edge :math:`(j, i)` = ``(edge_index[0], edge_index[1])``:
    messages flow from source to target, as in PyG's
    ``MessagePassing(flow='source_to_target')`` and as
    :class:`~crane_pyg.transforms.ItemKNNGraph` writes the graph, so
    ``ItemItemConv()(x, *ItemKNNGraph()(data)['item', 'similar', 'item']
    [edge_index, edge_weight])`` is FREEDOM's :math:`\hat{\mathbf{S}}
    \mathbf{x}` (and equals PyG's
    :class:`~torch_geometric.nn.conv.SimpleConv`).

    The kNN graph of :class:`~crane_pyg.transforms.ItemKNNGraph` is already
    normalised, hence ``normalize=False`` by default; ``normalize=True``
    uses :math:`w_{ji} / \sqrt{d_i d_j}` with the in-degrees
    :math:`d_i = \sum_j w_{ji}` (PyG's ``gcn_norm`` without self-loops).

    Args:
        normalize (bool): apply the symmetric normalisation. (default: False)
        cached (bool): reuse the adjacency built on the first call until
            :meth:`reset_cache` (see :class:`UserItemConv`). (default: False)
        backend (str): sparse backend. (default: 'auto')

    Shapes:
        - **input:** ``x`` :math:`(N, *)`, ``edge_index`` :math:`(2, E)` /
          :class:`~torch_geometric.EdgeIndex`, or a ``SparseTensor`` /
          ``torch.sparse`` ``adj_t`` :math:`(N, N)`, ``edge_weight``
          :math:`(E)` (optional, 1 if absent);
        - **output:** :math:`(N, *)`.

    Cost: :math:`O(E F)` per call, :math:`O(k I F)` for a kNN graph.
    """

    norm = staticmethod(lambda index, weight, n_src, n_dst:  # in-degrees: rows of adj_t
                        sym_norm(index.flip(0), weight, n_dst))

    def __init__(self, normalize: bool = False, cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(bool(normalize), cached, backend, **kwargs)


class LayerCombination(torch.nn.Module):
    r"""Stacks :math:`L` steps of a propagation layer and combines the
    layer outputs, as LightGCN does:

    .. math::
        \mathbf{X}^{(l+1)} = \mathrm{conv}(\mathbf{X}^{(l)}), \qquad
        \mathbf{out} = \sum_{l=0}^{L} \alpha_l \mathbf{X}^{(l)},

    with :math:`\alpha_l = 1 / (L + 1)` (the mean over layers, layer 0 being
    the input) by default. The adjacency is built once per call (or taken
    from the conv's cache) and shared by the :math:`L` steps.

    Works with :class:`UserItemConv` on the user-item graph (``x`` is the
    pair ``(x_user, x_item)``, ``edge_index`` the user :math:`\to` item
    edges, and every step runs both directions, users :math:`\leftarrow`
    items with the transposed adjacency: the output is the pair
    ``(out_user, out_item)``) and with :class:`ItemItemConv` (``x`` a
    tensor).

    Args:
        conv (UserItemConv or ItemItemConv): the step.
        num_layers (int): :math:`L \geq 0`.
        alpha (float or Sequence[float] or torch.Tensor, optional): the
            weights :math:`\alpha_l`, one per layer :math:`0..L` (a scalar
            is used for every layer). (default: :obj:`None`: mean)

    Example:
        >>> enc = LayerCombination(UserItemConv(cached=True), num_layers=2)
        >>> e_user, e_item = enc((user_emb.weight, item_emb.weight), edge_index)
        >>> h_item = LayerCombination(ItemItemConv(), 1)(z_item, knn_index, knn_weight)
    """

    def __init__(self, conv: Union[UserItemConv, ItemItemConv], num_layers: int,
                 alpha: Optional[Union[float, Sequence[float], Tensor]] = None) -> None:
        super().__init__()
        if not isinstance(conv, (UserItemConv, ItemItemConv)):
            raise TypeError(f"LayerCombination expects a UserItemConv or ItemItemConv, "
                            f"got {type(conv).__name__}")
        if int(num_layers) < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.conv = conv
        self.num_layers = int(num_layers)
        if alpha is None:
            alpha = 1.0 / (self.num_layers + 1)
        alpha = torch.as_tensor(alpha, dtype=torch.float)
        if alpha.dim() == 0:
            alpha = alpha.repeat(self.num_layers + 1)
        if alpha.shape != (self.num_layers + 1, ):
            raise ValueError(f"alpha must be a scalar or have num_layers + 1 = "
                             f"{self.num_layers + 1} entries, got shape "
                             f"{list(alpha.shape)}")
        self.register_buffer('alpha', alpha)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()

    def forward(self, x: Union[Tensor, Tuple[Tensor, Tensor]], edge_index: GraphInput,
                edge_weight: Optional[Tensor] = None
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(self.conv, UserItemConv):
            if not (isinstance(x, (tuple, list)) and len(x) == 2):
                raise TypeError("LayerCombination(UserItemConv) expects x = (x_user, x_item)")
            x_user, x_item = x
            _check_nodes(x_user, 'x_user')
            _check_nodes(x_item, 'x_item')
            # [I, U]: items receive from users; its transpose: users from items
            adj = self.conv.adjacency(edge_index, x_user.size(0), x_item.size(0), edge_weight)
            out_user, out_item = self.alpha[0] * x_user, self.alpha[0] * x_item
            for layer in range(1, self.num_layers + 1):
                x_user, x_item = (self.conv((x_item, x_user), adj.t()),
                                  self.conv((x_user, x_item), adj))
                out_user = out_user + self.alpha[layer] * x_user
                out_item = out_item + self.alpha[layer] * x_item
            return out_user, out_item

        if not isinstance(x, Tensor):
            raise TypeError("LayerCombination(ItemItemConv) expects x to be a tensor")
        _check_nodes(x, 'x')
        adj = self.conv.adjacency(edge_index, x.size(0), x.size(0), edge_weight)
        out = self.alpha[0] * x
        for layer in range(1, self.num_layers + 1):
            x = self.conv(x, adj)
            out = out + self.alpha[layer] * x
        return out

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.conv}, num_layers={self.num_layers})'
