r"""The :class:`Recommender` base class and helpers shared by the models.

Every model of :mod:`crane_pyg.models` is a :class:`Recommender`:

.. code-block:: python

    model = CRANE.from_data(data, **options)   # HeteroData from load_mmrec
    model.on_epoch_start(epoch)                # per-epoch hooks (no-op by default)
    loss, parts = model.loss(users, pos_items, neg_items)
    user_emb, item_emb = model.embeddings()    # [U, d'], [I, d']
    scores = model.score_all_items(users, (user_emb, item_emb))  # [B, I]

**Constructor convention.** A model's ``__init__`` takes the tensors it reads
from the data (sizes, training ``edge_index``, modality features, item-item
graph) as ordinary parameters, followed by ``*`` and its hyper-parameters
as *keyword-only* parameters, each annotated with a plain type (``int``,
``float``, ``bool``, ``str``, ``Optional``, ``Literal`` or ``tuple``), given
a default and documented in the docstring's ``Args``. :meth:`Recommender.options`
lists exactly those keyword-only parameters; configuration files are
validated against it (there is no ``**kwargs`` catch-all, so an unknown key
is an error).

**State.** Tensors derived from the data (graphs, features) are registered
as *non-persistent* buffers: they follow ``model.to(device)`` but are not
written to ``state_dict()`` (the data is loaded again on resume). State that
changes during training (e.g. CRANE's rebuilt item-item graph) is a
*persistent* buffer. Randomness in :meth:`Recommender.on_epoch_start` comes
from a private :class:`torch.Generator` seeded with ``seed + epoch``, so a
resumed run replays the same epochs.
"""
from __future__ import annotations

import inspect
import math
import warnings
from abc import ABCMeta, abstractmethod
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from crane_pyg.data.schema import ITEM, ITEM_ITEM, USER, USER_ITEM
from crane_pyg.nn import Adjacency, gcn_norm_bipartite
from crane_pyg.transforms import ItemKNNGraph, knn_adjacency
from crane_pyg.transforms.item_knn import default_modality_weights

__all__ = [
    'ModalityGraphRecommender',
    'Recommender',
    'SparseMatrices',
    'bipartite_block_matrix',
    'degree_sensitive_edge_sample',
    'epoch_generator',
    'interaction_matrix',
    'sparse_csr',
]


