r"""Sparse backend selection and a reusable normalised adjacency.

Every propagation layer of :mod:`crane_pyg.nn` multiplies a sparse matrix
:math:`\mathbf{A} \in \mathbb{R}^{n_r \times n_c}` with dense node features
:math:`\mathbf{X} \in \mathbb{R}^{n_c \times F}`. Three interchangeable
implementations ("backends") of that product are offered; all give the same
numbers (up to float rounding) and the same gradients:

============== ==================================================================
backend        implementation
============== ==================================================================
torch_csr      :class:`torch.Tensor` with layout ``torch.sparse_csr`` @ dense
               (``torch.sparse.mm``; the backward uses a CSR of
               :math:`\mathbf{A}^\top` built once)
edge_index     :class:`torch_geometric.EdgeIndex` sparse-dense matmul (PyG >= 2.5),
               on the row-sorted matrix form (the transposed product of
               PyG <= 2.8.1 has a wrong backward for non-square matrices)
scatter        PyG's edge-level path: ``message`` + ``aggregate``
               (native ``scatter_add_``); always available and the reference
               implementation in the tests
============== ==================================================================

Why these are kept (``benchmarks/backends.py``, forward + backward of both
directions of a LightGCN step, README "Sparse backends"): on CPU the two fused
backends are faster than PyG's own dispatch of the same product --
``torch_csr`` than ``spmm`` on a ``torch.sparse`` CSR ``adj_t`` (whose
autograd transposes :math:`\mathbf{A}` in every backward) and ``edge_index``
than PyG's transposed ``EdgeIndex`` product; ``scatter`` is PyG's
``MessagePassing`` path itself. The former ``torch_sparse`` and
``torch_scatter`` backends were removed: they were thin wrappers of what PyG
dispatches to for a ``SparseTensor`` and were 2-5x slower than ``torch_csr``;
the layers still accept a ``SparseTensor`` graph.

:func:`resolve_backend` turns ``'auto'`` into the first available entry of
:data:`BACKEND_PREFERENCE`; the environment variable ``CRANE_SPARSE_BACKEND``
(see :data:`BACKEND_ENV_VAR`) overrides that choice.

**Matrix convention.** :class:`Adjacency` stores :math:`\mathbf{A}` with
:math:`A_{rc} = w_e` for every column :math:`e = (r, c)` of the ``edge_index``
it is built from (row 0 = matrix row = the *receiving* node), PyG's
``adj_t``; the layers build it from their source-to-target ``edge_index``
flipped, and :meth:`Adjacency.propagate_inputs` translates it back for
``MessagePassing.propagate``.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from torch_geometric.index import index2ptr
from torch_geometric.utils import coalesce, scatter
from crane_pyg.nn.precision import float32_sparse

try:  # PyG >= 2.5
    from torch_geometric import EdgeIndex
except ImportError:  # pragma: no cover - depends on the installed PyG
    EdgeIndex = None

#: Backends in order of preference for ``resolve_backend('auto')``. The first
#: available one wins. A benchmark (``benchmarks/backends.py``) decides the
#: order; change it here only. On 2 CPU cores (benchmarks/results/backends.json,
#: UserItemConv forward + backward, d = 64) torch_csr was fastest at 50k and 200k
#: edges and within 1.14x of edge_index at 800k.
BACKEND_PREFERENCE: Tuple[str, ...] = ('torch_csr', 'edge_index', 'scatter')

#: Environment variable that overrides the backend chosen by ``'auto'``.
BACKEND_ENV_VAR = 'CRANE_SPARSE_BACKEND'

#: Backends that pass a sparse matrix object to ``MessagePassing.propagate``
#: (and hence run ``message_and_aggregate``); the others pass an
#: ``edge_index`` tensor and run ``message`` + ``aggregate``.
FUSED_BACKENDS: Tuple[str, ...] = ('torch_csr', 'edge_index')

#: name -> availability probe
_AVAILABILITY: Dict[str, Callable[[], bool]] = {
    'torch_csr': lambda: True,
    'edge_index': lambda: EdgeIndex is not None,
    'scatter': lambda: True,
}


def available_backends() -> List[str]:
    r"""The sparse backends usable in this environment, in the order of
    :data:`BACKEND_PREFERENCE` (``'scatter'`` is always among them)."""
    return [name for name in BACKEND_PREFERENCE if _AVAILABILITY[name]()]


def resolve_backend(name: Optional[str] = 'auto') -> str:
    r"""Validates a backend name and resolves ``'auto'``.

    ``'auto'`` (or :obj:`None`) returns the value of the environment variable
    ``CRANE_SPARSE_BACKEND`` when it is set and non-empty, else the first
    available backend of :data:`BACKEND_PREFERENCE`.

    Raises:
        ValueError: if the name is unknown or its package is not installed;
            the message lists the available backends.
    """
    source = 'backend'
    if name is None or name == 'auto':
        env = os.environ.get(BACKEND_ENV_VAR, '').strip()
        if not env or env == 'auto':
            return available_backends()[0]
        name, source = env, f'environment variable {BACKEND_ENV_VAR}'
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    available = available_backends()
    if name not in BACKEND_PREFERENCE:
        raise ValueError(f"Unknown sparse backend {name!r} (from {source}); "
                         f"expected 'auto' or one of {list(BACKEND_PREFERENCE)} "
                         f"(available here: {available})")
    if name not in available:
        raise ValueError(f"Sparse backend {name!r} (from {source}) is not "
                         f"available: it needs torch-geometric>=2.5. Available "
                         f"backends: {available}")
    return name


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------

def _check_edge_index(edge_index: Tensor, name: str = 'edge_index') -> None:
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor of shape [2, E], "
                        f"got {type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"'{name}' must have shape [2, E], got "
                         f"{list(edge_index.shape)}")
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool:
        raise ValueError(f"'{name}' must hold integer node indices, got dtype "
                         f"{edge_index.dtype}")


def _check_edge_weight(edge_weight: Optional[Tensor], num_edges: int,
                       name: str = 'edge_weight') -> None:
    if edge_weight is None:
        return
    if not isinstance(edge_weight, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor of shape [E], got "
                        f"{type(edge_weight).__name__}")
    if edge_weight.dim() != 1 or edge_weight.numel() != num_edges:
        raise ValueError(f"'{name}' must have shape [{num_edges}] (one weight "
                         f"per column of edge_index), got "
                         f"{list(edge_weight.shape)}")
    if not edge_weight.dtype.is_floating_point:
        raise ValueError(f"'{name}' must be a floating point tensor, got "
                         f"{edge_weight.dtype}")


def _check_index_range(edge_index: Tensor, num_rows: int, num_cols: int,
                       row_name: str = 'rows', col_name: str = 'columns',
                       name: str = 'edge_index') -> None:
    # One host sync; called once per graph (normalisation / adjacency build).
    if edge_index.numel() == 0:
        return
    lo_row, hi_row = (int(v) for v in torch.aminmax(edge_index[0]))
    lo_col, hi_col = (int(v) for v in torch.aminmax(edge_index[1]))
    if min(lo_row, lo_col) < 0:
        raise ValueError(f"'{name}' contains a negative index ({min(lo_row, lo_col)})")
    if hi_row >= num_rows:
        raise ValueError(f"'{name}' row 0 has index {hi_row}, out of range for "
                         f"{num_rows} {row_name}")
    if hi_col >= num_cols:
        raise ValueError(f"'{name}' row 1 has index {hi_col}, out of range for "
                         f"{num_cols} {col_name}")


def _inv_sqrt(deg: Tensor) -> Tensor:
    # Zero-degree (and, defensively, negative-degree) nodes get 0, never inf/NaN.
    safe = torch.where(deg > 0, deg, torch.ones_like(deg))
    return torch.where(deg > 0, safe.rsqrt(), torch.zeros_like(deg))


def gcn_norm_bipartite(
    edge_index: Tensor,
    num_users: int,
    num_items: int,
    edge_weight: Optional[Tensor] = None,
) -> Tensor:
    r"""Symmetric normalisation of a bipartite user-item graph.

    .. math::
        \hat{w}_{ui} = \frac{w_{ui}}{\sqrt{d_u \, d_i}}, \qquad
        d_u = \sum_{i} w_{ui}, \quad d_i = \sum_{u} w_{ui},

    with :math:`w_{ui} = 1` when :obj:`edge_weight` is :obj:`None` (so
    :math:`d_u = |\mathcal{N}(u)|`). This is :math:`\mathbf{D}^{-1/2}
    \mathbf{A} \mathbf{D}^{-1/2}` of the symmetric :math:`(U + I) \times
    (U + I)` LightGCN adjacency, restricted to its user-item block. Edges of
    a node with zero degree get weight 0 (no NaN/Inf); duplicate edges count
    in the degrees.

    Args:
        edge_index (torch.Tensor): ``[2, E]``, row 0 user ids in ``[0, U)``,
            row 1 item ids in ``[0, I)``.
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        edge_weight (torch.Tensor, optional): ``[E]`` non-negative weights.

    Returns:
        torch.Tensor: the normalised weights ``[E]``, aligned with
        :obj:`edge_index` (which is not changed).
    """
    _check_edge_index(edge_index)
    _check_edge_weight(edge_weight, edge_index.size(1))
    _check_index_range(edge_index, num_users, num_items, 'users', 'items')
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
    user, item = edge_index[0], edge_index[1]
    deg_user = scatter(edge_weight, user, 0, dim_size=num_users, reduce='sum')
    deg_item = scatter(edge_weight, item, 0, dim_size=num_items, reduce='sum')
    return _inv_sqrt(deg_user)[user] * edge_weight * _inv_sqrt(deg_item)[item]


def sym_norm(
    edge_index: Tensor,
    edge_weight: Optional[Tensor],
    num_nodes: int,
) -> Tensor:
    r"""Symmetric normalisation :math:`\mathbf{D}^{-1/2} \mathbf{A}
    \mathbf{D}^{-1/2}` of a square sparse matrix with row sums as degrees:

    .. math::
        \hat{w}_{rc} = \frac{w_{rc}}{\sqrt{d_r \, d_c}}, \qquad
        d_n = \sum_{c} w_{nc} \;\; \text{(row sums of } \mathbf{A}\text{)}.

    :math:`A_{rc} = w_{rc}` for each column ``(r, c)`` of :obj:`edge_index`
    (the matrix convention of :class:`Adjacency`). For a symmetric matrix row
    and column sums agree; for a directed kNN graph this is the FREEDOM /
    MMRec convention. Nodes of zero degree get 0 (no NaN/Inf).

    Args:
        edge_index (torch.Tensor): ``[2, nnz]`` indices in ``[0, num_nodes)``.
        edge_weight (torch.Tensor, optional): ``[nnz]`` non-negative values
            (:obj:`None` means 1).
        num_nodes (int): the matrix is ``num_nodes x num_nodes``.

    Returns:
        torch.Tensor: the normalised weights ``[nnz]``, aligned with
        :obj:`edge_index`.
    """
    _check_edge_index(edge_index)
    _check_edge_weight(edge_weight, edge_index.size(1))
    _check_index_range(edge_index, num_nodes, num_nodes, 'nodes', 'nodes')
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
    row, col = edge_index[0], edge_index[1]
    deg = scatter(edge_weight, row, 0, dim_size=num_nodes, reduce='sum')
    inv = _inv_sqrt(deg)
    return inv[row] * edge_weight * inv[col]


# ---------------------------------------------------------------------------
# sparse-dense products
# ---------------------------------------------------------------------------

def sparse_matmul(matrix, x: Tensor, value: Optional[Tensor] = None) -> Tensor:
    r"""Computes :math:`\mathbf{A}\mathbf{X}` for a sparse matrix
    :math:`\mathbf{A}` whose rows are the receiving nodes: a
    ``torch.sparse_csr`` tensor, or a :class:`torch_geometric.EdgeIndex`
    ``[row; col]`` sorted by row whose values are given as :obj:`value`;
    ``x``: ``[num_cols, F]``."""
    if EdgeIndex is not None and isinstance(matrix, EdgeIndex):
        if value is not None and value.dtype != x.dtype:
            value = value.to(x.dtype)
        # PyG builds torch.sparse tensors internally; opting in/out explicitly
        # (keeping the current setting) silences torch's "implicitly disabled"
        # invariant-check warning.
        checks = torch.sparse.check_sparse_tensor_invariants
        with checks(enable=checks.is_enabled()), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*Sparse CS[RC] tensor support is in beta.*')
            return matrix.matmul(x, input_value=value)
    if matrix.dtype != x.dtype:
        matrix = matrix.to(x.dtype)
    return torch.sparse.mm(matrix, x)


class _CSRMatmul(torch.autograd.Function):
    r"""``A @ x`` for a CSR ``A`` whose backward ``A^T @ grad`` uses a CSR of
    ``A^T`` built once (torch's own backward transposes ``A`` on every call,
    about 3x slower on CPU). Only for constant values: no gradient w.r.t.
    ``A``."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, matrix_t: Tensor) -> Tensor:
        ctx.matrix_t = matrix_t
        return torch.sparse.mm(matrix, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        return torch.sparse.mm(ctx.matrix_t, grad_out), None, None


def _build_csr(row: Tensor, col: Tensor, value: Tensor,
               size: Tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*Sparse CSR tensor support is in beta.*')
        return torch.sparse_csr_tensor(index2ptr(row, size[0]), col, value, size,
                                       check_invariants=False)


class Adjacency:
    r"""A sparse matrix :math:`\mathbf{A} \in \mathbb{R}^{n_r \times n_c}`
    held in one backend's form, built once and reused for many products
    :math:`\mathbf{A}\mathbf{X}`.

    Create it with :meth:`from_edge_index`. Entry :math:`A_{rc}` is the
    (summed) weight of the columns ``(r, c)`` of ``edge_index``: row 0 holds
    the receiving node (matrix row), row 1 the sending node (matrix column).
    :meth:`t` gives :math:`\mathbf{A}^\top` (computed once, then cached).

    Every backend supports autograd with respect to :math:`\mathbf{X}` and
    to the edge weights the matrix was built from (the weight tensor stays
    in the autograd graph: build the adjacency inside the training step when
    the weights are learned).

    Example:
        >>> # users aggregate their items, items their users (LightGCN step)
        >>> w = gcn_norm_bipartite(edge_index, U, I)
        >>> adj = Adjacency.from_edge_index(edge_index, w, size=(U, I))
        >>> out_user, out_item = adj.matmul(x_item), adj.t().matmul(x_user)
    """

    def __init__(self, row: Tensor, col: Tensor, value: Tensor,
                 size: Tuple[int, int], backend: str) -> None:
        # Internal: expects coalesced indices sorted by (row, col); use
        # `Adjacency.from_edge_index` instead.
        self.row = row
        self.col = col
        self.value = value
        self.size: Tuple[int, int] = (int(size[0]), int(size[1]))
        self.backend: str = backend
        self._sparse = self._build_sparse()
        self._pyg_view = None  # [col; row] EdgeIndex sorted by col (propagate input)
        self._transpose: Optional[Adjacency] = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_edge_index(
        cls,
        edge_index: Tensor,
        edge_weight: Optional[Tensor] = None,
        size: Optional[Union[int, Tuple[int, int]]] = None,
        backend: str = 'auto',
    ) -> 'Adjacency':
        r"""Builds :math:`\mathbf{A}` from ``edge_index`` ``[2, E]`` and
        optional weights ``[E]`` (default 1).

        Args:
            edge_index (torch.Tensor): ``[2, E]`` integer indices, row 0 in
                ``[0, num_rows)``, row 1 in ``[0, num_cols)``. Duplicates are
                summed.
            edge_weight (torch.Tensor, optional): ``[E]`` values.
            size (int or (int, int), optional): ``(num_rows, num_cols)``; an
                int means square; :obj:`None` infers ``max index + 1``.
            backend (str): a name of :func:`available_backends` or ``'auto'``.
        """
        _check_edge_index(edge_index)
        _check_edge_weight(edge_weight, edge_index.size(1))
        backend = resolve_backend(backend)
        edge_index = edge_index.long()
        num_edges = edge_index.size(1)
        if size is None:
            size = ((int(edge_index[0].max()) + 1, int(edge_index[1].max()) + 1)
                    if num_edges > 0 else (0, 0))
        elif isinstance(size, int):
            size = (size, size)
        size = (int(size[0]), int(size[1]))
        if size[0] < 0 or size[1] < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        _check_index_range(edge_index, size[0], size[1],
                           f'rows (size={size})', f'columns (size={size})')
        if edge_weight is None:
            edge_weight = torch.ones(num_edges, device=edge_index.device)
        edge_index, edge_weight = coalesce(edge_index, edge_weight,
                                           num_nodes=max(size[0], size[1], 1),
                                           reduce='sum', sort_by_row=True)
        return cls(edge_index[0], edge_index[1], edge_weight, size, backend)

    def _build_sparse(self):
        row, col, value, size = self.row, self.col, self.value, self.size
        if self.backend == 'torch_csr':
            return _build_csr(row, col, value, size)
        if self.backend == 'edge_index':
            # Matrix form [row; col] sorted by row, multiplied without
            # `transpose=True`: in PyG <= 2.8.1 the backward of the transposed
            # EdgeIndex product has the wrong shape for non-square matrices.
            return EdgeIndex(torch.stack([row, col]), sparse_size=size, sort_order='row')
        return None

    # -- properties ---------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.size[0]

    @property
    def num_cols(self) -> int:
        return self.size[1]

    @property
    def nnz(self) -> int:
        return self.row.numel()

    @property
    def device(self) -> torch.device:
        return self.row.device

    @property
    def edge_index(self) -> Tensor:
        r"""The coalesced ``[2, nnz]`` indices ``(row, col)``, sorted by row."""
        return torch.stack([self.row, self.col])

    @property
    def edge_weight(self) -> Tensor:
        r"""The ``[nnz]`` values aligned with :attr:`edge_index`."""
        return self.value

    # -- operations ---------------------------------------------------------
    def propagate_inputs(self) -> Tuple[object, Optional[Tensor], Optional[Tuple[int, int]]]:
        r"""What to pass to ``MessagePassing.propagate`` for the product
        :math:`\mathbf{A}\mathbf{X}`: ``(edge_index, edge_weight, size)``.

        ``'torch_csr'`` returns its sparse matrix (rows = receiving nodes, the
        ``adj_t`` PyG expects), ``'edge_index'`` an :class:`EdgeIndex`
        ``[source; target] = [col; row]`` sorted by target (PyG's fused
        ``EdgeIndex`` path) with the values; ``'scatter'`` the plain
        ``[col; row]`` tensor with ``size=(num_cols, num_rows)``.
        """
        if self.backend == 'torch_csr':
            return self._sparse, None, None
        if self.backend == 'edge_index':
            if self._pyg_view is None:
                self._pyg_view = EdgeIndex(torch.stack([self.col, self.row]),
                                           sparse_size=(self.size[1], self.size[0]),
                                           sort_order='col')
            return self._pyg_view, self.value, None
        return torch.stack([self.col, self.row]), self.value, (self.size[1], self.size[0])

    def matmul(self, x: Tensor) -> Tensor:
        r"""Returns :math:`\mathbf{A}\mathbf{X}` for ``x`` of shape
        ``[num_cols, *]`` (any trailing shape) as ``[num_rows, *]``."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.size(0) != self.size[1]:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Adjacency.matmul: expected x with {self.size[1]} "
                             f"rows (the matrix is {self.size[0]} x {self.size[1]}), "
                             f"got {shape}")
        trailing = x.shape[1:]
        x2, fp32 = float32_sparse(x.reshape(x.size(0), -1))  # float32 under train.precision
        with fp32:
            return self._matmul(x2).reshape(self.size[0], *trailing)

    def _matmul(self, x2: Tensor) -> Tensor:
        if (self.backend == 'torch_csr' and x2.requires_grad and torch.is_grad_enabled()
                and not self.value.requires_grad):
            matrix, matrix_t = self._sparse, self.t()._sparse
            if matrix.dtype != x2.dtype:
                matrix, matrix_t = matrix.to(x2.dtype), matrix_t.to(x2.dtype)
            out = _CSRMatmul.apply(x2, matrix, matrix_t)
        elif self.backend in FUSED_BACKENDS:
            out = sparse_matmul(self._sparse, x2, self.value)
        else:
            msg = x2.index_select(0, self.col) * self.value.to(x2.dtype).unsqueeze(-1)
            out = scatter(msg, self.row, 0, dim_size=self.size[0], reduce='sum')
        return out

    __matmul__ = matmul

    def t(self) -> 'Adjacency':
        r"""The transposed matrix :math:`\mathbf{A}^\top` (same backend),
        built on the first call and cached."""
        if self._transpose is None:
            # Stable sort by the new row (= old column); old rows are sorted,
            # so the result is sorted by (new row, new col).
            perm = torch.argsort(self.col, stable=True)
            tr = Adjacency(self.col[perm], self.row[perm], self.value[perm],
                           (self.size[1], self.size[0]), self.backend)
            tr._transpose = self
            self._transpose = tr
        return self._transpose

    def transpose(self) -> 'Adjacency':
        r"""Alias of :meth:`t`."""
        return self.t()

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> 'Adjacency':
        r"""A copy on :obj:`device` (the same object if already there)."""
        device = torch.device(device)
        if self.row.device == device:
            return self
        return Adjacency(self.row.to(device, non_blocking=non_blocking),
                         self.col.to(device, non_blocking=non_blocking),
                         self.value.to(device, non_blocking=non_blocking),
                         self.size, self.backend)

    def with_backend(self, backend: str) -> 'Adjacency':
        r"""The same matrix in another backend's form."""
        backend = resolve_backend(backend)
        if backend == self.backend:
            return self
        return Adjacency(self.row, self.col, self.value, self.size, backend)

    def __deepcopy__(self, memo: dict) -> 'Adjacency':
        # Rebuilt from the COO parts: torch cannot deep-copy CSR tensors.
        out = Adjacency(copy.deepcopy(self.row, memo), copy.deepcopy(self.col, memo),
                        copy.deepcopy(self.value, memo), self.size, self.backend)
        memo[id(self)] = out
        return out

    def to_dense(self) -> Tensor:
        r"""The dense ``[num_rows, num_cols]`` matrix (for tests and debugging)."""
        out = self.value.new_zeros(self.size)
        return out.index_put((self.row, self.col), self.value, accumulate=True)

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(size={self.size}, nnz={self.nnz}, '
                f'backend={self.backend!r}, device={self.device})')
