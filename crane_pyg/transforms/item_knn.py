r"""The item-item semantic kNN graph (FREEDOM / LATTICE style).

For every modality :math:`m` with item features :math:`\mathbf{F}_m \in
\mathbb{R}^{I \times d_m}` the graph is built in four steps:

1. **Cosine similarity** :math:`S_m[i, j] = \langle \mathbf{f}_i, \mathbf{f}_j
   \rangle / (\lVert \mathbf{f}_i \rVert \lVert \mathbf{f}_j \rVert)`,
   computed ``chunk_size`` rows at a time so that at most a
   ``[chunk_size, I]`` block exists in memory (time :math:`O(I^2 d_m)`,
   memory :math:`O(\text{chunk\_size} \cdot I + k I)`).
2. **Top-k sparsification** :math:`A_m[i, j] = a_m(i, j)` if :math:`j \in
   \mathcal{N}_k^m(i)`, the :math:`k` items with the largest :math:`S_m[i, :]`,
   and 0 otherwise, with :math:`a_m(i, j) = 1` (``binary=True``, as FREEDOM and
   LATTICE do) or :math:`a_m(i, j) = \max(S_m[i, j], 0)` (``binary=False``).
   :math:`A_m` is a *directed* kNN graph (row :math:`i` lists the neighbours of
   :math:`i`); it is not symmetrised.
3. **Normalisation** with :math:`d_m(i) = \sum_j A_m[i, j]` (row sums):

   * ``'sym'``: :math:`\hat{A}_m[i, j] = d_m(i)^{-1/2} A_m[i, j] d_m(j)^{-1/2}`
     (FREEDOM's ``compute_normalized_laplacian``; with ``binary=True`` every
     row sum is :math:`k`, so every entry is :math:`1/k`),
   * ``'row'``: :math:`\hat{A}_m[i, j] = A_m[i, j] / d_m(i)`,
   * ``None``: :math:`\hat{A}_m = A_m`,

   where :math:`d^{-1/2}` and :math:`d^{-1}` are taken as 0 when :math:`d = 0`
   (FREEDOM adds :math:`10^{-7}` to :math:`d` instead; the difference is below
   float32 resolution for :math:`d \geq 1`).
4. **Fusion** :math:`\hat{A} = \sum_m w_m \hat{A}_m` with non-negative weights
   summing to one, coalesced (entries present in several modalities are added).

Edge orientation follows PyG's :func:`torch_geometric.nn.knn_graph`
(``flow='source_to_target'``): an entry :math:`\hat{A}[i, j]` (item :math:`i`
aggregates from its neighbour :math:`j`) is stored as the edge
``(j, i)`` = ``(edge_index[0], edge_index[1])``, so that a
:class:`~torch_geometric.nn.conv.MessagePassing` layer with the default flow
computes exactly :math:`\mathbf{h}_i = \sum_j \hat{A}[i, j] \mathbf{x}_j`, i.e.
FREEDOM's ``torch.sparse.mm(mm_adj, x)``. In dense form,
``to_dense_adj(edge_index, edge_attr=edge_weight)[0].t()`` is :math:`\hat{A}`.

Special cases:

* **Self-loops** (``include_self=True``): the item itself is a candidate
  neighbour; its similarity is set to exactly 1 (the cosine of a vector with
  itself), so it is always among its own top-:math:`k` unless :math:`k` or more
  other items have features parallel to it. ``include_self=False`` excludes it.
* **Ties** at the :math:`k`-th place are broken by :func:`torch.topk`
  (implementation-defined, deterministic for a fixed device and build); every
  row still receives exactly :math:`k` neighbours (see below for the
  exceptions).
* **All-zero feature rows** have no direction, so their cosine similarity is
  undefined: such an item is *isolated* in :math:`A_m` (it gets no neighbours
  and is nobody's neighbour in modality :math:`m`; no ``NaN`` is produced). It
  still takes part in the graphs of the other modalities. Rows of non-zero items
  then hold :math:`\min(k, I_m^{+})` neighbours, :math:`I_m^{+}` the number of
  candidate items with non-zero features.
* With ``binary=False``, neighbours with a non-positive cosine similarity get
  weight 0 and are dropped, so a row can hold fewer than :math:`k` edges.
* A modality with weight 0 is skipped (not computed).

An approximate (e.g. IVF / product-quantisation) nearest-neighbour search for
very large catalogues is not implemented; the exact chunked search is
:math:`O(I^2 d)` time but only :math:`O(\text{chunk\_size} \cdot I)` memory.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import coalesce, scatter

from crane_pyg.data.schema import ITEM, ITEM_ITEM

__all__ = ['ItemKNNGraph', 'knn_adjacency', 'default_modality_weights']

_NORMALIZATIONS = ('sym', 'row', None)

WeightsLike = Union[Mapping[str, float], Sequence[float], Tensor]


def _check_k(k: int, num_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"'k' must be an int (got {type(k).__name__})")
    if k < 1 or k >= num_items:
        raise ValueError(f"'k' must satisfy 1 <= k < num_items = {num_items} "
                         f"(got k={k})")


def _check_options(k: int, chunk_size: int, normalize: Optional[str]) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"'k' must be an int (got {type(k).__name__})")
    if k < 1:
        raise ValueError(f"'k' must be >= 1 (got {k})")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
            or chunk_size < 1):
        raise ValueError(f"'chunk_size' must be a positive int "
                         f"(got {chunk_size!r})")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"'normalize' must be one of {_NORMALIZATIONS} "
                         f"(got {normalize!r})")


def _validate_weights(weights: Optional[Sequence[float] | Tensor],
                      num_modalities: int,
                      names: Optional[Sequence[str]] = None) -> list[float]:
    r"""Checks per-modality weights and normalises them to sum to one."""
    if weights is None:
        return [1.0 / num_modalities] * num_modalities
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(f"'weights' must be one-dimensional "
                             f"(got shape {tuple(weights.shape)})")
        weights = weights.tolist()
    weights = [float(w) for w in weights]
    labels = list(names) if names is not None else list(
        range(num_modalities))
    if len(weights) != num_modalities:
        raise ValueError(f"expected one weight per modality {labels} "
                         f"({num_modalities}), got {len(weights)}: {weights}")
    for label, w in zip(labels, weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"modality weights must be finite and "
                             f"non-negative (weight of {label!r} is {w})")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"modality weights must not all be zero "
                         f"(got {dict(zip(labels, weights))})")
    return [w / total for w in weights]


def default_modality_weights(modalities: Sequence[str]) -> list[float]:
    r"""The default fusion weights :math:`w_m`: FREEDOM's ``image`` 0.1 /
    ``text`` 0.9 when the modalities are exactly ``{'image', 'text'}``, equal
    weights :math:`1/M` otherwise."""
    if len(modalities) == 0:
        raise ValueError('at least one modality is required')
    if sorted(modalities) == ['image', 'text']:
        return [0.1 if m == 'image' else 0.9 for m in modalities]
    return [1.0 / len(modalities)] * len(modalities)


@torch.no_grad()
def _topk_cosine(x: Tensor, k: int, chunk_size: int,
                 include_self: bool) -> tuple[Tensor, Tensor]:
    r"""Row-wise top-``k`` cosine neighbours, ``chunk_size`` rows at a time.

    Returns ``(index, value)`` of shape ``[I, k]``; ``value`` is ``-inf`` where
    no valid neighbour exists (zero-norm rows / candidates).
    """
    num_items = x.size(0)
    device = x.device
    norm = x.norm(p=2, dim=1)
    nonzero = norm > 0
    x_unit = x / norm.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
    has_zero = not bool(nonzero.all())

    index = torch.empty(num_items, k, dtype=torch.long, device=device)
    value = torch.empty(num_items, k, dtype=x.dtype, device=device)
    neg_inf = float('-inf')
    for start in range(0, num_items, chunk_size):
        end = min(start + chunk_size, num_items)
        sim = x_unit[start:end] @ x_unit.t()  # [chunk, I]
        rows = torch.arange(end - start, device=device)
        cols = torch.arange(start, end, device=device)
        # The cosine of a vector with itself is exactly 1 (or excluded).
        sim[rows, cols] = 1.0 if include_self else neg_inf
        if has_zero:
            sim[:, ~nonzero] = neg_inf
        value[start:end], index[start:end] = sim.topk(k, dim=1)
    if has_zero:
        value[~nonzero] = neg_inf
    return index, value


@torch.no_grad()
def knn_adjacency(
    features: Sequence[Tensor],
    k: int,
    weights: Optional[Sequence[float] | Tensor] = None,
    *,
    chunk_size: int = 2048,
    include_self: bool = True,
    binary: bool = True,
    normalize: Optional[str] = 'sym',
) -> tuple[Tensor, Tensor]:
    r"""Builds the fused, normalised item-item kNN adjacency
    :math:`\hat{A} = \sum_m w_m \hat{A}_m` from per-modality item
    representations (see the module docstring for the exact formulas, edge
    orientation and the handling of ties and all-zero rows).

    This is the functional core of :class:`ItemKNNGraph`; models call it to
    rebuild the graph from learned representations. It runs on the device of
    ``features``, without autograd.

    Args:
        features (Sequence[Tensor]): one ``[I, d_m]`` floating tensor per
            modality (same ``I``, same device).
        k (int): neighbours per item, :math:`1 \leq k < I`.
        weights (Sequence[float] or Tensor, optional): one non-negative weight
            per modality; normalised to sum to one (so ``(1, 9)`` equals
            ``(0.1, 0.9)``). :obj:`None` means equal weights :math:`1/M`.
        chunk_size (int): rows of the similarity matrix computed at once.
        include_self (bool): whether an item may be its own neighbour.
        binary (bool): 1-valued (:obj:`True`) or cosine-valued adjacency.
        normalize (str, optional): ``'sym'``, ``'row'`` or :obj:`None`.

    Returns:
        ``(edge_index [2, nnz], edge_weight [nnz])``, coalesced, with
        ``edge_index[1]`` the aggregating item and ``edge_index[0]`` its
        neighbour; ``nnz <= M * k * I``.
    """
    _check_options(k, chunk_size, normalize)
    if isinstance(features, Tensor):
        raise TypeError("'features' must be a sequence of [I, d_m] tensors, "
                        "one per modality (wrap a single tensor in a list)")
    features = list(features)
    if len(features) == 0:
        raise ValueError('knn_adjacency needs at least one modality '
                         '(got an empty feature list)')
    for m, x in enumerate(features):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(
                f'features[{m}] must be a 2-D tensor [num_items, dim] (got '
                f'{tuple(x.shape) if isinstance(x, Tensor) else type(x)})')
    num_items = features[0].size(0)
    device = features[0].device
    for m, x in enumerate(features):
        if x.size(0) != num_items:
            raise ValueError(f'features[{m}] has {x.size(0)} rows but '
                             f'features[0] has {num_items} (one row per item)')
        if x.device != device:
            raise ValueError(f'features[{m}] is on {x.device} but features[0] '
                             f'is on {device}')
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f'features[{m}] contains NaN or Inf')
    _check_k(k, num_items)
    weights_ = _validate_weights(weights, len(features))

    rows, cols, vals = [], [], []
    for x, w in zip(features, weights_):
        if w == 0.0:
            continue
        x = x.detach()
        if not x.is_floating_point() or x.dtype in (torch.float16,
                                                    torch.bfloat16):
            x = x.float()
        index, value = _topk_cosine(x, k, chunk_size, include_self)
        center = torch.arange(num_items, device=device).repeat_interleave(k)
        nbr, value = index.reshape(-1), value.reshape(-1)
        if binary:
            keep = value > float('-inf')
            value = torch.ones_like(value)
        else:
            value = value.clamp(min=0.0, max=1.0)  # -inf -> 0
            keep = value > 0
        center, nbr, value = center[keep], nbr[keep], value[keep]

        if normalize is not None:
            deg = scatter(value, center, dim=0, dim_size=num_items,
                          reduce='sum')
            if normalize == 'sym':
                inv = deg.pow(-0.5)
                inv.masked_fill_(deg == 0, 0.0)
                value = inv[center] * value * inv[nbr]
            else:  # 'row'
                inv = deg.reciprocal()
                inv.masked_fill_(deg == 0, 0.0)
                value = inv[center] * value
        rows.append(nbr)
        cols.append(center)
        vals.append(w * value)

    edge_index = torch.stack([torch.cat(rows), torch.cat(cols)], dim=0)
    edge_weight = torch.cat(vals)
    edge_index, edge_weight = coalesce(edge_index, edge_weight,
                                       num_nodes=num_items, reduce='sum')
    return edge_index, edge_weight


class ItemKNNGraph(BaseTransform):
    r"""Adds the fused item-item semantic kNN graph
    :math:`\hat{A} = \sum_m w_m \hat{A}_m` to a
    :class:`~torch_geometric.data.HeteroData` from
    :func:`crane_pyg.data.load_mmrec`, as
    ``data['item', 'similar', 'item'].edge_index`` ``[2, nnz]`` and
    ``.edge_weight`` ``[nnz]``, ready to propagate with a
    :class:`~torch_geometric.nn.conv.MessagePassing` layer
    (:math:`\mathbf{h}_i = \sum_j \hat{A}[i, j] \mathbf{x}_j`).

    Per modality :math:`m` with features :math:`\mathbf{F}_m`
    (``data['item'][m]``):

    .. math::
        A_m[i, j] &= \begin{cases} 1 \text{ or } \max(\cos(\mathbf{f}_i,
        \mathbf{f}_j), 0) & j \in \mathrm{top}_k(\cos(\mathbf{f}_i, \cdot))
        \\ 0 & \text{otherwise} \end{cases}

        \hat{A}_m &= D_m^{-1/2} A_m D_m^{-1/2}, \qquad
        D_m = \mathrm{diag}(A_m \mathbf{1})

        \hat{A} &= \sum_m w_m \hat{A}_m

    See :mod:`crane_pyg.transforms.item_knn` for edge orientation, self-loops,
    ties and all-zero feature rows. The transform also records what it used:
    ``knn_k`` (int), ``knn_modalities`` (list of str), ``knn_weights`` (list of
    float, aligned with ``knn_modalities``, summing to one), ``knn_binary``,
    ``knn_include_self`` and ``knn_normalize`` on the same edge store, so a
    model can rebuild the graph consistently with :func:`knn_adjacency`.

    Args:
        k (int): neighbours per item (default ``10``), :math:`1 \leq k < I`.
        modalities (Sequence[str], optional): modalities to use; default all
            of ``data.modalities`` (or of ``features`` when given).
        modality_weights (Mapping[str, float] or Sequence[float], optional):
            fusion weights :math:`w_m`, either a mapping with exactly one entry
            per used modality or a sequence aligned with ``modalities``;
            non-negative, not all zero, and normalised to sum to one.
            Default: FREEDOM's ``image`` 0.1 / ``text`` 0.9 when the
            modalities are exactly those two, :math:`1/M` otherwise.
        chunk_size (int): rows of the similarity matrix computed at once
            (memory :math:`O(\text{chunk\_size} \cdot I)`; default ``2048``).
        include_self (bool): whether an item may be among its own top-k
            (default :obj:`True`, as FREEDOM).
        binary (bool): 1-valued adjacency (default, as FREEDOM/LATTICE) or the
            cosine similarity clamped at 0.
        normalize (str, optional): ``'sym'`` (default), ``'row'`` or
            :obj:`None`.
        features (Mapping[str, Tensor], optional): item representations
            ``{name: [I, d_m]}`` to use instead of ``data['item'][name]``
            (e.g. precomputed or learned embeddings); they are not stored in
            ``data``.

    Example:
        >>> data = ItemKNNGraph(k=10)(load_mmrec(root, 'baby'))
        >>> data['item', 'similar', 'item'].edge_weight.shape
    """
    def __init__(
        self,
        k: int = 10,
        modalities: Optional[Sequence[str]] = None,
        modality_weights: Optional[WeightsLike] = None,
        chunk_size: int = 2048,
        include_self: bool = True,
        binary: bool = True,
        normalize: Optional[str] = 'sym',
        features: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        _check_options(k, chunk_size, normalize)
        if isinstance(modalities, str):
            modalities = [modalities]
        if modalities is not None:
            modalities = list(modalities)
            if len(modalities) == 0:
                raise ValueError("'modalities' must not be empty (use None "
                                 "for all modalities of the dataset)")
            if len(set(modalities)) != len(modalities):
                raise ValueError(f"'modalities' has duplicates: {modalities}")
        if features is not None and not isinstance(features, Mapping):
            raise TypeError("'features' must be a mapping {modality: Tensor}")
        if (modality_weights is not None and modalities is None
                and not isinstance(modality_weights, Mapping)):
            raise ValueError("a sequence of 'modality_weights' needs explicit "
                             "'modalities' to align with; pass a mapping "
                             "{modality: weight} instead")
        if isinstance(modality_weights, Mapping) and modalities is not None:
            if set(modality_weights) != set(modalities):
                raise ValueError(
                    f"'modality_weights' keys {sorted(modality_weights)} do "
                    f"not match 'modalities' {modalities}")
        if modality_weights is not None and modalities is not None:
            self._resolve_weights(modalities, modality_weights)  # fail early
        self.k = k
        self.modalities = modalities
        self.modality_weights = modality_weights
        self.chunk_size = chunk_size
        self.include_self = include_self
        self.binary = binary
        self.normalize = normalize
        self.features = dict(features) if features is not None else None

    @staticmethod
    def _resolve_weights(modalities: list[str],
                         weights: Optional[WeightsLike]) -> list[float]:
        if weights is None:
            return default_modality_weights(modalities)
        if isinstance(weights, Mapping):
            missing = [m for m in modalities if m not in weights]
            unknown = [m for m in weights if m not in modalities]
            if missing or unknown:
                raise ValueError(
                    f"'modality_weights' must have exactly one entry per "
                    f"modality {modalities} (missing: {missing}, unknown: "
                    f"{unknown})")
            weights = [weights[m] for m in modalities]
        return _validate_weights(weights, len(modalities), modalities)

    def _available(self, data: HeteroData) -> list[str]:
        if self.features is not None:
            return sorted(self.features)
        if 'modalities' in data:
            return list(data.modalities)
        # Fallback for hand-built data: every 2-D floating item attribute.
        store = data[ITEM]
        return sorted(key for key, value in store.items()
                      if isinstance(value, Tensor) and value.dim() == 2
                      and value.is_floating_point())

    def forward(self, data: HeteroData) -> HeteroData:
        if ITEM not in data.node_types:
            raise ValueError(f"ItemKNNGraph expects a HeteroData with an "
                             f"{ITEM!r} node type (got {data.node_types})")
        num_items = data[ITEM].num_nodes
        available = self._available(data)
        modalities = (list(self.modalities) if self.modalities is not None
                      else list(available))
        if len(modalities) == 0:
            name = getattr(data, 'name', None)
            raise ValueError(
                f"ItemKNNGraph needs at least one item modality, but dataset "
                f"{name!r} has none (data.modalities is empty: no "
                f"<modality>_feat.npy files)")
        source = (self.features if self.features is not None else
                  data[ITEM])
        where = 'features' if self.features is not None else "data['item']"
        feats = []
        for m in modalities:
            if m not in available or m not in source:
                raise ValueError(f"modality {m!r} not found in {where}; "
                                 f"available modalities: {available}")
            x = source[m]
            if not isinstance(x, Tensor) or x.dim() != 2:
                raise ValueError(f"{where}[{m!r}] must be a 2-D tensor "
                                 f"[num_items, dim]")
            if num_items is not None and x.size(0) != num_items:
                raise ValueError(f"{where}[{m!r}] has {x.size(0)} rows but "
                                 f"data['item'].num_nodes = {num_items}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{where}[{m!r}] contains NaN or Inf")
            feats.append(x)
        weights = self._resolve_weights(modalities, self.modality_weights)
        _check_k(self.k, feats[0].size(0))

        edge_index, edge_weight = knn_adjacency(
            feats, self.k, weights, chunk_size=self.chunk_size,
            include_self=self.include_self, binary=self.binary,
            normalize=self.normalize)
        store = data[ITEM_ITEM]
        store.edge_index = edge_index
        store.edge_weight = edge_weight
        store.knn_k = self.k
        store.knn_modalities = modalities
        store.knn_weights = weights
        store.knn_binary = self.binary
        store.knn_include_self = self.include_self
        store.knn_normalize = self.normalize
        return data

    def __repr__(self) -> str:
        args = [f'k={self.k}']
        if self.modalities is not None:
            args.append(f'modalities={self.modalities}')
        if self.modality_weights is not None:
            w = self.modality_weights
            if isinstance(w, Tensor):
                w = w.tolist()
            w = dict(w) if isinstance(w, Mapping) else list(w)
            args.append(f'modality_weights={w}')
        args += [f'binary={self.binary}', f'normalize={self.normalize!r}',
                 f'include_self={self.include_self}',
                 f'chunk_size={self.chunk_size}']
        if self.features is not None:
            args.append(f'features={sorted(self.features)}')
        return f'{self.__class__.__name__}({", ".join(args)})'
