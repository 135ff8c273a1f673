r"""Parameter-free propagation layers for the dual graph of CRANE.

* :class:`UserItemConv`: one LightGCN step on the bipartite user-item graph;
* :class:`ItemItemConv`: one weighted step on a homogeneous (item-item) graph;
* :class:`LayerCombination`: :math:`L` steps of either, combined over layers.

Every layer is a :class:`~torch_geometric.nn.conv.MessagePassing` with both an
edge-level path (:meth:`message` + :meth:`aggregate`, used by the
``'scatter'`` and ``'torch_scatter'`` backends) and a fused sparse path
(:meth:`message_and_aggregate`, used by ``'torch_sparse'``, ``'torch_csr'``
and ``'edge_index'``); see :mod:`crane_pyg.nn.backend`.
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
from torch_geometric.utils import spmm

from crane_pyg.nn.precision import float32_sparse
from crane_pyg.nn.backend import (
    Adjacency,
    EdgeIndex,
    edge_scatter,
    gcn_norm_bipartite,
    resolve_backend,
    sym_norm,
)

GraphInput = Union[Tensor, Adjacency]


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

    def aggregate(self, inputs: Tensor, index: Tensor, ptr: Optional[Tensor] = None,
                  dim_size: Optional[int] = None,
                  adjacency: Optional[Adjacency] = None) -> Tensor:
        r"""Sum of the messages per receiving node, with ``torch_scatter`` for
        the ``'torch_scatter'`` backend and native ``scatter_add_`` else."""
        backend = adjacency.backend if adjacency is not None else 'scatter'
        return edge_scatter(inputs, index, int(dim_size), backend)

    def message_and_aggregate(self, edge_index: Any, x: Tensor,
                              edge_weight: Optional[Tensor] = None,
                              adjacency: Optional[Adjacency] = None) -> Tensor:
        r"""Fused sparse product :math:`\mathbf{A}\mathbf{X}` in the
        backend's form (``torch_sparse.matmul``, ``torch.sparse.mm`` or
        ``EdgeIndex.matmul``). ``edge_index`` is the sparse object passed to
        :meth:`propagate` (``SparseTensor``, ``torch.sparse_csr`` tensor or
        ``EdgeIndex`` sorted by target); when the :class:`Adjacency` it came
        from is given, its product is used (for ``EdgeIndex`` that is the
        row-sorted matrix form, see :class:`~crane_pyg.nn.backend.Adjacency`)."""
        if adjacency is not None:
            return adjacency.matmul(x)
        if EdgeIndex is not None and isinstance(edge_index, EdgeIndex):
            return edge_index.matmul(x, input_value=edge_weight, transpose=True)
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


class UserItemConv(_AdjacencyPropagation):
    r"""One LightGCN propagation step on the bipartite user-item graph
    (He et al., `"LightGCN" <https://arxiv.org/abs/2002.02126>`_):

    .. math::
        \mathbf{e}_u' = \sum_{i \in \mathcal{N}(u)}
            \frac{1}{\sqrt{|\mathcal{N}(u)|\,|\mathcal{N}(i)|}} \mathbf{e}_i,
        \qquad
        \mathbf{e}_i' = \sum_{u \in \mathcal{N}(i)}
            \frac{1}{\sqrt{|\mathcal{N}(u)|\,|\mathcal{N}(i)|}} \mathbf{e}_u,

    i.e. :math:`\mathbf{E}' = \mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}
    \mathbf{E}` with the symmetric :math:`(U+I) \times (U+I)` adjacency
    :math:`\mathbf{A} = \begin{bmatrix} \mathbf{0} & \mathbf{R} \\
    \mathbf{R}^\top & \mathbf{0} \end{bmatrix}`, computed as two sparse
    products with :math:`\hat{\mathbf{R}}` (``[U, I]``) and its transpose,
    without building the :math:`(U+I)`-node graph. With edge weights
    :math:`w_{ui}`, :math:`\hat{R}_{ui} = w_{ui} / \sqrt{d_u d_i}` with
    weighted degrees (:func:`~crane_pyg.nn.backend.gcn_norm_bipartite`).
    With ``normalize=False`` :math:`\hat{R}_{ui} = w_{ui}` (1 by default).
    Isolated users/items get zero output.

    Args:
        normalize (bool): apply the symmetric normalisation. (default: True)
        cached (bool): build the normalised adjacency (both directions) on
            the first call and reuse it; call :meth:`reset_cache` when the
            graph changes. A call with a graph of different shape (number of
            users, items or edges) raises. (default: False)
        backend (str): sparse backend, see
            :func:`~crane_pyg.nn.backend.resolve_backend`. (default: 'auto')

    Shapes:
        - **input:** ``x_user`` :math:`(U, *)`, ``x_item`` :math:`(I, *)`
          (same trailing shape), ``edge_index`` :math:`(2, E)` with row 0
          user ids and row 1 item ids, or a prebuilt
          :class:`~crane_pyg.nn.backend.Adjacency` of size :math:`(U, I)`
          (used as given: no normalisation, no caching), ``edge_weight``
          :math:`(E)` (optional);
        - **output:** ``(out_user`` :math:`(U, *)`, ``out_item``
          :math:`(I, *)`\ ``)``.

    Cost: :math:`O(E F)` time per call (:math:`F` = features per node),
    :math:`O(E)` extra memory for the adjacency.
    """

    def __init__(self, normalize: bool = True, cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(cached=cached, backend=backend, **kwargs)
        self.normalize = bool(normalize)

    def adjacency(self, edge_index: GraphInput, num_users: int, num_items: int,
                  edge_weight: Optional[Tensor] = None) -> Adjacency:
        r"""The (normalised) ``[U, I]`` adjacency :math:`\hat{\mathbf{R}}` this
        layer propagates with (its transpose is ``.t()``); taken from / stored
        in the cache when ``cached=True``."""
        if isinstance(edge_index, Adjacency):
            return edge_index

        def build() -> Adjacency:
            weight = edge_weight
            if self.normalize:
                weight = gcn_norm_bipartite(edge_index, num_users, num_items, edge_weight)
            adj = Adjacency.from_edge_index(edge_index, weight, size=(num_users, num_items),
                                            backend=self.backend)
            if self.cached:
                adj.t()  # build the item <- user direction once, too
            return adj

        key = (int(num_users), int(num_items), int(edge_index.size(-1)))
        return self._from_cache(key, edge_weight, edge_index.device, build)

    def forward(self, x_user: Tensor, x_item: Tensor, edge_index: GraphInput,
                edge_weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        _check_nodes(x_user, 'x_user')
        _check_nodes(x_item, 'x_item')
        num_users, num_items = x_user.size(0), x_item.size(0)
        adj = self.adjacency(edge_index, num_users, num_items, edge_weight)
        if adj.size != (num_users, num_items):
            raise ValueError(f"UserItemConv: the adjacency has size {adj.size} but "
                             f"x_user/x_item have {num_users}/{num_items} rows")
        out_user = self._propagate_adj(adj, x_item)
        out_item = self._propagate_adj(adj.t(), x_user)
        return out_user, out_item

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(normalize={self.normalize}, '
                f'cached={self.cached}, backend={self.backend!r})')


class ItemItemConv(_AdjacencyPropagation):
    r"""One weighted propagation step on a homogeneous graph (the item-item
    semantic kNN graph of CRANE / FREEDOM):

    .. math::
        \mathbf{h}_i' = \sum_{(i, j) \in \mathcal{E}} w_{ij} \, \mathbf{h}_j,
        \qquad \mathbf{H}' = \mathbf{S}\mathbf{H}, \quad S_{ij} = w_{ij}.

    **Direction:** a column ``(i, j)`` of ``edge_index`` is the entry
    :math:`S_{ij}`: node ``edge_index[0]`` *receives* from node
    ``edge_index[1]`` (the matrix convention of
    :class:`~crane_pyg.nn.backend.Adjacency`, as in FREEDOM's kNN adjacency
    where row :math:`i` holds the top-:math:`k` neighbours of item
    :math:`i`). This is the reverse of PyG's ``source_to_target`` flow; it
    makes no difference for a symmetric graph.

    The kNN graph of :class:`crane_pyg.transforms.ItemKNNGraph` is already
    normalised, hence ``normalize=False`` by default; ``normalize=True``
    replaces the weights by :math:`\mathbf{D}^{-1/2}\mathbf{S}\mathbf{D}^{-1/2}`
    with row sums :math:`\mathbf{D}` (:func:`~crane_pyg.nn.backend.sym_norm`).

    Args:
        normalize (bool): apply :func:`sym_norm`. (default: False)
        cached (bool): reuse the adjacency built on the first call until
            :meth:`reset_cache` (see :class:`UserItemConv`). (default: False)
        backend (str): sparse backend. (default: 'auto')

    Shapes:
        - **input:** ``x`` :math:`(N, *)`, ``edge_index`` :math:`(2, nnz)` or an
          :class:`~crane_pyg.nn.backend.Adjacency` of size :math:`(N, N)`
          (used as given), ``edge_weight`` :math:`(nnz)` (optional, 1 if
          absent);
        - **output:** :math:`(N, *)`.

    Cost: :math:`O(nnz \cdot F)` per call, :math:`O(k I F)` for a kNN graph.
    """

    def __init__(self, normalize: bool = False, cached: bool = False,
                 backend: str = 'auto', **kwargs: Any) -> None:
        super().__init__(cached=cached, backend=backend, **kwargs)
        self.normalize = bool(normalize)

    def adjacency(self, edge_index: GraphInput, num_nodes: int,
                  edge_weight: Optional[Tensor] = None) -> Adjacency:
        r"""The ``[N, N]`` adjacency :math:`\mathbf{S}` this layer propagates
        with; taken from / stored in the cache when ``cached=True``."""
        if isinstance(edge_index, Adjacency):
            return edge_index

        def build() -> Adjacency:
            weight = edge_weight
            if self.normalize:
                weight = sym_norm(edge_index, edge_weight, num_nodes)
            return Adjacency.from_edge_index(edge_index, weight, size=(num_nodes, num_nodes),
                                             backend=self.backend)

        key = (int(num_nodes), int(edge_index.size(-1)))
        return self._from_cache(key, edge_weight, edge_index.device, build)

    def forward(self, x: Tensor, edge_index: GraphInput,
                edge_weight: Optional[Tensor] = None) -> Tensor:
        _check_nodes(x, 'x')
        adj = self.adjacency(edge_index, x.size(0), edge_weight)
        if adj.size != (x.size(0), x.size(0)):
            raise ValueError(f"ItemItemConv: the adjacency has size {adj.size} but x "
                             f"has {x.size(0)} rows")
        return self._propagate_adj(adj, x)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(normalize={self.normalize}, '
                f'cached={self.cached}, backend={self.backend!r})')


class LayerCombination(torch.nn.Module):
    r"""Stacks :math:`L` steps of a propagation layer and combines the
    layer outputs, as LightGCN does:

    .. math::
        \mathbf{X}^{(l+1)} = \mathrm{conv}(\mathbf{X}^{(l)}), \qquad
        \mathbf{out} = \sum_{l=0}^{L} \alpha_l \mathbf{X}^{(l)},

    with :math:`\alpha_l = 1 / (L + 1)` (the mean over layers, layer 0 being
    the input) by default. The adjacency is built once per call (or taken
    from the conv's cache) and shared by the :math:`L` steps.

    Works with :class:`UserItemConv` (``x`` is the pair
    ``(x_user, x_item)`` and the output a pair) and :class:`ItemItemConv`
    (``x`` a tensor).

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
            adj = self.conv.adjacency(edge_index, x_user.size(0), x_item.size(0), edge_weight)
            out_user, out_item = self.alpha[0] * x_user, self.alpha[0] * x_item
            for layer in range(1, self.num_layers + 1):
                x_user, x_item = self.conv(x_user, x_item, adj)
                out_user = out_user + self.alpha[layer] * x_user
                out_item = out_item + self.alpha[layer] * x_item
            return out_user, out_item

        if not isinstance(x, Tensor):
            raise TypeError("LayerCombination(ItemItemConv) expects x to be a tensor")
        _check_nodes(x, 'x')
        adj = self.conv.adjacency(edge_index, x.size(0), edge_weight)
        out = self.alpha[0] * x
        for layer in range(1, self.num_layers + 1):
            x = self.conv(x, adj)
            out = out + self.alpha[layer] * x
        return out

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}({self.conv}, num_layers={self.num_layers})'