class Recommender(nn.Module, metaclass=ABCMeta):
    r"""Abstract base class of the recommenders in :mod:`crane_pyg.models`.

    Subclasses implement :meth:`loss` and :meth:`embeddings` (and usually
    :meth:`_args_from_data`); scoring is the inner product
    :math:`s(u, i) = \langle \mathbf{e}_u, \mathbf{e}_i \rangle` of the final
    representations returned by :meth:`embeddings`.

    Calling the module, ``model(users, pos_items, neg_items)``, is the same
    as :meth:`loss`, so that wrappers such as
    :class:`torch.nn.parallel.DistributedDataParallel` see a ``forward``.

    Args:
        num_users (int): number of users :math:`U`.
        num_items (int): number of items :math:`I`.
    """

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        for name, value in (('num_users', num_users), ('num_items', num_items)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: '{name}' must be a "
                                 f"positive int, got {value!r}")
        self.num_users = int(num_users)
        self.num_items = int(num_items)

    # ------------------------------------------------------------------
    # construction from a HeteroData
    # ------------------------------------------------------------------
    @classmethod
    def options(cls) -> Dict[str, inspect.Parameter]:
        r"""The model's hyper-parameters: the keyword-only parameters of
        ``__init__`` (name -> :class:`inspect.Parameter`, with annotation and
        default), in declaration order."""
        signature = inspect.signature(cls.__init__)
        return {name: p for name, p in signature.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @classmethod
    def option_defaults(cls) -> Dict[str, Any]:
        r"""``{name: default}`` of :meth:`options`."""
        return {name: p.default for name, p in cls.options().items()}

    @classmethod
    def from_data(cls, data: HeteroData, **options: Any) -> 'Recommender':
        r"""Builds the model for a dataset.

        Reads :math:`U`, :math:`I`, the training interactions
        ``data['user', 'interacts', 'item'].edge_index`` and, when the model
        uses them, the modality features ``data['item'][m]`` for
        ``m in data.modalities`` and the item-item graph
        ``data['item', 'similar', 'item']`` (built with
        :class:`~crane_pyg.transforms.ItemKNNGraph` and the model's own
        ``knn_k`` / ``modality_weights`` when ``data`` lacks it or holds one
        built with other settings; ``data`` itself is never modified).

        Args:
            data (HeteroData): a dataset as returned by
                :func:`crane_pyg.data.load_mmrec`.
            **options: hyper-parameters, see :meth:`options`.

        Raises:
            TypeError: for an option the model does not have.
        """
        known = cls.options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown option(s) {unknown}; "
                            f"valid options are {list(known)}")
        if not isinstance(data, HeteroData):
            raise TypeError(f"{cls.__name__}.from_data expects a HeteroData, "
                            f"got {type(data).__name__}")
        args = cls._args_from_data(data, {**cls.option_defaults(), **options})
        return cls(**args, **options)

    @classmethod
    def _args_from_data(cls, data: HeteroData,
                        options: Dict[str, Any]) -> Dict[str, Any]:
        r"""The non-option constructor arguments read from :obj:`data`
        (``options`` holds every option, defaults filled in). The default
        returns ``num_users``, ``num_items`` and ``edge_index``."""
        return {
            'num_users': _num_nodes(data, USER),
            'num_items': _num_nodes(data, ITEM),
            'edge_index': train_edge_index(data),
        }

    # ------------------------------------------------------------------
    # the interface
    # ------------------------------------------------------------------
    def reset_parameters(self) -> None:
        r"""Re-initialises all learnable parameters (the default calls
        ``reset_parameters()`` of every direct child that has one)."""
        for child in self.children():
            if hasattr(child, 'reset_parameters'):
                child.reset_parameters()

    def on_epoch_start(self, epoch: int) -> None:
        r"""Per-epoch hook, called by the trainer before the first batch of
        epoch :obj:`epoch` (default: nothing)."""

    def compile_modules(self, **kwargs: Any) -> List[str]:
        r"""Compiles, in place with :meth:`torch.nn.Module.compile`, the
        dense submodules that dominate a training step, and returns their
        names (the trainer calls it when ``train.compile`` is set). Parameters,
        ``state_dict`` keys and results (up to float rounding) are unchanged;
        the first calls pay the compilation. :obj:`kwargs` go to
        :func:`torch.compile`. The default compiles nothing: the baselines'
        steps are sparse propagation and a few matrix products, with nothing
        for the compiler to fuse."""
        return []

    @abstractmethod
    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""The training loss of one batch of (user, positive item, negative
        item) triples, each ``LongTensor[B]``.

        Returns:
            ``(loss, parts)``: the scalar loss to back-propagate and a dict of
            the (weighted) value of each term as Python floats, e.g.
            ``{'bpr': ..., 'reg': ...}``.
        """

    @abstractmethod
    def embeddings(self) -> Tuple[Tensor, Tensor]:
        r"""The final representations ``(user_emb [U, d'], item_emb [I, d'])``
        whose inner products are the scores. Call it in eval mode under
        :func:`torch.no_grad` for evaluation (it always uses the full
        training graph)."""

    def score_all_items(
        self,
        users: Tensor,
        embeddings: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        r"""Scores of :obj:`users` ``LongTensor[B]`` against every item,
        ``[B, I]``: :math:`s(u, i) = \langle \mathbf{e}_u, \mathbf{e}_i
        \rangle`.

        Args:
            users (Tensor): user ids.
            embeddings ((Tensor, Tensor), optional): the output of
                :meth:`embeddings`, to reuse across batches of users (computed
                here when omitted).
        """
        user_emb, item_emb = self.embeddings() if embeddings is None else embeddings
        return user_emb.index_select(0, users) @ item_emb.t()

    @torch.no_grad()
    def recommend(
        self,
        users: Tensor,
        k: int,
        exclude: Optional[Tensor] = None,
        *,
        batch_size: int = 1024,
        embeddings: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        r"""The top-:obj:`k` items of every user in :obj:`users`, by
        decreasing :meth:`score_all_items`, never an excluded pair.

        Unlike PyG's :meth:`~torch_geometric.nn.models.LightGCN.recommend`,
        items a user already has can be masked: pass
        ``exclude=data['user', 'interacts', 'item'].edge_index`` (the
        training interactions) or any ``[2, E]`` set of (user, item) pairs.
        Runs in eval mode (restored afterwards), under :func:`torch.no_grad`,
        :obj:`batch_size` users at a time (memory :math:`O(B \cdot I)`).

        Args:
            users (LongTensor): ``[B]`` user ids in ``[0, U)``.
            k (int): items per user, ``1 <= k <= I``.
            exclude (LongTensor, optional): ``[2, E]`` (user, item) pairs never
                recommended (row 0 users, row 1 items).
            batch_size (int): users scored at once. (default: ``1024``)
            embeddings ((Tensor, Tensor), optional): the output of
                :meth:`embeddings`, to reuse across calls.

        Returns:
            ``(scores, items)``, each ``[B, k]``, row ``b`` for ``users[b]``,
            sorted by decreasing score. A user with fewer than :obj:`k`
            items left after exclusion gets ``item -1`` and score
            :math:`-\infty` in the remaining slots.

        Raises:
            ValueError: :obj:`k` outside ``[1, I]``, a user id outside
                ``[0, U)``, or a malformed :obj:`exclude`.
        """
        owner = f'{type(self).__name__}.recommend'
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f'{owner}: k must be a positive int, got {k!r}')
        if k > self.num_items:
            raise ValueError(f'{owner}: k = {k} is larger than the catalogue '
                             f'({self.num_items} items)')
        check_int(owner, 'batch_size', batch_size, minimum=1)
        users = torch.as_tensor(users).view(-1).cpu()
        if users.is_floating_point() or users.dtype == torch.bool:
            raise ValueError(f'{owner}: users must be integer ids, got {users.dtype}')
        users = users.long()
        if users.numel() and (int(users.min()) < 0 or int(users.max()) >= self.num_users):
            bad = users[(users < 0) | (users >= self.num_users)][0]
            raise ValueError(f'{owner}: user id {int(bad)} is outside [0, '
                             f'{self.num_users})')
        ptr = items_by_user = None
        if exclude is not None:
            exclude = torch.as_tensor(exclude).cpu()
            if exclude.numel():
                exclude = check_bipartite_edge_index(exclude, self.num_users,
                                                     self.num_items, f'{owner}: exclude')
            else:
                exclude = exclude.view(2, 0).long()
            order = torch.argsort(exclude[0], stable=True)
            items_by_user = exclude[1, order]
            counts = torch.bincount(exclude[0], minlength=self.num_users)
            ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        was_training = self.training
        self.eval()
        try:
            if embeddings is None:
                embeddings = self.embeddings()
            device = embeddings[0].device
            out_scores, out_items = [], []
            for start in range(0, users.numel(), batch_size):
                batch = users[start:start + batch_size]
                scores = self.score_all_items(batch.to(device), embeddings).float()
                if ptr is not None:
                    # the excluded items of the batch's users, row by row
                    begin, count = ptr[batch], ptr[batch + 1] - ptr[batch]
                    row = torch.repeat_interleave(torch.arange(batch.numel()), count)
                    block_start = (count.cumsum(0) - count)[row]
                    position = torch.arange(row.numel()) - block_start + begin[row]
                    scores[row.to(device), items_by_user[position].to(device)] = -math.inf
                values, index = scores.topk(k, dim=1)
                index[values == -math.inf] = -1
                out_scores.append(values.cpu())
                out_items.append(index.cpu())
        finally:
            self.train(was_training)
        if not out_scores:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(out_scores), torch.cat(out_items)

    def forward(self, users: Tensor, pos_items: Tensor,
                neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""Same as :meth:`loss`."""
        return self.loss(users, pos_items, neg_items)

    # ------------------------------------------------------------------
    # caches of the propagation layers
    # ------------------------------------------------------------------
    def reset_cache(self) -> None:
        r"""Drops the normalised adjacencies cached by the propagation
        layers (they are rebuilt on the next call). Called automatically
        after ``to()`` / ``cuda()`` / ``float()``... and after
        loading a state dict."""
        for module in self.modules():
            if module is not self and hasattr(module, 'reset_cache'):
                module.reset_cache()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.reset_cache()  # cached adjacencies hold tensors of the old device/dtype
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # Graph buffers may have changed: adjacencies cached from the old ones
        # are stale (also when the model is loaded as a submodule of a wrapper).
        self.reset_cache()

    def extra_repr(self) -> str:
        return f'num_users={self.num_users}, num_items={self.num_items}'

    # ------------------------------------------------------------------
    # validation helpers for subclasses
    # ------------------------------------------------------------------
    def _check_edge_index(self, edge_index: Tensor, name: str = 'edge_index') -> Tensor:
        r"""Validates a ``[2, E]`` user-item ``edge_index`` against
        :math:`U` and :math:`I` and returns it as ``int64``."""
        return check_bipartite_edge_index(edge_index, self.num_users, self.num_items,
                                          f'{type(self).__name__}: {name!r}')

    def check_batch(self, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> None:
        r"""Raises a clear error unless ``users``, ``pos_items`` and
        ``neg_items`` are three non-empty 1-D tensors of equal length with ids
        in range (what :meth:`loss` and the mini-batch forms accept)."""
        cls = type(self).__name__
        if not (isinstance(users, Tensor) and isinstance(pos_items, Tensor)
                and isinstance(neg_items, Tensor)):
            raise TypeError(f'{cls}.loss expects three LongTensors (users, '
                            f'pos_items, neg_items)')
        if not (users.dim() == pos_items.dim() == neg_items.dim() == 1
                and users.numel() == pos_items.numel() == neg_items.numel()):
            raise ValueError(f'{cls}.loss: users, pos_items and neg_items must be '
                             f'1-D of equal length, got shapes {list(users.shape)}, '
                             f'{list(pos_items.shape)}, {list(neg_items.shape)}')
        if users.numel() == 0:
            raise ValueError(f'{cls}.loss: empty batch')


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------

def _num_nodes(data: HeteroData, node_type: str) -> int:
    if node_type not in data.node_types or data[node_type].num_nodes is None:
        raise ValueError(f"data[{node_type!r}].num_nodes is missing (expected a "
                         f"HeteroData from crane_pyg.data.load_mmrec)")
    return int(data[node_type].num_nodes)


def train_edge_index(data: HeteroData) -> Tensor:
    r"""The training interactions ``data['user', 'interacts', 'item'].edge_index``."""
    if USER_ITEM not in data.edge_types or 'edge_index' not in data[USER_ITEM]:
        raise ValueError(f"data{list(USER_ITEM)}.edge_index (the training "
                         f"interactions) is missing")
    return data[USER_ITEM].edge_index


def modality_features(data: HeteroData) -> Dict[str, Tensor]:
    r"""``{modality: data['item'][modality]}`` for every modality in
    ``data.modalities`` (in that order; empty when there is none)."""
    names = list(getattr(data, 'modalities', None) or [])
    out: Dict[str, Tensor] = {}
    for name in names:
        if name not in data[ITEM]:
            raise ValueError(f"data.modalities lists {name!r} but data['item'] "
                             f"has no attribute {name!r}")
        out[name] = data[ITEM][name]
    return out


def item_graph_from_data(
    data: HeteroData,
    k: int,
    modality_weights: Optional[Sequence[float]],
) -> Tuple[Tensor, Tensor]:
    r"""The item-item graph ``(edge_index, edge_weight)`` of :obj:`data`.

    Uses ``data['item', 'similar', 'item']`` when it exists and was built
    from all of ``data.modalities`` with the same ``k`` and weights (or
    carries no record of how it was built: then it was supplied on purpose,
    and is used as it is); otherwise builds one with
    :class:`~crane_pyg.transforms.ItemKNNGraph` on a shallow copy of
    :obj:`data` (which is left unchanged).

    Args:
        data (HeteroData): the dataset.
        k (int): neighbours per item.
        modality_weights (sequence of float, optional): per-modality weights
            aligned with ``data.modalities``; :obj:`None` means the
            transform's default (FREEDOM's image 0.1 / text 0.9 for exactly
            those two modalities, equal weights otherwise).
    """
    modalities = list(getattr(data, 'modalities', None) or [])
    if ITEM_ITEM in data.edge_types and 'edge_index' in data[ITEM_ITEM]:
        store = data[ITEM_ITEM]
        recorded_k = getattr(store, 'knn_k', None)
        if recorded_k is None:
            return store.edge_index, _edge_weight_or_ones(store)
        same_k = int(recorded_k) == int(k)
        wanted = (list(modality_weights) if modality_weights is not None
                  else default_modality_weights(modalities) if modalities else None)
        total = float(sum(wanted)) if wanted else 0.0
        wanted = [float(w) / total for w in wanted] if total > 0 else None
        recorded_w = getattr(store, 'knn_weights', None)
        same_w = (recorded_w is not None and wanted is not None
                  and list(getattr(store, 'knn_modalities', [])) == modalities
                  and len(recorded_w) == len(wanted)
                  and all(abs(float(a) - b) < 1e-9 for a, b in zip(recorded_w, wanted)))
        if same_k and same_w:
            return store.edge_index, _edge_weight_or_ones(store)
    if not modalities:
        raise ValueError(f"dataset {getattr(data, 'name', None)!r} has no modality "
                         f"features (data.modalities is empty), so no item-item "
                         f"graph can be built")
    weights = None
    if modality_weights is not None:
        if len(modality_weights) != len(modalities):
            raise ValueError(f"'modality_weights' has {len(modality_weights)} "
                             f"entries but the dataset has {len(modalities)} "
                             f"modalities {modalities} (give one weight per "
                             f"modality, in this order)")
        weights = {m: float(w) for m, w in zip(modalities, modality_weights)}
    copy = data.__copy__()  # shallow: the transform only adds attributes
    copy = ItemKNNGraph(k=k, modalities=modalities, modality_weights=weights)(copy)
    store = copy[ITEM_ITEM]
    return store.edge_index, store.edge_weight


def _edge_weight_or_ones(store) -> Tensor:
    weight = getattr(store, 'edge_weight', None)
    if weight is None:
        weight = torch.ones(store.edge_index.size(1), device=store.edge_index.device)
    return weight


def check_bipartite_edge_index(edge_index: Tensor, num_users: int, num_items: int,
                               name: str = 'edge_index') -> Tensor:
    r"""Validates a ``[2, E]`` user-item ``edge_index`` (row 0 users in
    ``[0, U)``, row 1 items in ``[0, I)``); returns it as ``int64``."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f'{name} must be a LongTensor [2, E], got '
                        f'{type(edge_index).__name__}')
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f'{name} must have shape [2, E], got {list(edge_index.shape)}')
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool:
        raise ValueError(f'{name} must hold integer ids, got {edge_index.dtype}')
    if edge_index.size(1) == 0:
        raise ValueError(f'{name} has no edges (no training interactions)')
    edge_index = edge_index.long()
    for row, what, size in ((0, 'user', num_users), (1, 'item', num_items)):
        lo, hi = int(edge_index[row].min()), int(edge_index[row].max())
        if lo < 0 or hi >= size:
            raise ValueError(f'{name} row {row} ({what} ids) must lie in [0, {size}), '
                             f'found values in [{lo}, {hi}]')
    return edge_index


def check_features(features: Mapping[str, Tensor], num_items: int,
                   owner: str) -> Dict[str, Tensor]:
    r"""Validates ``{modality: [I, d_m]}`` float features; returns a plain dict
    (empty mapping allowed, the caller decides whether that is an error)."""
    if isinstance(features, Tensor) or not isinstance(features, Mapping):
        raise TypeError(f"{owner}: 'features' must be a mapping "
                        f"{{modality: Tensor[I, d_m]}}, got {type(features).__name__}")
    out: Dict[str, Tensor] = {}
    for name, x in features.items():
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{owner}: features[{name!r}] must be a 2-D tensor "
                             f"[num_items, d_m], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.size(0) != num_items:
            raise ValueError(f"{owner}: features[{name!r}] has {x.size(0)} rows but "
                             f"there are {num_items} items")
        if not x.is_floating_point():
            raise ValueError(f"{owner}: features[{name!r}] must be floating point, "
                             f"got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{owner}: features[{name!r}] contains NaN or Inf")
        out[str(name)] = x
    return out


def check_item_graph(edge_index: Tensor, edge_weight: Optional[Tensor],
                     num_items: int, owner: str) -> Tuple[Tensor, Tensor]:
    r"""Validates an item-item graph; returns ``(int64 edge_index, float edge_weight)``."""
    name = f"{owner}: 'item_edge_index'"
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f'{name} must be a LongTensor of shape [2, nnz]')
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool:
        raise ValueError(f'{name} must hold integer ids, got {edge_index.dtype}')
    edge_index = edge_index.long()
    if edge_index.numel() > 0:
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_items:
            raise ValueError(f'{name} ids must lie in [0, {num_items}), found '
                             f'[{lo}, {hi}]')
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1), device=edge_index.device)
    if (not isinstance(edge_weight, Tensor) or edge_weight.dim() != 1
            or edge_weight.numel() != edge_index.size(1)):
        raise ValueError(f"{owner}: 'item_edge_weight' must have shape "
                         f"[{edge_index.size(1)}] (one weight per edge)")
    return edge_index, edge_weight.float()


def item_adjacency(
    features: Mapping[str, Tensor],
    item_edge_index: Optional[Tensor],
    item_edge_weight: Optional[Tensor],
    k: int,
    modality_weights: Optional[Sequence[float]],
    num_items: int,
    owner: str,
) -> Tuple[Tensor, Tensor]:
    r"""The (checked) item-item graph, in PyG's source-to-target order
    (``edge_index[1]`` aggregates from ``edge_index[0]``) as
    :class:`~crane_pyg.transforms.ItemKNNGraph` writes it and
    :class:`~crane_pyg.nn.ItemItemConv` reads it, or built with
    :func:`~crane_pyg.transforms.knn_adjacency` from :obj:`features` when
    :obj:`item_edge_index` is :obj:`None`."""
    if item_edge_index is None:
        weights = (list(modality_weights) if modality_weights is not None
                   else default_modality_weights(list(features)))
        if len(weights) != len(features):
            raise ValueError(f"{owner}: 'modality_weights' has {len(weights)} entries "
                             f"but there are {len(features)} modalities {list(features)}")
        item_edge_index, item_edge_weight = knn_adjacency(
            [x.float() for x in features.values()], k, weights)
    item_edge_index, item_edge_weight = check_item_graph(
        item_edge_index, item_edge_weight, num_items, owner)
    return item_edge_index, item_edge_weight


def require_modalities(owner: str, features: Mapping[str, Tensor]) -> None:
    r"""Raises the models' common error for a dataset without modality features."""
    if not features:
        raise ValueError(f'{owner} needs at least one item modality, but the '
                         f'dataset has none (data.modalities is empty: no '
                         f'<modality>_feat.npy file)')


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f'{owner}: {name!r} must be one of {list(choices)}, got {value!r}')


