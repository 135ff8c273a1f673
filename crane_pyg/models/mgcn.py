r"""MGCN (Yu et al., ACM MM 2023): purified modality features, item-item and
user-item views, and a behaviour-aware fuser."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from crane_pyg.models.base import (
    ModalityGraphRecommender,
    check_choice,
    check_float,
    check_int,
    interaction_matrix,
)
from crane_pyg.nn import BPRLoss, EmbeddingL2, InfoNCE, RecursiveCrossModalAttention
from crane_pyg.transforms import knn_adjacency

__all__ = ['MGCN']

#: what a modality view propagates (``modality_input``); ``'purified'`` is MGCN
MODALITY_INPUTS = ('purified', 'features', 'ids')
#: how the modality views are fused (``fuser``); ``'attention'`` is MGCN
FUSERS = ('attention', 'mean')


class MGCN(ModalityGraphRecommender):
    r"""MGCN from `"Multi-View Graph Convolutional Network for Multimedia
    Recommendation" <https://arxiv.org/abs/2308.03588>`_, our own code
    after the paper's description, the equations as MMRec's reference model
    (``src/models/mgcn.py``) computes them, with the settings of MMRec's
    ``MGCN.yaml`` and of the authors' release (``demonph10/MGCN``).

    Let :math:`\mathbf{E}_U, \mathbf{E}_I` be the ID embeddings (dimension
    :math:`d`), :math:`\mathbf{X}_m \in \mathbb{R}^{I \times d_m}` the
    features of modality :math:`m \in \{1..M\}`, :math:`\hat{\mathbf{A}}`
    LightGCN's normalised :math:`(U+I)`-node adjacency and
    :math:`\hat{\mathbf{R}} = \mathbf{D}_U^{-1/2}\mathbf{R}\mathbf{D}_I^{-1/2}`
    its user-item block.

    **Behaviour-guided purifier.** Each modality is projected and gated by
    the item ID embedding, keeping only the preference-related part:

    .. math::
        \dot{\mathbf{X}}_m = \mathbf{X}_m \mathbf{W}_m + \mathbf{b}_m, \qquad
        \ddot{\mathbf{E}}_{I,m} = \mathbf{E}_I \odot
        \sigma(\dot{\mathbf{X}}_m \mathbf{W}_{g,m} + \mathbf{b}_{g,m}).

    **Item-item view (per modality).** A kNN graph
    :math:`\mathbf{S}_m` on the raw features: cosine top-:math:`k` (the item
    itself included), *cosine-valued*, symmetrically normalised with its row
    sums, :math:`\hat{S}_m[i,j] = S_m[i,j] / \sqrt{d_i d_j}`
    (:func:`~crane_pyg.transforms.knn_adjacency` with ``binary=False``), one
    graph per modality, frozen. Items propagate :math:`L_{mm}` times and
    users aggregate their items:

    .. math::
        \mathbf{H}_{I,m} = \hat{\mathbf{S}}_m^{L_{mm}}\ddot{\mathbf{E}}_{I,m},
        \qquad \mathbf{H}_{U,m} = \hat{\mathbf{R}}\mathbf{H}_{I,m}, \qquad
        \mathbf{H}_m = [\mathbf{H}_{U,m}; \mathbf{H}_{I,m}].

    **User-item (ID) view.** LightGCN, mean over layers :math:`0..L_{ui}`:
    :math:`\bar{\mathbf{E}} = \frac{1}{L_{ui}+1}\sum_{l=0}^{L_{ui}}
    \hat{\mathbf{A}}^l [\mathbf{E}_U; \mathbf{E}_I]`.

    **Behaviour-aware fuser.** Attention over the modalities gives the
    modality-shared part, the rest of each modality is its specific part,
    gated by the node's behaviour (ID-view) representation:

    .. math::
        \alpha_m = \operatorname{softmax}_m\big(\mathbf{q}^\top
        \tanh(\mathbf{W}_q \mathbf{h}_m + \mathbf{b}_q)\big), \qquad
        \mathbf{h}^{c} = \sum_m \alpha_m \mathbf{h}_m, \qquad
        \tilde{\mathbf{h}}_m = \sigma(\mathbf{W}_{p,m}\bar{\mathbf{e}} +
        \mathbf{b}_{p,m}) \odot (\mathbf{h}_m - \mathbf{h}^{c}),

    .. math::
        \mathbf{h}^{side} = \frac{1}{M+1}\Big(\mathbf{h}^{c} + \sum_m
        \tilde{\mathbf{h}}_m\Big), \qquad
        \mathbf{e} = \bar{\mathbf{e}} + \mathbf{h}^{side}, \qquad
        s(u, i) = \langle \mathbf{e}_u, \mathbf{e}_i \rangle.

    **Loss.** For a batch of :math:`B` triples,

    .. math::
        \mathcal{L} = \mathrm{BPR}(\mathbf{e}_u, \mathbf{e}_{i^+},
        \mathbf{e}_{i^-}) + \lambda_{cl}\big(\mathrm{NCE}(\mathbf{h}^{side}_{i^+},
        \bar{\mathbf{e}}_{i^+}) + \mathrm{NCE}(\mathbf{h}^{side}_{u},
        \bar{\mathbf{e}}_{u})\big) + \frac{\lambda}{2B}\big(\lVert
        \mathbf{e}_u\rVert^2 + \lVert\mathbf{e}_{i^+}\rVert^2 +
        \lVert\mathbf{e}_{i^-}\rVert^2\big),

    :math:`\mathrm{NCE}` the one-directional in-batch InfoNCE of
    :class:`~crane_pyg.nn.InfoNCE` (cosine, temperature :math:`\tau`) over
    the batch's rows as they come (a user or item drawn twice is its own
    negative, as in MMRec).

    **Defaults and their sources.** ``embedding_dim=64``,
    ``num_ui_layers=2``, ``num_mm_layers=1`` (``n_layers``), ``knn_k=10``,
    ``reg_weight=1e-4``, ``temperature=0.2``: MMRec's ``MGCN.yaml`` and
    model file; ``cl_weight=0.01``: the authors' ``MGCN.yaml`` (MMRec
    searches ``cl_loss`` in {0.001, 0.01, 0.1}); ``tune_features=True``:
    MMRec fine-tunes the raw features (``from_pretrained(freeze=False)``).
    Initialisation as MMRec: Xavier-uniform ID embeddings, PyTorch's default
    for the linear layers.

    **Deviations.** (1) Any number :math:`M \geq 1` of modalities (the paper
    and MMRec hard-code image + text; for :math:`M = 2` the formulas above
    are theirs, the :math:`1/(M+1)` being their :math:`1/3`). (2) MMRec
    decays the learning rate by :math:`0.96` every 50 epochs
    (``learning_rate_scheduler: [0.96, 50]``); our trainer has no scheduler,
    so the rate stays constant (a factor :math:`\geq 0.92` over the first 100
    epochs). (3) The L2 term divides by the batch's size, MMRec by the
    configured batch size (they differ only on an epoch's last batch). (4)
    Negative cosine similarities among the :math:`k` nearest neighbours are
    dropped from :math:`\mathbf{S}_m` (MMRec keeps them; with the item itself
    among its neighbours they are rare).

    Args:
        num_users (int), num_items (int): :math:`U` and :math:`I`.
        edge_index (Tensor): the ``[2, E]`` training pairs (users in row 0).
        features (Mapping[str, Tensor]): one ``[I, d_m]`` tensor per modality
            (one modality at least).
        embedding_dim (int): :math:`d`. (default: ``64``)
        num_ui_layers (int): :math:`L_{ui}`, LightGCN layers of the ID view.
            (default: ``2``)
        num_mm_layers (int): :math:`L_{mm}`, item-item layers of the modality
            views. (default: ``1``)
        knn_k (int): neighbours per item of each modality's kNN graph.
            (default: ``10``)
        cl_weight (float): :math:`\lambda_{cl}`. (default: ``0.01``)
        temperature (float): :math:`\tau` of the InfoNCE terms.
            (default: ``0.2``)
        reg_weight (float): :math:`\lambda`, L2 on the batch's final
            representations. (default: ``1e-4``)
        tune_features (bool): train the raw features :math:`\mathbf{X}_m`
            too (MMRec does). (default: :obj:`True`)
        num_recursions (int): not MGCN: :math:`R > 0` refines the projected
            modalities :math:`[\dot{\mathbf{X}}_1, \dots, \dot{\mathbf{X}}_M]`
            of every item with CRANE's
            :class:`~crane_pyg.nn.RecursiveCrossModalAttention` (``R``
            recursions, :meth:`~crane_pyg.nn.RecursiveCrossModalAttention.refine`)
            before the purifier, to measure what RCA adds to MGCN's pipeline.
            On TikTok (seed 999) it tracked MGCN for 18 epochs and then
            overfitted (README "Results"). ``0``: MGCN. (default: ``0``)
        modality_input (str): not MGCN, a dissection: what each modality view
            propagates. ``'purified'`` is MGCN, :math:`\ddot{\mathbf{E}}_{I,m}`;
            ``'features'`` the projected content alone,
            :math:`\dot{\mathbf{X}}_m` (no ID gate, as CRANE's semantic
            view); ``'ids'`` the item ID embeddings :math:`\mathbf{E}_I`, so
            the content enters only through the kNN graphs
            :math:`\mathbf{S}_m`. (default: ``'purified'``)
        fuser (str): not MGCN, a dissection: ``'attention'`` is MGCN's
            behaviour-aware fuser; ``'mean'`` replaces it by
            :math:`\mathbf{h}^{side} = \frac{1}{M}\sum_m \mathbf{h}_m`.
            (default: ``'attention'``)
    """

    def __init__(self, num_users: int, num_items: int, edge_index: Tensor,
                 features: Mapping[str, Tensor], *, embedding_dim: int = 64,
                 num_ui_layers: int = 2, num_mm_layers: int = 1, knn_k: int = 10,
                 cl_weight: float = 0.01, temperature: float = 0.2,
                 reg_weight: float = 1e-4, tune_features: bool = True,
                 num_recursions: int = 0, modality_input: str = 'purified',
                 fuser: str = 'attention') -> None:
        super().__init__(num_users, num_items)
        owner = type(self).__name__
        check_int(owner, 'embedding_dim', embedding_dim, 1)
        check_int(owner, 'knn_k', knn_k, 1)
        for option, value in (('num_ui_layers', num_ui_layers),
                              ('num_mm_layers', num_mm_layers),
                              ('num_recursions', num_recursions)):
            check_int(owner, option, value, 0)
        for option, value in (('cl_weight', cl_weight), ('reg_weight', reg_weight)):
            check_float(owner, option, value)
        check_float(owner, 'temperature', temperature, 1e-6)
        check_choice(owner, 'modality_input', modality_input, MODALITY_INPUTS)
        check_choice(owner, 'fuser', fuser, FUSERS)
        if modality_input == 'ids' and num_recursions > 0:
            raise ValueError(f"{owner}: 'num_recursions' > 0 needs the content in the "
                             f"views ('modality_input' 'purified' or 'features'), got "
                             f"modality_input='ids'")
        if knn_k >= num_items:
            raise ValueError(f"{owner}: 'knn_k' must be smaller than the number of "
                             f"items ({num_items}), got {knn_k}")
        edge_index, features = self._setup(edge_index, features, dict(
            embedding_dim=embedding_dim, num_ui_layers=num_ui_layers,
            num_mm_layers=num_mm_layers, knn_k=knn_k, cl_weight=float(cl_weight),
            temperature=float(temperature), reg_weight=float(reg_weight),
            tune_features=bool(tune_features), num_recursions=int(num_recursions),
            modality_input=modality_input, fuser=fuser))

        # the modality views: R-hat (users aggregate items), one kNN graph per modality
        index, value = interaction_matrix(edge_index, num_users, num_items, 'sym')
        self.register_matrix('ui', index, value, (num_users, num_items))
        # only the parts the dissection options use are built (every
        # parameter of the model receives a gradient; 'ids' keeps no features)
        content = modality_input != 'ids'
        dims = []
        for m, x in enumerate(features.values()):
            # knn_adjacency stores S[i, j] as the edge (j, i): flip to rows.
            knn_index, knn_value = knn_adjacency([x.float()], knn_k, binary=False,
                                                 normalize='sym')
            self.register_matrix(f'knn_{m}', knn_index.flip(0), knn_value,
                                 (num_items, num_items))
            if content:
                self.register_buffer(f'raw_feature_{m}', x.detach().float(),
                                     persistent=False)
            dims.append(int(x.size(1)))
        self.features = nn.ParameterList(
            [nn.Parameter(x.detach().float().clone()) for x in features.values()]
            if self.tune_features and content else [])
        d = embedding_dim
        self.feature_proj = nn.ModuleList(nn.Linear(dim, d) for dim in dims if content)
        self.purifier = nn.ModuleList(nn.Linear(d, d) for _ in dims
                                      if modality_input == 'purified')
        self.rca = (RecursiveCrossModalAttention(len(dims), d, num_recursions, output='mean')
                    if self.num_recursions > 0 else None)
        attention = fuser == 'attention'
        self.preference = nn.ModuleList(nn.Linear(d, d) for _ in dims if attention)
        self.attention = (nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
                          if attention else None)
        self.bpr = BPRLoss()
        self.nce = InfoNCE(temperature, symmetric=False)
        self.l2 = EmbeddingL2('squared')
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Xavier-uniform ID embeddings, PyTorch's default for the linear
        layers (as MMRec), tuned features back to the raw ones."""
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.rca is not None:
            self.rca.reset_parameters()
        with torch.no_grad():
            for m, param in enumerate(self.features):
                param.copy_(getattr(self, f'raw_feature_{m}'))
        self.reset_cache()

    # ------------------------------------------------------------------
    def _feature(self, m: int) -> Tensor:
        return self.features[m] if self.tune_features else getattr(self, f'raw_feature_{m}')

    def projected(self) -> List[Tensor]:
        r""":math:`\dot{\mathbf{X}}_m` of every modality, refined by RCA
        when ``num_recursions > 0``."""
        x = [proj(self._feature(m)) for m, proj in enumerate(self.feature_proj)]
        if self.rca is None:
            return x
        return list(self.rca.refine(torch.stack(x, dim=1)).unbind(1))

    def purified(self, m: int, projected: Optional[Tensor] = None) -> Tensor:
        r""":math:`\ddot{\mathbf{E}}_{I,m} = \mathbf{E}_I \odot
        \sigma(\dot{\mathbf{X}}_m \mathbf{W}_{g,m} + \mathbf{b}_{g,m})`, ``[I, d]``
        (:obj:`projected`: :math:`\dot{\mathbf{X}}_m`, from :meth:`projected`
        when not given)."""
        if not len(self.purifier):
            raise ValueError(f"MGCN: purified views need modality_input='purified', "
                             f"got {self.modality_input!r}")
        if projected is None:
            projected = self.projected()[m]
        return self.item_embedding.weight * torch.sigmoid(self.purifier[m](projected))

    def modality_input_of(self, m: int, projected: Optional[Tensor]) -> Tensor:
        r"""What modality :math:`m`'s view propagates, ``[I, d]``:
        :math:`\ddot{\mathbf{E}}_{I,m}`, :math:`\dot{\mathbf{X}}_m` or
        :math:`\mathbf{E}_I` (``modality_input``)."""
        if self.modality_input == 'purified':
            return self.purified(m, projected)
        if self.modality_input == 'features':
            return self.projected()[m] if projected is None else projected
        return self.item_embedding.weight

    def modality_view(self, m: int, projected: Optional[Tensor]) -> Tensor:
        r""":math:`\mathbf{H}_m = [\hat{\mathbf{R}}\mathbf{H}_{I,m};
        \mathbf{H}_{I,m}]`, ``[U + I, d]``."""
        h = self.modality_input_of(m, projected)
        for _ in range(self.num_mm_layers):
            h = self.propagate(f'knn_{m}', h)
        return torch.cat([self.propagate('ui', h), h])

    def fuse(self, views: List[Tensor], behaviour: Tensor) -> Tensor:
        r""":math:`\mathbf{h}^{side}` from the modality views
        :math:`\mathbf{H}_m` and the ID view :math:`\bar{\mathbf{E}}`."""
        stacked = torch.stack(views, dim=1)                      # [N, M, d]
        if self.attention is None:                               # fuser='mean'
            return stacked.mean(dim=1)
        weight = torch.softmax(self.attention(stacked), dim=1)   # [N, M, 1]
        common = (weight * stacked).sum(dim=1)
        side = common
        for m, view in enumerate(views):
            side = side + torch.sigmoid(self.preference[m](behaviour)) * (view - common)
        return side / (len(views) + 1)

    def _forward(self) -> Tuple[Tensor, Tensor]:
        behaviour = self.lightgcn(self.num_ui_layers)
        projected = (self.projected() if self.modality_input != 'ids'
                     else [None] * len(self.modalities))
        views = [self.modality_view(m, x) for m, x in enumerate(projected)]
        return behaviour, self.fuse(views, behaviour)

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        behaviour, side = self._forward()
        return (behaviour + side).split([self.num_users, self.num_items])

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        behaviour, side = self._forward()
        user_emb, item_emb = (behaviour + side).split([self.num_users, self.num_items])
        u = user_emb.index_select(0, users)
        pos, neg = item_emb.index_select(0, pos_items), item_emb.index_select(0, neg_items)
        bpr = self.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        reg = self.reg_weight * self.l2(u, pos, neg)
        item_nodes = pos_items + self.num_users
        cl = self.cl_weight * (
            self.nce(side.index_select(0, item_nodes), behaviour.index_select(0, item_nodes))
            + self.nce(side.index_select(0, users), behaviour.index_select(0, users)))
        return bpr + reg + cl, {'bpr': bpr.item(), 'reg': reg.item(), 'cl': cl.item()}
