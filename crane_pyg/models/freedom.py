r"""FREEDOM (Zhou & Shen, ACM MM 2023): a frozen item-item graph and a
denoised user-item graph."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor, nn
from torch_geometric.data import HeteroData

from crane_pyg.models.base import (
    Recommender,
    check_features,
    check_float,
    check_int,
    degree_sensitive_edge_sample,
    epoch_generator,
    item_adjacency,
    item_graph_from_data,
    modality_features,
)
from crane_pyg.nn import BPRLoss, ItemItemConv, LayerCombination, UserItemConv

__all__ = ['FREEDOM']


class FREEDOM(Recommender):
    r"""FREEDOM from `"A Tale of Two Graphs: Freezing and Denoising Graph
    Structures for Multimodal Recommendation"
    <https://arxiv.org/abs/2211.06924>`_, as in the MMRec toolbox
    (reimplemented from the paper's description).

    **Item-item graph (frozen).** A kNN graph :math:`\hat{\mathbf{S}} =
    \sum_m w_m \hat{\mathbf{S}}_m` built once from the raw modality
    features (cosine top-:math:`k`, symmetrically normalised, fused with
    FREEDOM's weights image 0.1 / text 0.9 when the modalities are exactly
    those two, equal weights otherwise; see
    :class:`~crane_pyg.transforms.ItemKNNGraph`). It propagates the item ID
    embeddings :math:`L_{mm}` times: :math:`\mathbf{H} =
    \hat{\mathbf{S}}^{L_{mm}} \mathbf{E}_I`.

    **User-item graph (denoised).** LightGCN over the ID embeddings
    (:math:`L_{ui}` layers, mean over layers 0..L) gives
    :math:`\mathbf{u}_g, \mathbf{i}_g`. During training the graph is
    *degree-sensitively pruned* at every epoch: :math:`\lfloor E(1-p)
    \rfloor` edges are kept, sampled without replacement with probability
    :math:`\propto 1/\sqrt{d_u d_i}`, and re-normalised with the degrees of
    the kept graph (:func:`~crane_pyg.models.base.degree_sensitive_edge_sample`);
    evaluation (:meth:`embeddings`) uses the full graph.

    **Representations and loss.** :math:`\mathbf{e}_u = \mathbf{u}_g`,
    :math:`\mathbf{e}_i = \mathbf{i}_g + \mathbf{h}_i`, and

    .. math::
        \mathcal{L} = \mathrm{BPR}(\mathbf{e}_u, \mathbf{e}_{i^+},
        \mathbf{e}_{i^-}) + \lambda \sum_m \mathrm{BPR}\big(\mathbf{u}_g,
        \mathbf{P}_m \mathbf{f}_m(i^+), \mathbf{P}_m \mathbf{f}_m(i^-)\big)

    with a linear map :math:`\mathbf{P}_m: \mathbb{R}^{d_m} \to
    \mathbb{R}^d` per modality (only needed, and only created, when
    :math:`\lambda > 0`; without bias, since a bias cancels in the BPR
    difference). The modality features do not enter the scores: they
    shape the frozen graph and, through the second term, the user
    embeddings.

    Args:
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        edge_index (Tensor): ``[2, E]`` training interactions (row 0 users,
            row 1 items).
        features (Mapping[str, Tensor]): ``{modality: [I, d_m]}``, at least one.
        item_edge_index (Tensor, optional): ``[2, nnz]`` item-item graph in the
            orientation of :class:`~crane_pyg.transforms.ItemKNNGraph`
            (``edge_index[1]`` aggregates from ``edge_index[0]``); built from
            :obj:`features` when omitted.
        item_edge_weight (Tensor, optional): ``[nnz]`` its (normalised) weights.
        embedding_dim (int): :math:`d`. (default: ``64``)
        num_ui_layers (int): :math:`L_{ui}`. (default: ``2``)
        num_mm_layers (int): :math:`L_{mm}`. (default: ``1``)
        knn_k (int): neighbours per item of the kNN graph. (default: ``10``)
        modality_weights (tuple of float, optional): fusion weights of the kNN
            graphs, one per modality in the order of ``data.modalities``;
            :obj:`None`: image 0.1 / text 0.9 for exactly those two modalities,
            equal otherwise. (default: :obj:`None`)
        dropout (float): fraction :math:`p` of user-item edges pruned at each
            training epoch (MMRec's best for most datasets; its grid is
            {0.8, 0.9}). (default: ``0.8``)
        reg_weight (float): :math:`\lambda` (MMRec's grid: {0, 1e-5, 1e-4,
            1e-3}). (default: ``1e-4``)
        tune_features (bool): make the raw features trainable, as MMRec does
            (``nn.Embedding.from_pretrained(..., freeze=False)``); they then
            only receive gradient from the :math:`\lambda` term.
            (default: :obj:`False`)
        seed (int): seed of the edge pruning; epoch :math:`t` uses
            ``seed + t``, so a resumed run prunes identically.
            (default: ``0``)
        backend (str): sparse backend of the propagation. (default: ``'auto'``)
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        features: Mapping[str, Tensor],
        item_edge_index: Optional[Tensor] = None,
        item_edge_weight: Optional[Tensor] = None,
        *,
        embedding_dim: int = 64,
        num_ui_layers: int = 2,
        num_mm_layers: int = 1,
        knn_k: int = 10,
        modality_weights: Optional[Tuple[float, ...]] = None,
        dropout: float = 0.8,
        reg_weight: float = 1e-4,
        tune_features: bool = False,
        seed: int = 0,
        backend: str = 'auto',
    ) -> None:
        super().__init__(num_users, num_items)
        name = type(self).__name__
        check_int(name, 'embedding_dim', embedding_dim, 1)
        check_int(name, 'num_ui_layers', num_ui_layers, 0)
        check_int(name, 'num_mm_layers', num_mm_layers, 0)
        check_int(name, 'knn_k', knn_k, 1)
        check_float(name, 'dropout', dropout, 0.0, 1.0, max_inclusive=False)
        check_float(name, 'reg_weight', reg_weight)
        check_int(name, 'seed', seed, 0)
        features = check_features(features, num_items, name)
        if not features:
            raise ValueError(f'{name} needs at least one item modality, but the '
                             f'dataset has none (data.modalities is empty: no '
                             f'<modality>_feat.npy file)')
        self.embedding_dim = embedding_dim
        self.num_ui_layers = num_ui_layers
        self.num_mm_layers = num_mm_layers
        self.knn_k = knn_k
        self.dropout = float(dropout)
        self.reg_weight = float(reg_weight)
        self.tune_features = bool(tune_features)
        self.seed = seed
        self.modalities = list(features)

        edge_index = self._check_edge_index(edge_index)
        self.register_buffer('edge_index', edge_index, persistent=False)
        # The pruned graph of the current epoch (derived from seed + epoch,
        # hence not part of the state_dict).
        self.register_buffer('train_edge_index', edge_index, persistent=False)
        self._pruned_epoch: Optional[int] = None

        # ItemKNNGraph's source -> target order, as ItemItemConv reads it
        adj_index, adj_weight = item_adjacency(features, item_edge_index, item_edge_weight,
                                               knn_k, modality_weights, num_items, name)
        self.register_buffer('item_adj_index', adj_index, persistent=False)
        self.register_buffer('item_adj_weight', adj_weight, persistent=False)

        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        self.ui_encoder = LayerCombination(UserItemConv(cached=True, backend=backend),
                                           num_ui_layers)
        self.ui_train_encoder = LayerCombination(
            UserItemConv(cached=True, backend=backend), num_ui_layers)
        self.mm_conv = ItemItemConv(cached=True, backend=backend)

        self.feature_dims = [int(x.size(1)) for x in features.values()]
        self.features = nn.ParameterList() if self.tune_features else None
        self.projections = nn.ModuleList()
        for m, x in enumerate(features.values()):
            if self.tune_features:
                self.features.append(nn.Parameter(x.detach().float().clone()))
            else:
                self.register_buffer(f'feature_{m}', x.float(), persistent=False)
            if self.reg_weight > 0:
                self.projections.append(nn.Linear(x.size(1), embedding_dim, bias=False))
        self.bpr = BPRLoss()
        self.reset_parameters()
        self._prune(0)

    @classmethod
    def _args_from_data(cls, data: HeteroData, options: Dict[str, Any]) -> Dict[str, Any]:
        args = super()._args_from_data(data, options)
        args['features'] = modality_features(data)
        if args['features']:
            args['item_edge_index'], args['item_edge_weight'] = item_graph_from_data(
                data, options['knn_k'], options['modality_weights'])
        return args

    def reset_parameters(self) -> None:
        r"""Xavier-uniform ID embeddings, Xavier-normal projections (as MMRec)."""
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        for proj in self.projections:
            nn.init.xavier_normal_(proj.weight)
        self.reset_cache()

    # ------------------------------------------------------------------
    def _feature(self, m: int) -> Tensor:
        return self.features[m] if self.tune_features else getattr(self, f'feature_{m}')

    def _prune(self, epoch: int) -> None:
        if self.dropout > 0:
            keep = degree_sensitive_edge_sample(self.edge_index, self.num_users,
                                                self.num_items, self.dropout,
                                                epoch_generator(self.seed, epoch))
            self.train_edge_index = self.edge_index[:, keep]
        self.ui_train_encoder.reset_parameters()  # drops the cached adjacency
        self._pruned_epoch = epoch

    def on_epoch_start(self, epoch: int) -> None:
        r"""Samples the pruned user-item graph of :obj:`epoch` (from
        ``seed + epoch``)."""
        if self.dropout > 0 and epoch != self._pruned_epoch:
            self._prune(int(epoch))

    def item_semantic(self) -> Tensor:
        r""":math:`\mathbf{H} = \hat{\mathbf{S}}^{L_{mm}} \mathbf{E}_I`."""
        h = self.item_embedding.weight
        for _ in range(self.num_mm_layers):
            h = self.mm_conv(h, self.item_adj_index, self.item_adj_weight)
        return h

    def _forward(self, train_graph: bool) -> Tuple[Tensor, Tensor, Tensor]:
        if train_graph:
            encoder, edge_index = self.ui_train_encoder, self.train_edge_index
        else:
            encoder, edge_index = self.ui_encoder, self.edge_index
        u_g, i_g = encoder((self.user_embedding.weight, self.item_embedding.weight),
                           edge_index)
        return u_g, i_g, self.item_semantic()

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        u_g, i_g, h = self._forward(train_graph=False)
        return u_g, i_g + h

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        u_g, i_g, h = self._forward(train_graph=self.training)
        u = u_g.index_select(0, users)
        item = i_g + h
        pos, neg = item.index_select(0, pos_items), item.index_select(0, neg_items)
        bpr = self.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        total, parts = bpr, {'bpr': bpr.item()}
        if self.reg_weight > 0:
            modal = u.new_zeros(())
            for m, proj in enumerate(self.projections):
                feature = self._feature(m)
                p_pos = proj(feature.index_select(0, pos_items))
                p_neg = proj(feature.index_select(0, neg_items))
                modal = modal + self.bpr((u * p_pos).sum(-1), (u * p_neg).sum(-1))
            modal = self.reg_weight * modal
            total = total + modal
            parts['modal_bpr'] = modal.item()
        return total, parts

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, modalities={self.modalities}, '
                f'embedding_dim={self.embedding_dim}, num_ui_layers={self.num_ui_layers}, '
                f'num_mm_layers={self.num_mm_layers}, knn_k={self.knn_k}, '
                f'dropout={self.dropout}, reg_weight={self.reg_weight}')