def check_int(owner: str, name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{owner}: {name!r} must be an int >= {minimum}, got {value!r}')


def check_float(owner: str, name: str, value: Any, minimum: float = 0.0,
                maximum: Optional[float] = None, max_inclusive: bool = True) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and value >= minimum)
    if ok and maximum is not None:
        ok = value <= maximum if max_inclusive else value < maximum
    if not ok:
        upper = '' if maximum is None else f" and {'<=' if max_inclusive else '<'} {maximum}"
        raise ValueError(f'{owner}: {name!r} must be a number >= {minimum}{upper}, '
                         f'got {value!r}')


def degree_sensitive_edge_sample(
    edge_index: Tensor,
    num_users: int,
    num_items: int,
    dropout: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""FREEDOM's degree-sensitive edge pruning: the positions of the
    training edges kept for one epoch.

    Keeps :math:`\lfloor E (1 - p) \rfloor` of the :math:`E` edges, sampled
    *without replacement* with probability proportional to
    :math:`1 / \sqrt{d_u d_i}` (edges between high-degree nodes are dropped
    more often). Sampling uses the Efraimidis-Spirakis keys
    :math:`k_e = \xi_e / w_e`, :math:`\xi_e \sim \mathrm{Exp}(1)`, and keeps
    the smallest keys: the same distribution as sequential weighted sampling
    without replacement (``torch.multinomial(w, n, replacement=False)``),
    vectorised in :math:`O(E \log E)`. The noise is drawn on the CPU from
    :obj:`generator`, so the result depends on the generator state only, not
    on the device.

    Args:
        edge_index (Tensor): ``[2, E]`` training edges (row 0 users, row 1 items).
        num_users (int), num_items (int): :math:`U`, :math:`I`.
        dropout (float): :math:`p \in [0, 1)`, the fraction of edges dropped.
        generator (torch.Generator, optional): a CPU generator.

    Returns:
        LongTensor: sorted positions (into the columns of :obj:`edge_index`)
        of the kept edges, on the device of :obj:`edge_index`.
    """
    num_edges = edge_index.size(1)
    num_keep = int(num_edges * (1.0 - dropout))
    weight = gcn_norm_bipartite(edge_index, num_users, num_items).double().cpu()
    noise = torch.empty(num_edges, dtype=torch.float64).exponential_(generator=generator)
    keys = noise / weight  # weight > 0 for every existing edge
    keep = keys.topk(num_keep, largest=False, sorted=False).indices.sort().values
    return keep.to(edge_index.device)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    r"""A CPU generator seeded with ``seed + epoch`` (reproducible per epoch)."""
    return torch.Generator(device='cpu').manual_seed(int(seed) + int(epoch))


# ----------------------------------------------------------------------
# torch.sparse matrices built by a model itself (MGCN, LGMRec)
# ----------------------------------------------------------------------

#: normalisations of :func:`interaction_matrix`
INTERACTION_NORMS = (None, 'sym', 'row')


def interaction_matrix(edge_index: Tensor, num_users: int, num_items: int,
                       normalize: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    r"""The :math:`U \times I` interaction matrix :math:`\mathbf{R}` of the
    training edges as ``(index, value)``: ``index`` the coalesced ``(user,
    item)`` pairs (a repeated interaction counts once), sorted by user, and

    * ``normalize=None``: :math:`R_{ui} = 1`,
    * ``'sym'``: :math:`\hat{R}_{ui} = 1 / \sqrt{d_u d_i}` (the user-item
      block of LightGCN's :math:`\mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}`),
    * ``'row'``: :math:`\bar{R}_{ui} = 1 / d_u` (the mean over a user's items),

    with :math:`d_u, d_i` the numbers of distinct interactions."""
    if normalize not in INTERACTION_NORMS:
        raise ValueError(f'interaction_matrix: normalize must be one of '
                         f'{list(INTERACTION_NORMS)}, got {normalize!r}')
    index = torch.unique(edge_index.long(), dim=1)  # sorted by (user, item)
    value = torch.ones(index.size(1), device=index.device)
    if normalize is None:
        return index, value
    deg_user = torch.bincount(index[0], minlength=num_users).float()
    if normalize == 'row':
        return index, value / deg_user[index[0]]
    deg_item = torch.bincount(index[1], minlength=num_items).float()
    return index, (deg_user[index[0]] * deg_item[index[1]]).rsqrt()


def bipartite_block_matrix(index: Tensor, value: Tensor,
                           num_users: int) -> Tuple[Tensor, Tensor]:
    r"""The :math:`(U + I) \times (U + I)` matrix
    :math:`\begin{bmatrix} \mathbf{0} & \mathbf{R} \\ \mathbf{R}^\top &
    \mathbf{0} \end{bmatrix}` (users first, item :math:`i` is node
    :math:`U + i`) of a user-item matrix given as ``(index, value)``; with
    :func:`interaction_matrix`'s ``'sym'`` values it is LightGCN's
    normalised adjacency."""
    row = torch.cat([index[0], index[1] + num_users])
    col = torch.cat([index[1] + num_users, index[0]])
    return torch.stack([row, col]), torch.cat([value, value])


def sparse_csr(index: Tensor, value: Tensor, size: Tuple[int, int]) -> Tensor:
    r"""A ``torch.sparse_csr`` matrix of shape :obj:`size` with entries
    ``value`` at ``index`` (``index[0]`` the row; duplicates are summed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*Sparse CSR tensor support is in beta.*')
        coo = torch.sparse_coo_tensor(index, value, size, check_invariants=False)
        return coo.coalesce().to_sparse_csr()


class SparseMatrices:
    r"""Mixin for a :class:`Recommender` that propagates with
    ``torch.sparse`` matrices of its own (put it before :class:`Recommender`
    in the bases). :meth:`register_matrix` stores a matrix as two
    non-persistent buffers ``<name>_index`` / ``<name>_value`` (they follow
    ``to(device / dtype)`` and stay out of ``state_dict``); :meth:`matrix`
    builds its CSR form on first use, cached until :meth:`reset_cache`
    (called by :class:`Recommender` after every ``to()`` / state-dict load);
    :meth:`propagate` is :math:`\mathbf{A}\mathbf{X}` with autograd through
    :math:`\mathbf{X}`, through a cached
    :class:`~crane_pyg.nn.backend.Adjacency` (``'torch_csr'``) of the same
    matrix: its backward multiplies by a CSR of :math:`\mathbf{A}^\top`
    built once, where ``torch.sparse.mm``'s own backward transposes
    :math:`\mathbf{A}` (a sort of its entries) at every call."""

    def register_matrix(self, name: str, index: Tensor, value: Tensor,
                        size: Tuple[int, int]) -> None:
        self.register_buffer(f'{name}_index', index.long(), persistent=False)
        self.register_buffer(f'{name}_value', value.float(), persistent=False)
        sizes = self.__dict__.setdefault('_matrix_sizes', {})
        sizes[name] = (int(size[0]), int(size[1]))
        self.reset_cache()

    def matrix(self, name: str) -> Tensor:
        cache = self.__dict__.setdefault('_matrix_cache', {})
        if name not in cache:
            cache[name] = sparse_csr(getattr(self, f'{name}_index'),
                                     getattr(self, f'{name}_value'),
                                     self.__dict__['_matrix_sizes'][name])
        return cache[name]

    def adjacency(self, name: str) -> Adjacency:
        r"""The matrix :obj:`name` as an :class:`~crane_pyg.nn.backend.Adjacency`
        (``'torch_csr'``; it builds its transpose on the first product that
        needs a gradient and keeps it), cached like :meth:`matrix`."""
        cache = self.__dict__.setdefault('_adjacency_cache', {})
        if name not in cache:
            cache[name] = Adjacency.from_edge_index(getattr(self, f'{name}_index'),
                                                    getattr(self, f'{name}_value'),
                                                    size=self.__dict__['_matrix_sizes'][name],
                                                    backend='torch_csr')
        return cache[name]

    def propagate(self, name: str, x: Tensor) -> Tensor:
        r""":math:`\mathbf{A}\mathbf{X}` for the matrix :obj:`name`
        (:meth:`adjacency`)."""
        return self.adjacency(name).matmul(x)

    def reset_cache(self) -> None:
        self.__dict__['_matrix_cache'] = {}
        self.__dict__['_adjacency_cache'] = {}
        super().reset_cache()


class ModalityGraphRecommender(SparseMatrices, Recommender):
    r"""Base of the models that read the item modality features and propagate
    ID embeddings with LightGCN over ``torch.sparse`` matrices of their own
    (:class:`~crane_pyg.models.MGCN`, :class:`~crane_pyg.models.LGMRec`).

    A subclass validates its options, calls :meth:`_setup` (attributes, the
    normalised user-item graph ``'adj'``, the ID embeddings
    ``user_embedding`` / ``item_embedding``) and builds its own modules;
    :meth:`lightgcn` is the collaborative / ID view and :meth:`extra_repr`
    lists every option."""

    @classmethod
    def _args_from_data(cls, data: HeteroData, options: Dict[str, Any]) -> Dict[str, Any]:
        args = super()._args_from_data(data, options)
        args['features'] = modality_features(data)
        return args

    def _setup(self, edge_index: Tensor, features: Mapping[str, Tensor],
               options: Mapping[str, Any]) -> Tuple[Tensor, Dict[str, Tensor]]:
        r"""Stores :obj:`options` as attributes, validates the interactions
        and the features (at least one modality), registers LightGCN's
        :math:`\mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}` on the
        :math:`U + I` nodes as matrix ``'adj'`` and creates the ID embeddings
        (``options['embedding_dim']`` wide). Returns the checked
        ``(edge_index, features)``."""
        owner = type(self).__name__
        features = check_features(features, self.num_items, owner)
        require_modalities(owner, features)
        for key, value in options.items():
            setattr(self, key, value)
        self.modalities = list(features)
        edge_index = self._check_edge_index(edge_index)
        num_nodes = self.num_users + self.num_items
        index, value = interaction_matrix(edge_index, self.num_users, self.num_items, 'sym')
        self.register_matrix('adj', *bipartite_block_matrix(index, value, self.num_users),
                             (num_nodes, num_nodes))
        self.user_embedding = nn.Embedding(self.num_users, options['embedding_dim'])
        self.item_embedding = nn.Embedding(self.num_items, options['embedding_dim'])
        return edge_index, features

    def lightgcn(self, num_layers: int) -> Tensor:
        r"""LightGCN's :math:`\frac{1}{L+1}\sum_{l=0}^{L}\hat{\mathbf{A}}^{l}
        [\mathbf{E}_U; \mathbf{E}_I]`, ``[U + I, d]`` (users first)."""
        x = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        total = x
        for _ in range(num_layers):
            x = self.propagate('adj', x)
            total = total + x
        return total / (num_layers + 1)

    def extra_repr(self) -> str:
        shown = [f'{key}={getattr(self, key)!r}' for key in self.options()
                 if hasattr(self, key)]
        return ', '.join([super().extra_repr(), f'modalities={self.modalities}'] + shown)
