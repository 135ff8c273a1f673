r"""CRANE: Cross-Modal Attention Network with Dual Graph Learning
(Zhao et al., arXiv 2601.11151), as reconstructed in crane_pyg."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import coalesce

from crane_pyg.models.base import (
    Recommender,
    check_choice,
    check_features,
    check_float,
    check_int,
    degree_sensitive_edge_sample,
    epoch_generator,
    item_adjacency,
    item_graph_from_data,
    modality_features,
)
from crane_pyg.nn import (
    BPRLoss,
    EmbeddingL2,
    InfoNCE,
    ItemItemConv,
    LayerCombination,
    RecursiveCrossModalAttention,
    UserItemConv,
    UserProfileAggregation,
)
from crane_pyg.nn.loss import L2_FORMS
from crane_pyg.transforms import knn_adjacency

__all__ = ['CRANE', 'UserProfiles']

#: the pairs of views the contrastive term can tie (``cl_pair``)
CL_PAIRS = ('id_semantic', 'ui_ii')

#: the views :meth:`CRANE.view_embeddings` can score with
VIEWS = ('full', 'behavioural', 'semantic')

#: buffers holding the (possibly rebuilt) item-item graph; their number of
#: entries changes with every rebuild
_GRAPH_BUFFERS = ('item_adj_index', 'item_adj_weight')


class UserProfiles(nn.Module):
    r"""CRANE's user multimodal profiles (step 2 of :class:`CRANE`),
    :math:`\mathbf{p}_m(u) = \sum_{i \in \mathcal{N}(u)} a_{ui}
    \mathbf{x}_m(i)` with :math:`\mathbf{x}_m = \mathbf{W}_m \mathbf{f}_m +
    \mathbf{b}_m`, one :class:`~crane_pyg.nn.UserProfileAggregation` step
    item :math:`\to` user. With ``precompute=True`` the raw features are
    aggregated once, :math:`\bar{\mathbf{f}}_m(u) = \sum_i a_{ui}
    \mathbf{f}_m(i)` and :math:`s(u) = \sum_i a_{ui}` (non-persistent
    buffers ``feature_<m>`` ``[U, d_m]`` and ``mass`` ``[U]``), and a call
    only projects the requested users, :math:`\mathbf{p}_m(u) = \mathbf{W}_m
    \bar{\mathbf{f}}_m(u) + s(u) \mathbf{b}_m` (the same numbers, since
    :math:`\mathbf{W}_m` is linear).

    Args:
        features (list of Tensor): ``[I, d_m]`` per modality.
        edge_index (Tensor): ``[2, E]`` training interactions, row 0 users.
        num_users (int): :math:`U`.
        normalize (str): ``'mean'`` or ``'sym'`` (:math:`a_{ui}`).
        precompute (bool): aggregate the raw features once (see above).
        backend (str): sparse backend.

    Shapes:
        - **input:** ``x_item`` :math:`(I, M, d)` (unused with
          ``precompute=True``), ``users`` :math:`(U_b)` or :obj:`None` (all),
          ``encoders`` the :math:`M` :class:`~torch.nn.Linear` encoders;
        - **output:** :math:`(U_b, M, d)`.
    """

    def __init__(self, features: List[Tensor], edge_index: Tensor, num_users: int,
                 normalize: str = 'mean', precompute: bool = True,
                 backend: str = 'auto') -> None:
        super().__init__()
        self.num_users, self.num_items = int(num_users), int(features[0].size(0))
        self.precompute = bool(precompute)
        self.aggregation = UserProfileAggregation(normalize, cached=True, backend=backend)
        size = (self.num_items, self.num_users)
        if self.precompute:
            # one normalised adjacency for every modality and the mass, on the
            # features' device (edge_index may live elsewhere)
            device = features[0].device
            graph = edge_index.to(device).flip(0)
            with torch.no_grad():
                for m, x in enumerate(features):
                    self.register_buffer(f'feature_{m}',
                                         self.aggregation((x.float(), None), graph, size=size),
                                         persistent=False)
                ones = torch.ones(self.num_items, 1, device=device)
                self.register_buffer('mass', self.aggregation((ones, None), graph,
                                                              size=size).squeeze(-1),
                                     persistent=False)
            self.aggregation.reset_cache()
        else:  # items -> users, PyG's source-to-target order
            self.register_buffer('item_user_index', edge_index.flip(0), persistent=False)

    def forward(self, x_item: Optional[Tensor], users: Optional[Tensor],
                encoders: nn.ModuleList) -> Tensor:
        if self.precompute:
            mass = self.mass if users is None else self.mass.index_select(0, users)
            out = []
            for m, enc in enumerate(encoders):
                agg = getattr(self, f'feature_{m}')
                if users is not None:
                    agg = agg.index_select(0, users)
                out.append(torch.addmm(mass.unsqueeze(-1) * enc.bias, agg, enc.weight.t()))
            return torch.stack(out, dim=1)
        profiles = self.aggregation((x_item, None), self.item_user_index,
                                    size=(x_item.size(0), self.num_users))
        return profiles if users is None else profiles.index_select(0, users)

    def extra_repr(self) -> str:
        return (f'num_users={self.num_users}, normalize={self.aggregation.normalize!r}, '
                f'precompute={self.precompute}')


class CRANE(Recommender):
    r"""CRANE from `"Cross-Modal Attention Network with Dual Graph Learning in
    Multimodal Recommendation" <https://arxiv.org/abs/2601.11151>`_, as
    reconstructed in crane_pyg (the paper gives the components; the algebra
    and every default below are ours, each a named option).

    With :math:`M` modalities of item features :math:`\mathbf{f}_m(i) \in
    \mathbb{R}^{d_m}` and embedding size :math:`d`:

    1. **Modality encoders.** :math:`\mathbf{x}_m(i) = \mathbf{W}_m
       \mathbf{f}_m(i) + \mathbf{b}_m \in \mathbb{R}^d` (one
       :class:`~torch.nn.Linear` per modality).
    2. **User profiles.** :math:`\mathbf{p}_m(u) = \sum_{i \in
       \mathcal{N}(u)} a_{ui} \mathbf{x}_m(i)` over the user's *training*
       items, :math:`a_{ui} = 1/|\mathcal{N}(u)|` (``profile_norm='mean'``)
       or :math:`1/\sqrt{|\mathcal{N}(u)||\mathcal{N}(i)|}` (``'sym'``)
       (:class:`~crane_pyg.nn.UserProfileAggregation`). Since
       :math:`\mathbf{W}_m` is linear,

       .. math::
           \mathbf{p}_m(u) = \mathbf{W}_m \bar{\mathbf{f}}_m(u) +
           s(u)\,\mathbf{b}_m, \qquad \bar{\mathbf{f}}_m(u) = \sum_i a_{ui}
           \mathbf{f}_m(i), \quad s(u) = \sum_i a_{ui},

       so with ``precompute_profiles=True`` the aggregation of the raw
       features :math:`\bar{\mathbf{f}}_m` is done once (``[U, d_m]``
       buffers) and a batch only projects the rows of its own users.
       Users without training items get :math:`\mathbf{p}_m(u) = \mathbf{0}`.
    3. **RCA.** One :class:`~crane_pyg.nn.RecursiveCrossModalAttention`
       (:math:`R` = ``num_recursions``), shared by users and items (one
       call on the stacked ``[N, M, d]`` batch), gives :math:`\mathbf{z}_u,
       \mathbf{z}_i \in \mathbb{R}^d`. ``use_rca=False`` is :math:`R=0`: the
       projected concatenation :math:`\mathbf{W}_Z[\mathbf{x}_1 \Vert \cdots
       \Vert \mathbf{x}_M] + \mathbf{b}_Z`. With ``semantic_gate=True`` the
       codes then gate the ID ("ego") embeddings, :math:`\mathbf{z}_v
       \leftarrow \mathbf{e}^{(0)}_v \odot \sigma(\mathbf{z}_v)`
       (:meth:`gate_codes`), and everything below uses the gated codes.
    4. **Dual graph.**

       * behavioural view: LightGCN over ID embeddings on the symmetrically
         normalised user-item graph, :math:`L_{ui}` layers, mean over layers
         0..L :math:`\to \mathbf{e}^{cf}_u, \mathbf{e}^{cf}_i`; optionally
         with FREEDOM's degree-sensitive edge dropout during training
         (``edge_dropout``, see
         :func:`~crane_pyg.models.base.degree_sensitive_edge_sample`);
         with ``id_item_graph=True`` the item view also gains the item ID
         embeddings smoothed over the item graph (FREEDOM's use of it),
         :math:`\mathbf{e}^{cf}_i \mathrel{+}= (\hat{\mathbf{S}}^{L_{ii}}
         \mathbf{E}^{(0)}_I)_i`, and with ``id_item_graph_users=True`` the
         users gain their items' share of it, :math:`\mathbf{e}^{cf}_u
         \mathrel{+}= (\hat{\mathbf{R}}\hat{\mathbf{S}}^{L_{ii}}
         \mathbf{E}^{(0)}_I)_u`;
       * semantic view: :math:`\mathbf{h}_i = (\hat{\mathbf{S}}^{L_{ii}}
         \mathbf{Z}_I)_i` over the item-item kNN graph :math:`\hat{\mathbf{S}}`
         (:class:`~crane_pyg.transforms.ItemKNNGraph` of the raw features),
         or :math:`\mathbf{h}_i = \mathbf{z}_i` with
         ``semantic_item_graph=False`` (the graph then serves the ID view
         only); users: :math:`\mathbf{h}_u = \mathbf{z}_u` (``user_semantic='profile'``),
         the mean of :math:`\mathbf{h}_i` over the user's training items
         (``'items'``), or the average of both (``'both'``);
       * enhanced item graph (``graph_rebuild_every`` :math:`= T > 0`): at the
         start of every epoch :math:`t > 0` with :math:`t \bmod T = 0` the kNN
         graph of :math:`\mathbf{Z}_I` (computed in eval mode, without
         gradient; :func:`~crane_pyg.transforms.knn_adjacency`, same ``k``)
         is mixed with the raw-feature graph,
         :math:`\hat{\mathbf{S}} \leftarrow \beta \hat{\mathbf{S}}_{raw} +
         (1 - \beta) \hat{\mathbf{S}}_{new}` (:math:`\beta` = ``rebuild_mix``).
         The graph lives in persistent buffers (``item_adj_index``,
         ``item_adj_weight``) whose size changes; ``load_state_dict`` accepts
         any size.
    5. **Fusion and score.** ``fusion='sum'``: :math:`\mathbf{e}_v =
       \mathbf{e}^{cf}_v + \mathbf{h}_v`; ``'concat'``: :math:`\mathbf{e}_v =
       [\mathbf{e}^{cf}_v \Vert \mathbf{h}_v]` (size :math:`2d`; the score is
       then :math:`\langle \mathbf{e}^{cf}_u, \mathbf{e}^{cf}_i \rangle +
       \langle \mathbf{h}_u, \mathbf{h}_i \rangle`). :math:`s(u, i) =
       \langle \mathbf{e}_u, \mathbf{e}_i \rangle`.
    6. **Loss.**

       .. math::
           \mathcal{L} = \mathrm{BPR}(u, i^+, i^-)
           + \lambda_{cl} \big[\mathrm{InfoNCE}(\mathbf{E}^{cf}_{\mathcal{U}_b},
             \mathbf{H}_{\mathcal{U}_b}) + \mathrm{InfoNCE}(
             \mathbf{E}^{cf}_{\mathcal{I}_b}, \mathbf{H}_{\mathcal{I}_b})\big]
           + \lambda_{reg} \mathcal{R}\big(\mathbf{E}^{(0)}_u,
             \mathbf{E}^{(0)}_{i^+}, \mathbf{E}^{(0)}_{i^-}\big)
           + \lambda_{v} \big[\mathrm{BPR}^{cf} + \mathrm{BPR}^{h}\big]

       with :math:`\mathcal{U}_b`, :math:`\mathcal{I}_b` the batch's unique
       users and unique positive items (at most ``cl_max_nodes`` of each,
       drawn uniformly in every step), :class:`~crane_pyg.nn.InfoNCE`
       (cosine, in-batch negatives, temperature :math:`\tau`, symmetric) and
       :math:`\mathbf{E}^{(0)}` the ID ("ego") embeddings (plus the user
       semantic ID embedding when ``use_profiles=False``) and :math:`\mathcal{R}`
       the L2 term of :class:`~crane_pyg.nn.EmbeddingL2` in the form
       ``reg_form``. :math:`\mathrm{BPR}^{cf}` and :math:`\mathrm{BPR}^{h}`
       (weight :math:`\lambda_v` = ``view_bpr``) are the BPR losses of the
       same triples scored by each view alone, :math:`\langle
       \mathbf{e}^{cf}_u, \mathbf{e}^{cf}_i \rangle` and :math:`\langle
       \mathbf{h}_u, \mathbf{h}_i \rangle`.

    **Cost.** A training step is linear in nodes and edges: :math:`O(L_{ui}
    E d + L_{ii} k I d + I \sum_m d_m d + R (I + U_b) M d^2 + C^2 d)`, with
    :math:`C = \min(B, \text{cl\_max\_nodes})` the InfoNCE set size, where
    :math:`U_b \le B` is the number of unique users of the batch: the user
    semantic view only enters the loss through the batch's users, so RCA runs
    on all items but only on those users (:meth:`embeddings` runs it on all
    :math:`U`). No :math:`N \times N` tensor is formed.

    Args:
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        edge_index (Tensor): ``[2, E]`` training interactions (row 0 users,
            row 1 items).
        features (Mapping[str, Tensor]): ``{modality: [I, d_m]}``, at least one.
        item_edge_index (Tensor, optional): ``[2, nnz]`` raw-feature item-item
            graph in the orientation of :class:`~crane_pyg.transforms.ItemKNNGraph`;
            built from :obj:`features` when omitted (and not needed when
            ``use_item_graph=False`` or ``num_ii_layers=0``).
        item_edge_weight (Tensor, optional): ``[nnz]`` its normalised weights.
        embedding_dim (int): :math:`d`. (default: ``64``)
        num_recursions (int): RCA recursions :math:`R`. (default: ``2``)
        rca_dropout (float): dropout inside RCA. (default: ``0.0``)
        profile_norm (str): ``'mean'`` or ``'sym'`` user-profile aggregation.
            (default: ``'mean'``)
        precompute_profiles (bool): aggregate the raw features of each user's
            items once (``[U, \sum_m d_m]`` extra memory) instead of aggregating
            the encoded features in every step (identical results).
            (default: :obj:`True`)
        num_ui_layers (int): :math:`L_{ui}`. (default: ``2``)
        edge_dropout (float): FREEDOM's degree-sensitive user-item edge dropout
            ratio during training (``0`` disables). (default: ``0.0``)
        num_ii_layers (int): :math:`L_{ii}`. (default: ``1``)
        knn_k (int): neighbours per item of the kNN graph. (default: ``10``)
        modality_weights (tuple of float, optional): fusion weights of the
            per-modality kNN graphs, in the order of ``data.modalities``;
            :obj:`None`: FREEDOM's image 0.1 / text 0.9 for exactly those two
            modalities, equal otherwise. (default: :obj:`None`)
        user_semantic (str): ``'profile'``, ``'items'`` or ``'both'`` (see 4.).
            (default: ``'both'``)
        id_item_graph (bool): also smooth the item ID embeddings over the
            item-item graph, FREEDOM's use of it: :math:`\mathbf{e}^{cf}_i
            \leftarrow \mathbf{e}^{cf}_i + (\hat{\mathbf{S}}^{L_{ii}}
            \mathbf{E}^{(0)}_I)_i`. Without the item graph (the ablation
            ``use_item_graph=False``, or ``num_ii_layers=0``) there is nothing
            to smooth over and it has no effect. On a 20 % user subsample of
            amazon-games it removes CRANE's early plateau: without it
            validation Recall@20 peaks after 5 epochs (0.103) and stalls, with
            it it keeps rising (0.119 after 29 epochs; three full runs had
            their best epochs at 90, 65 and 66); on TikTok a 40-epoch screen put it 0.0013
            below (validation Recall@20 0.0824 against 0.0837, both with
            ``lambda_cl=0``) (README "Results"). (default: :obj:`True`)
        semantic_item_graph (bool): smooth the semantic view over the item
            graph, :math:`\mathbf{h}_i = (\hat{\mathbf{S}}^{L_{ii}}
            \mathbf{Z}_I)_i`; :obj:`False` keeps the graph for the ID view
            only (``id_item_graph``, which it then needs) and gives
            :math:`\mathbf{h}_i = \mathbf{z}_i`: the kNN graph is built from
            the same features as the codes, so smoothing the codes over it
            averages content with similar content. (default: :obj:`True`)
        id_item_graph_users (bool): with ``id_item_graph``, users gain the
            smoothed item IDs of their training items too,
            :math:`\mathbf{e}^{cf}_u \leftarrow \mathbf{e}^{cf}_u +
            (\hat{\mathbf{R}}\hat{\mathbf{S}}^{L_{ii}}\mathbf{E}^{(0)}_I)_u`
            with :math:`\hat{\mathbf{R}} = \mathbf{D}_U^{-1/2}\mathbf{R}
            \mathbf{D}_I^{-1/2}` on the full training graph: the item-item
            graph reaches the user side of the dual graph, as in MGCN's
            modality views (whose lead on TikTok survives replacing their
            content by the ID embeddings; README "Results"). Full-batch and
            semantic-cache training only. (default: :obj:`False`)
        graph_rebuild_every (int): :math:`T`, epochs between rebuilds of the
            item graph from :math:`\mathbf{Z}_I` (``0``: never). (default: ``0``)
        rebuild_mix (float): :math:`\beta \in [0, 1]`, weight of the raw-feature
            graph in a rebuilt graph. (default: ``0.5``)
        fusion (str): ``'sum'`` or ``'concat'`` (see 5.). (default: ``'sum'``)
        lambda_cl (float): :math:`\lambda_{cl}` (``0`` disables the contrastive
            term). The InfoNCE term pulls the behavioural view of every node
            towards its semantic view; a large weight makes the ID embeddings
            copy the content and costs ranking quality wherever the
            interactions carry signal the content lacks (item popularity):
            with ``0.1`` the BPR loss stays far higher and validation recall
            drops on the synthetic data (validation recall@20 0.17 against
            0.24 with ``0``) and on TikTok; ``0.01`` keeps a mild alignment
            without that cost. (default: ``0.01``)
        cl_target (str): which view the contrastive term moves: ``'both'``
            pulls the two views towards each other; ``'semantic'`` stops its
            gradient into the behavioural view, so that the content view
            learns to predict the collaborative one (as a student its
            teacher) while the ID view is trained by the ranking loss alone.
            With ``'both'`` the ID view is tied to what the content can
            express. (default: ``'both'``)
        cl_pair (str): the two views the contrastive term ties together.
            ``'id_semantic'``: the behavioural view :math:`\mathbf{e}^{cf}`
            and the semantic view :math:`\mathbf{h}` (as in 6.).
            ``'ui_ii'``: the two graphs of the dual graph, both on the ID
            embeddings: the user-item (LightGCN) view against the item-item
            view :math:`\hat{\mathbf{S}}^{L_{ii}}\mathbf{E}^{(0)}_I` (items)
            and :math:`\hat{\mathbf{R}}\hat{\mathbf{S}}^{L_{ii}}
            \mathbf{E}^{(0)}_I` (users), the pair MGCN's InfoNCE ties once its
            modality views lose their content (README "Results"); needs
            ``id_item_graph_users=True``. Full-batch and semantic-cache
            training. (default: ``'id_semantic'``)
        cl_max_nodes (int, optional): at most this many of the batch's unique
            users, and as many of its unique positive items, enter each
            InfoNCE term, drawn uniformly without replacement in every step
            (from the global torch generator, so seeded runs repeat). InfoNCE
            costs :math:`O(n^2 d)` for :math:`n` nodes: with batch 2048 on
            TikTok the sets hold ~690 users and ~1,300 items and the two terms
            took 44 of the 149 ms of a training step on 2 CPU cores; 512
            nodes keep 511 in-batch negatives per node at about a quarter of
            that cost.
            :obj:`None`: every unique node. (default: ``512``)
        temperature (float): :math:`\tau` of InfoNCE. (default: ``0.2``)
        lambda_reg (float): :math:`\lambda_{reg}`. (default: ``1e-4``)
        view_bpr (float): :math:`\lambda_v`, weight of the per-view BPR
            terms: each view must also rank the triples on its own (the ID
            view as LightGCN would, the content encoders as a content-only
            model). Tried against CRANE's early plateau on amazon-games, it
            did not remove it (validation Recall@20 0.094 after 11 epochs
            against 0.103 after 5 without it; README "Results"), so it is
            off by default. ``0`` disables it. (default: ``0.0``)
        reg_form (str): ``'squared'`` (:math:`\frac{1}{2B}\sum_k \lVert
            \mathbf{E}_k \rVert^2`) or ``'mmrec'`` (:math:`\frac{1}{B}
            \sum_k \lVert \mathbf{E}_k \rVert`, MMRec's ``EmbLoss``), see
            :class:`~crane_pyg.nn.EmbeddingL2`. (default: ``'squared'``)
        content_reg (float): :math:`\lambda_{c}`, an L2 penalty
            :math:`\tfrac{\lambda_c}{2} \sum_W \lVert W \rVert_F^2` on the
            weight matrices of the modality encoders and of RCA, added to
            every step's loss (the ID L2 term only regularises the batch's
            embeddings; without this the content branch is free to memorise
            items). ``0`` disables it. (default: ``0.0``)
        semantic_scale (float, optional): when set, every row of the
            semantic view is L2-normalised and multiplied by this factor,
            :math:`\mathbf{h} \leftarrow s\,\mathbf{h}/\lVert\mathbf{h}\rVert`,
            before fusion and the contrastive term. Without it the content
            branch (unregularised linear encoders + RCA) grows to ~50x the
            norm of the ID view within two epochs and the fused score
            overfits the content (TikTok validation Recall@20 falls from
            0.039 after epoch 1 to 0.023 after epoch 5); with ``0.2`` it
            rises steadily (0.041 -> 0.059 over the same epochs).
            :obj:`None` keeps the raw view. (default: ``0.2``)
        learn_semantic_scale (bool): make the factor :math:`s` of
            ``semantic_scale`` a learned parameter (one for users, one for
            items, initialised at ``semantic_scale`` and kept positive as
            :math:`s = e^{\theta}`), so that training decides how much the
            content view weighs in the score instead of a fixed norm.
            Needs ``semantic_scale``. (default: :obj:`False`)
        semantic_gate (bool): the content codes *gate* the ID embeddings
            instead of standing for the nodes themselves (3. above):
            :math:`\mathbf{z}_v \leftarrow \mathbf{e}^{(0)}_v \odot
            \sigma(\mathbf{z}_v)` for items and users, before the item graph,
            the item mean and ``semantic_scale`` (MGCN's behaviour-guided
            purifier, applied to RCA's output). The semantic view then has a
            free vector per node, shaped by the content and by the item-graph
            neighbours, instead of being a function of the content alone.
            (default: :obj:`False`)
        use_rca (bool): ablation; :obj:`False` is RCA with :math:`R = 0`
            (concatenation + projection). (default: :obj:`True`)
        use_profiles (bool): ablation; :obj:`False` gives users a learned ID
            embedding :math:`\mathbf{z}_u` (not passed through RCA) instead of
            their profile, used wherever :math:`\mathbf{z}_u` is (``'profile'``
            and ``'both'``). (default: :obj:`True`)
        use_item_graph (bool): ablation; :obj:`False` gives
            :math:`\mathbf{h}_i = \mathbf{z}_i` (no item-item propagation, no
            kNN graph). (default: :obj:`True`)
        seed (int): seed of the per-epoch edge dropout (epoch :math:`t` uses
            ``seed + t``). (default: ``0``)
        backend (str): sparse backend of the propagation layers.
            (default: ``'auto'``)
    """

    #: state_dict format: 2 stores the (persistent, rebuilt) item graph
    #: source -> target; older checkpoints are converted when loaded
    _version = 2

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
        num_recursions: int = 2,
        rca_dropout: float = 0.0,
        profile_norm: Literal['mean', 'sym'] = 'mean',
        precompute_profiles: bool = True,
        num_ui_layers: int = 2,
        edge_dropout: float = 0.0,
        num_ii_layers: int = 1,
        knn_k: int = 10,
        modality_weights: Optional[Tuple[float, ...]] = None,
        user_semantic: Literal['profile', 'items', 'both'] = 'both',
        id_item_graph: bool = True,
        id_item_graph_users: bool = False,
        semantic_item_graph: bool = True,
        graph_rebuild_every: int = 0,
        rebuild_mix: float = 0.5,
        fusion: Literal['sum', 'concat'] = 'sum',
        lambda_cl: float = 0.01,
        cl_target: Literal['both', 'semantic'] = 'both',
        cl_pair: Literal['id_semantic', 'ui_ii'] = 'id_semantic',
        cl_max_nodes: Optional[int] = 512,
        temperature: float = 0.2,
        lambda_reg: float = 1e-4,
        view_bpr: float = 0.0,
        reg_form: Literal['squared', 'mmrec'] = 'squared',
        content_reg: float = 0.0,
        semantic_scale: Optional[float] = 0.2,
        learn_semantic_scale: bool = False,
        semantic_gate: bool = False,
        use_rca: bool = True,
        use_profiles: bool = True,
        use_item_graph: bool = True,
        seed: int = 0,
        backend: str = 'auto',
    ) -> None:
        super().__init__(num_users, num_items)
        name = type(self).__name__
        check_int(name, 'embedding_dim', embedding_dim, 1)
        check_int(name, 'num_recursions', num_recursions, 0)
        check_float(name, 'rca_dropout', rca_dropout, 0.0, 1.0, max_inclusive=False)
        check_choice(name, 'profile_norm', profile_norm, ('mean', 'sym'))
        check_int(name, 'num_ui_layers', num_ui_layers, 0)
        check_float(name, 'edge_dropout', edge_dropout, 0.0, 1.0, max_inclusive=False)
        check_int(name, 'num_ii_layers', num_ii_layers, 0)
        check_int(name, 'knn_k', knn_k, 1)
        check_choice(name, 'user_semantic', user_semantic, ('profile', 'items', 'both'))
        check_int(name, 'graph_rebuild_every', graph_rebuild_every, 0)
        check_float(name, 'rebuild_mix', rebuild_mix, 0.0, 1.0)
        check_choice(name, 'fusion', fusion, ('sum', 'concat'))
        check_float(name, 'lambda_cl', lambda_cl)
        check_choice(name, 'cl_target', cl_target, ('both', 'semantic'))
        check_choice(name, 'cl_pair', cl_pair, CL_PAIRS)
        if cl_max_nodes is not None:
            check_int(name, 'cl_max_nodes', cl_max_nodes, 2)
        check_float(name, 'temperature', temperature, 1e-12)
        check_float(name, 'lambda_reg', lambda_reg)
        check_choice(name, 'reg_form', reg_form, L2_FORMS)
        check_float(name, 'view_bpr', view_bpr)
        check_float(name, 'content_reg', content_reg)
        if semantic_scale is not None:
            check_float(name, 'semantic_scale', semantic_scale)
            if not semantic_scale > 0:
                raise ValueError(f'{name}: semantic_scale must be > 0 or None, '
                                 f'got {semantic_scale}')
        if learn_semantic_scale and semantic_scale is None:
            raise ValueError(f'{name}: learn_semantic_scale=True needs semantic_scale '
                             f'(its initial value), got None')
        check_int(name, 'seed', seed, 0)
        features = check_features(features, num_items, name)
        if not features:
            raise ValueError(f'{name} needs at least one item modality, but the '
                             f'dataset has none (data.modalities is empty: no '
                             f'<modality>_feat.npy file)')
        propagate_items = bool(use_item_graph) and num_ii_layers > 0
        if graph_rebuild_every > 0 and not propagate_items:
            raise ValueError(f"{name}: graph_rebuild_every={graph_rebuild_every} needs "
                             f"the item graph (use_item_graph=True, num_ii_layers > 0)")

        self.embedding_dim = embedding_dim
        self.num_recursions = num_recursions
        self.profile_norm = profile_norm
        self.precompute_profiles = bool(precompute_profiles)
        self.num_ui_layers = num_ui_layers
        self.edge_dropout = float(edge_dropout)
        self.num_ii_layers = num_ii_layers
        self.knn_k = knn_k
        self.user_semantic = user_semantic
        self.graph_rebuild_every = graph_rebuild_every
        self.id_item_graph = bool(id_item_graph) and propagate_items
        self.id_item_graph_users = bool(id_item_graph_users) and self.id_item_graph
        if propagate_items and not (semantic_item_graph or self.id_item_graph):
            raise ValueError(f"{name}: semantic_item_graph=False and id_item_graph=False "
                             f"leave the item graph unused; drop it with "
                             f"use_item_graph=False")
        #: whether the semantic view is smoothed over the item graph
        self.semantic_item_graph = bool(semantic_item_graph) and propagate_items
        self.rebuild_mix = float(rebuild_mix)
        self.fusion = fusion
        self.lambda_cl = float(lambda_cl)
        self.cl_target = cl_target
        self.cl_pair = cl_pair
        if cl_pair == 'ui_ii' and not self.id_item_graph_users:
            raise ValueError(f"{name}: cl_pair='ui_ii' needs the item-item view of the "
                             f"IDs on both sides (id_item_graph_users=True, with "
                             f"id_item_graph and the item graph)")
        self.cl_max_nodes = None if cl_max_nodes is None else int(cl_max_nodes)
        self.lambda_reg = float(lambda_reg)
        self.content_reg = float(content_reg)
        self.semantic_scale = None if semantic_scale is None else float(semantic_scale)
        self.learn_semantic_scale = bool(learn_semantic_scale)
        self.semantic_gate = bool(semantic_gate)
        self.view_bpr = float(view_bpr)
        self.use_rca = bool(use_rca)
        self.use_profiles = bool(use_profiles)
        self.use_item_graph = bool(use_item_graph)
        self.seed = seed
        self.modalities = list(features)
        self.num_modalities = len(features)
        #: whether the model has an item graph (for either view)
        self.propagate_items = propagate_items
        #: which parts the user semantic view has: the code z_u, the item mean
        self.needs_z_user = user_semantic in ('profile', 'both')
        self.needs_item_mean = user_semantic in ('items', 'both')

        # -- graphs ----------------------------------------------------------
        edge_index = self._check_edge_index(edge_index)
        self.register_buffer('edge_index', edge_index, persistent=False)
        self.register_buffer('train_edge_index', edge_index, persistent=False)
        self._pruned_epoch: Optional[int] = None
        if propagate_items:
            adj_index, adj_weight = item_adjacency(features, item_edge_index,
                                                   item_edge_weight, knn_k,
                                                   modality_weights, num_items, name)
            rebuild = graph_rebuild_every > 0
            # The current graph is training state only when it gets rebuilt.
            self.register_buffer('item_adj_index', adj_index, persistent=rebuild)
            self.register_buffer('item_adj_weight', adj_weight, persistent=rebuild)
            if rebuild:
                self.register_buffer('raw_item_adj_index', adj_index, persistent=False)
                self.register_buffer('raw_item_adj_weight', adj_weight, persistent=False)
            self.item_conv = ItemItemConv(cached=True, backend=backend)
        else:
            self.item_conv = None

        # -- content side ----------------------------------------------------
        self.feature_dims = [int(x.size(1)) for x in features.values()]
        for m, x in enumerate(features.values()):
            self.register_buffer(f'feature_{m}', x.float(), persistent=False)
        self.encoders = nn.ModuleList([nn.Linear(dim, embedding_dim)
                                       for dim in self.feature_dims])
        self.rca = RecursiveCrossModalAttention(
            self.num_modalities, embedding_dim,
            num_recursions=num_recursions if self.use_rca else 0, dropout=rca_dropout)
        self.profiles = (UserProfiles(list(features.values()), edge_index, num_users,
                                      profile_norm, self.precompute_profiles, backend)
                         if self.use_profiles and self.needs_z_user else None)
        self.user_semantic_embedding = (
            nn.Embedding(num_users, embedding_dim)
            if (not self.use_profiles and self.needs_z_user) else None)
        self.item_mean = (UserProfileAggregation('mean', cached=True, backend=backend)
                          if self.needs_item_mean else None)
        if self.item_mean is not None:  # items -> users, PyG's source-to-target order
            self.register_buffer('item_user_index', edge_index.flip(0), persistent=False)

        # -- behavioural side -----------------------------------------------
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        self.ui_encoder = LayerCombination(UserItemConv(cached=True, backend=backend),
                                           num_ui_layers)
        self.ui_train_encoder = (
            LayerCombination(UserItemConv(cached=True, backend=backend), num_ui_layers)
            if self.edge_dropout > 0 else None)

        # -- fusion ----------------------------------------------------------
        # logarithms of the learned semantic scales of users and items
        self.log_semantic_scale = (nn.Parameter(torch.empty(2))
                                   if self.learn_semantic_scale else None)

        self.bpr = BPRLoss()
        self.info_nce = InfoNCE(temperature=temperature)
        self.l2 = EmbeddingL2(reg_form)
        self.reset_parameters()
        self._prune(0)

    # ------------------------------------------------------------------
    @classmethod
    def _args_from_data(cls, data: HeteroData, options: Dict[str, Any]) -> Dict[str, Any]:
        args = super()._args_from_data(data, options)
        args['features'] = modality_features(data)
        if (args['features'] and options['use_item_graph']
                and options['num_ii_layers'] > 0):
            args['item_edge_index'], args['item_edge_weight'] = item_graph_from_data(
                data, options['knn_k'], options['modality_weights'])
        return args

    def reset_parameters(self) -> None:
        r"""Xavier-uniform ID embeddings, PyTorch's default initialisation of
        the encoders, RCA's own."""
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        if self.user_semantic_embedding is not None:
            nn.init.xavier_uniform_(self.user_semantic_embedding.weight)
        for encoder in self.encoders:
            encoder.reset_parameters()
        self.rca.reset_parameters()
        if self.log_semantic_scale is not None:
            nn.init.constant_(self.log_semantic_scale, math.log(self.semantic_scale))
        self.reset_cache()

    # ------------------------------------------------------------------
    # per-epoch hooks
    # ------------------------------------------------------------------
    def _prune(self, epoch: int) -> None:
        if self.ui_train_encoder is None:
            return
        keep = degree_sensitive_edge_sample(self.edge_index, self.num_users,
                                            self.num_items, self.edge_dropout,
                                            epoch_generator(self.seed, epoch))
        self.train_edge_index = self.edge_index[:, keep]
        self.ui_train_encoder.reset_parameters()  # drops the cached adjacency
        self._pruned_epoch = epoch

    def on_epoch_start(self, epoch: int) -> None:
        r"""Samples the epoch's pruned user-item graph (``edge_dropout > 0``)
        and rebuilds the item graph when ``epoch > 0`` is a multiple of
        ``graph_rebuild_every``."""
        epoch = int(epoch)
        if self.ui_train_encoder is not None and epoch != self._pruned_epoch:
            self._prune(epoch)
        T = self.graph_rebuild_every
        if T > 0 and epoch > 0 and epoch % T == 0:
            self.rebuild_item_graph()

    def compile_modules(self, **kwargs: Any) -> List[str]:
        r"""Compiles RCA (``self.rca``) in place with :func:`torch.compile`,
        with dynamic shapes by default (its number of rows changes with the
        batch's users), and returns ``['rca']`` (``[]`` when ``R = 0``).

        RCA's recursions are chains of small element-wise operations around
        its matrix products (the correlation, softmax and attention-weighted
        sum of :math:`M \times T` pairs per node, the activation and the
        residual), which eager mode runs as separate passes over memory; the
        compiler fuses them. On TikTok with 2 CPU threads this cut RCA's
        forward + backward from 55.0 to 33.9 ms per step, a whole CRANE step
        from 100.8 to 79.5 ms and an epoch from 3.24 to 2.48 s
        (``benchmarks/tiktok_epoch_time.py --breakdown``), at a one-off cost
        of seconds of compilation in the first steps (4 s with torch's cache
        warm, 23 s cold) and once more for the first evaluation, which runs
        without gradients. Needs a C++ compiler on CPU and Triton on CUDA."""
        if self.rca.num_recursions == 0:
            return []
        self.rca.compile(**{'dynamic': True, **kwargs})
        return ['rca']

    @torch.no_grad()
    def rebuild_item_graph(self) -> None:
        r"""Replaces the item graph by :math:`\beta \hat{\mathbf{S}}_{raw} +
        (1 - \beta) \mathrm{kNN}(\mathbf{Z}_I)` (see the class docstring)."""
        if not self.propagate_items:
            raise RuntimeError('CRANE.rebuild_item_graph: the model has no item graph')
        was_training = self.training
        self.eval()
        try:
            z_item = self.rca(self.encode_items())
        finally:
            self.train(was_training)
        new_index, new_weight = knn_adjacency([z_item], self.knn_k)
        raw_index = getattr(self, 'raw_item_adj_index', self.item_adj_index)
        raw_weight = getattr(self, 'raw_item_adj_weight', self.item_adj_weight)
        beta = self.rebuild_mix
        index = torch.cat([raw_index, new_index], dim=1)  # both source -> target
        weight = torch.cat([beta * raw_weight, (1.0 - beta) * new_weight.to(raw_weight)])
        index, weight = coalesce(index, weight, num_nodes=self.num_items, reduce='sum')
        keep = weight > 0
        self.item_adj_index = index[:, keep]
        self.item_adj_weight = weight[keep]
        self.item_conv.reset_cache()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # Format 1 (before issue 13) stored the item graph the other way round
        # (index[0] receiving); such checkpoints are turned source -> target.
        metadata = args[0] if args else kwargs.get('local_metadata', {})
        key = prefix + 'item_adj_index'
        if key in state_dict and (metadata or {}).get('version', 1) < 2:
            state_dict[key] = state_dict[key].flip(0)
        # A rebuilt item graph has a different number of entries: resize the
        # buffers to the incoming ones before the copy.
        for name in _GRAPH_BUFFERS:
            key = prefix + name
            current = self._buffers.get(name)
            if (key in state_dict and current is not None
                    and name not in self._non_persistent_buffers_set):
                incoming = state_dict[key]
                if isinstance(incoming, Tensor) and incoming.shape != current.shape:
                    self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype,
                                                      device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------
    # forward pieces
    # ------------------------------------------------------------------
    def _feature(self, m: int) -> Tensor:
        return getattr(self, f'feature_{m}')

    def encode_items(self, items: Optional[Tensor] = None) -> Tensor:
        r"""Item modality vectors :math:`\mathbf{x}_m(i)`: ``[I, M, d]``, or
        ``[len(items), M, d]`` for the item ids :obj:`items` only."""
        features = [self._feature(m) for m in range(self.num_modalities)]
        if items is not None:
            features = [x.index_select(0, items) for x in features]
        return torch.stack([enc(x) for x, enc in zip(features, self.encoders)], dim=1)

    def semantic(self, users: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        r"""The semantic view :math:`(\mathbf{H}_{users}, \mathbf{H}_I)`:
        ``[U_b, d]`` for :obj:`users` (all users when :obj:`None`) and
        ``[I, d]`` for all items."""
        z_item, z_user = self.semantic_codes(self.encode_items(), users)
        return self.semantic_from_codes(z_item, z_user, users)

    def semantic_from_codes(self, z_item: Tensor, z_user: Optional[Tensor],
                            users: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        r"""The semantic view from the RCA codes of *all* items, ``[I, d]``,
        and of :obj:`users` (:obj:`None` where the user view does not need
        them): the gate (``semantic_gate``), the item graph, the users' item
        mean and :meth:`semantic_output`. :meth:`semantic` computes the codes
        exactly; :class:`~crane_pyg.models.CachedSemanticCRANE` reads most of
        them from its cache."""
        z_item, z_user = self.gate_codes(z_item, None, z_user, users)
        h_item = self.smooth_items(z_item) if self.semantic_item_graph else z_item
        item_mean = None
        if self.needs_item_mean:
            item_mean = self.item_mean((h_item, None), self.item_user_index,
                                       size=(self.num_items, self.num_users))
            if users is not None:
                item_mean = item_mean.index_select(0, users)
        return self.semantic_output(z_user, item_mean, h_item)

    def semantic_codes(self, x_item: Tensor, users: Optional[Tensor],
                        profiles: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""RCA of the item rows :obj:`x_item` ``[N, M, d]`` and, where the user
        view needs it, :math:`\mathbf{z}_u` of :obj:`users` (all when
        :obj:`None`): ``(z_item, z_user or None)``. With profiles, users and
        items go through RCA in one call; :obj:`profiles` (``[U_b, M, d]``)
        is computed by :attr:`profiles` when not given."""
        if self.needs_z_user and self.use_profiles:
            if profiles is None:
                profiles = self.profiles(x_item, users, self.encoders)
            num_items = x_item.size(0)
            z = self.rca(torch.cat([x_item, profiles], dim=0))
            return z[:num_items], z[num_items:]
        z_item = self.rca(x_item)
        if not self.needs_z_user:
            return z_item, None
        return z_item, (self.user_semantic_embedding.weight if users is None
                        else self.user_semantic_embedding(users))

    def gate_codes(self, z_item: Tensor, items: Optional[Tensor],
                   z_user: Optional[Tensor], users: Optional[Tensor]
                   ) -> Tuple[Tensor, Optional[Tensor]]:
        r"""With ``semantic_gate=True``, :math:`\mathbf{e}^{(0)}_v \odot
        \sigma(\mathbf{z}_v)` for the item rows :obj:`items` and the user
        rows :obj:`users` of the codes (all rows when :obj:`None`); the codes
        unchanged otherwise."""
        if not self.semantic_gate:
            return z_item, z_user
        e_item = self.item_embedding.weight if items is None else self.item_embedding(items)
        z_item = e_item * torch.sigmoid(z_item)
        if z_user is not None:
            e_user = (self.user_embedding.weight if users is None
                      else self.user_embedding(users))
            z_user = e_user * torch.sigmoid(z_user)
        return z_item, z_user

    def smooth_items(self, h: Tensor) -> Tensor:
        r""":math:`\hat{\mathbf{S}}^{L_{ii}} \mathbf{h}` over the model's item graph."""
        for _ in range(self.num_ii_layers):
            h = self.item_conv(h, self.item_adj_index, self.item_adj_weight)
        return h

    def semantic_output(self, z_user: Optional[Tensor], item_mean: Optional[Tensor],
                         h_item: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The semantic view from its pieces: :math:`\mathbf{h}_u` from
        :math:`\mathbf{z}_u` and/or the item mean (``user_semantic``), then
        ``semantic_scale`` on both sides."""
        if item_mean is None:
            h_user = z_user
        else:
            h_user = item_mean if z_user is None else 0.5 * (z_user + item_mean)
        if self.semantic_scale is not None:
            scale_user, scale_item = self.semantic_scales()
            h_user = scale_user * F.normalize(h_user, dim=-1)
            h_item = scale_item * F.normalize(h_item, dim=-1)
        return h_user, h_item

    def semantic_scales(self) -> Tuple[Any, Any]:
        r"""The factors :math:`(s_{user}, s_{item})` of ``semantic_scale``:
        the fixed value twice, or the learned ones (scalar tensors) with
        ``learn_semantic_scale=True``; :obj:`None` twice without
        ``semantic_scale``."""
        if self.log_semantic_scale is not None:
            scale = self.log_semantic_scale.exp()
            return scale[0], scale[1]
        return self.semantic_scale, self.semantic_scale

    def ui_graph(self, train_graph: bool) -> Tuple[LayerCombination, Tensor]:
        r"""``(encoder, edge_index)`` of the behavioural view: the epoch's
        pruned graph when :obj:`train_graph` and ``edge_dropout > 0``, else
        the full training graph."""
        if train_graph and self.ui_train_encoder is not None:
            return self.ui_train_encoder, self.train_edge_index
        return self.ui_encoder, self.edge_index

    def behavioural_parts(self, train_graph: bool = False
                          ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        r"""The two graphs' parts of the behavioural view: the user-item
        (LightGCN) view of users and items, then the item-item view of the
        IDs, :math:`\hat{\mathbf{R}}\hat{\mathbf{S}}^{L_{ii}}
        \mathbf{E}^{(0)}_I` for users (:obj:`None` without
        ``id_item_graph_users``) and :math:`\hat{\mathbf{S}}^{L_{ii}}
        \mathbf{E}^{(0)}_I` for items (:obj:`None` without ``id_item_graph``)."""
        encoder, edge_index = self.ui_graph(train_graph)
        e_user, e_item = encoder((self.user_embedding.weight, self.item_embedding.weight),
                                 edge_index)
        g_user = g_item = None
        if self.id_item_graph:
            g_item = self.smooth_items(self.item_embedding.weight)
            if self.id_item_graph_users:
                g_user = self.users_from_items(g_item)
        return e_user, e_item, g_user, g_item

    def users_from_items(self, x_item: Tensor) -> Tensor:
        r""":math:`\hat{\mathbf{R}}\mathbf{x}` ``[U, F]`` of item rows
        :obj:`x_item` ``[I, F]``, :math:`\hat{\mathbf{R}} =
        \mathbf{D}_U^{-1/2}\mathbf{R}\mathbf{D}_I^{-1/2}` on the full
        training graph: the users' half of one LightGCN step, with the
        behavioural encoder's cached adjacency (its transpose)."""
        conv = self.ui_encoder.conv
        adj = conv.adjacency(self.edge_index, self.num_users, self.num_items)
        return conv((x_item, None), adj.t(), size=(self.num_items, self.num_users))

    def behavioural(self, train_graph: bool = False) -> Tuple[Tensor, Tensor]:
        r"""The behavioural view :math:`(\mathbf{E}^{cf}_U, \mathbf{E}^{cf}_I)`
        on the full graph, or on the epoch's pruned graph when
        :obj:`train_graph` and ``edge_dropout > 0``: the sums of
        :meth:`behavioural_parts`."""
        return self.sum_parts(self.behavioural_parts(train_graph))

    @staticmethod
    def sum_parts(parts: Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]
                  ) -> Tuple[Tensor, Tensor]:
        r"""The behavioural view ``(users, items)`` from the output of
        :meth:`behavioural_parts`."""
        e_user, e_item, g_user, g_item = parts
        return (e_user if g_user is None else e_user + g_user,
                e_item if g_item is None else e_item + g_item)

    def contrastive_views(self, parts: Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]],
                          batch_users: Tensor, batch_items: Tensor
                          ) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        r"""The ``cl_views`` argument of :meth:`objective`: with
        ``cl_pair='ui_ii'`` (and ``lambda_cl > 0``) the user-item and the
        item-item views of the IDs (the output of :meth:`behavioural_parts`)
        of the unique ``batch_users`` and of the contrastive items
        ``batch_items``; :obj:`None` otherwise (the objective ties the ID and
        content views)."""
        if not (self.lambda_cl > 0 and self.cl_pair == 'ui_ii'):
            return None
        ui_user, ui_item, g_user, g_item = parts
        return (ui_user.index_select(0, batch_users), g_user.index_select(0, batch_users),
                ui_item.index_select(0, batch_items), g_item.index_select(0, batch_items))

    def _fuse(self, cf: Tensor, sem: Tensor) -> Tensor:
        return cf + sem if self.fusion == 'sum' else torch.cat([cf, sem], dim=-1)

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        return self.view_embeddings('full')

    def view_embeddings(self, view: str = 'full') -> Tuple[Tensor, Tensor]:
        r"""``(user, item)`` representations of every node in one view, scored
        with the inner product like :meth:`embeddings`: ``'full'`` is the
        fused representation (:meth:`embeddings`), ``'behavioural'`` the ID
        view :math:`\mathbf{e}^{cf}` alone and ``'semantic'`` the content
        view :math:`\mathbf{h}` alone (scaled as for fusion). The full
        score is the sum of the two views' scores plus, with
        ``fusion='sum'``, the cross terms :math:`\langle \mathbf{e}^{cf}_u,
        \mathbf{h}_i \rangle + \langle \mathbf{h}_u, \mathbf{e}^{cf}_i
        \rangle`. Used to measure what the content view adds to a trained
        model (``benchmarks/content_diagnosis.py``)."""
        check_choice(type(self).__name__, 'view', view, VIEWS)
        if view == 'semantic':
            return self.semantic(None)
        e_user, e_item = self.behavioural(train_graph=False)
        if view == 'behavioural':
            return e_user, e_item
        h_user, h_item = self.semantic(None)
        return self._fuse(e_user, h_user), self._fuse(e_item, h_item)

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        batch_users, user_pos = torch.unique(users, return_inverse=True)
        parts = self.behavioural_parts(train_graph=self.training)
        e_user, e_item = self.sum_parts(parts)
        h_user, h_item = self.semantic(batch_users)  # h_user: [U_b, d]
        e_user = e_user.index_select(0, batch_users)
        # One gather per item tensor (each gather costs an [I, d] scatter in
        # the backward pass): rows of the positives, negatives and, for the
        # contrastive term, the unique positives. Gathers use index_select,
        # whose backward is deterministic on CPU (that of x[idx] is not when
        # several threads accumulate repeated indices).
        batch_items = pos_items[:0]
        if self.lambda_cl > 0:
            batch_items, = self.cl_subset(torch.unique(pos_items))
        rows = torch.cat([pos_items, neg_items, batch_items])
        e_rows, h_rows = e_item.index_select(0, rows), h_item.index_select(0, rows)
        return self.objective(users, pos_items, neg_items, user_pos, e_user, h_user,
                              e_rows, h_rows,
                              self.contrastive_views(parts, batch_users, batch_items))

    def objective(self, users: Tensor, pos_items: Tensor, neg_items: Tensor,
                  user_pos: Tensor, e_user: Tensor, h_user: Tensor, e_rows: Tensor,
                  h_rows: Tensor, cl_views: Optional[Tuple[Tensor, ...]] = None
                  ) -> Tuple[Tensor, Dict[str, float]]:
        r"""BPR + :math:`\lambda_{cl}` InfoNCE + :math:`\lambda_{reg}` L2 from
        the two views of the batch's nodes, however they were computed (on the
        full graph by :meth:`loss`, on a sampled subgraph by
        :class:`~crane_pyg.models.MiniBatchCRANE`).

        Args:
            users, pos_items, neg_items (Tensor): the batch, ``[B]`` each.
            user_pos (Tensor): ``[B]``, row of each user in the unique batch users.
            e_user, h_user (Tensor): ``[U_b, d]`` behavioural / semantic view
                of the unique batch users.
            e_rows, h_rows (Tensor): ``[2B + C, d]`` both views of the rows
                ``cat([pos_items, neg_items, cl_items])``, where ``cl_items``
                are the unique positives drawn for the contrastive term
                (:meth:`cl_subset`; empty when ``lambda_cl == 0``).
            cl_views (tuple of Tensor, optional): with ``cl_pair='ui_ii'``,
                the pair of views the contrastive term ties in place of
                :math:`(\mathbf{e}^{cf}, \mathbf{h})`: ``(user_a [U_b, d],
                user_b [U_b, d], item_a [C, d], item_b [C, d])``.
        """
        size = pos_items.numel()
        u = self._fuse(e_user, h_user).index_select(0, user_pos)
        item = self._fuse(e_rows[:2 * size], h_rows[:2 * size])
        pos, neg = item[:size], item[size:]
        bpr = self.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        total, parts = bpr, {'bpr': bpr.item()}

        if self.view_bpr > 0:
            view_bpr = 0.0
            for users_view, rows_view in ((e_user, e_rows), (h_user, h_rows)):
                u_view = users_view.index_select(0, user_pos)
                view_bpr = view_bpr + self.bpr((u_view * rows_view[:size]).sum(-1),
                                               (u_view * rows_view[size:2 * size]).sum(-1))
            view_bpr = self.view_bpr * view_bpr
            total = total + view_bpr
            parts['view_bpr'] = view_bpr.item()

        if self.lambda_cl > 0:
            if cl_views is None:
                e_cl, h_cl = self.cl_subset(e_user, h_user)
                e_cl_items, h_cl_items = e_rows[2 * size:], h_rows[2 * size:]
            else:
                e_cl, h_cl = self.cl_subset(cl_views[0], cl_views[1])
                e_cl_items, h_cl_items = cl_views[2], cl_views[3]
            if self.cl_target == 'semantic':  # the first view is the fixed target
                e_cl, e_cl_items = e_cl.detach(), e_cl_items.detach()
            cl = self.lambda_cl * (self.info_nce(e_cl, h_cl)
                                   + self.info_nce(e_cl_items, h_cl_items))
            total = total + cl
            parts['cl'] = cl.item()
        if self.lambda_reg > 0:
            ego = [self.user_embedding(users), self.item_embedding(pos_items),
                   self.item_embedding(neg_items)]
            if self.user_semantic_embedding is not None:
                ego.append(self.user_semantic_embedding(users))
            reg = self.lambda_reg * self.l2(*ego)
            total = total + reg
            parts['reg'] = reg.item()
        if self.content_reg > 0:
            weights = [p for module in (self.encoders, self.rca)
                       for name, p in module.named_parameters() if name.endswith('weight')]
            creg = 0.5 * self.content_reg * sum(w.pow(2).sum() for w in weights)
            total = total + creg
            parts['content_reg'] = creg.item()
        return total, parts

    def cl_subset(self, *rows: Tensor) -> Tuple[Tensor, ...]:
        r"""At most ``cl_max_nodes`` rows of the row-aligned tensors
        :obj:`rows`, the same rows of each, drawn uniformly (all of them,
        unchanged, when there are no more)."""
        limit, size = self.cl_max_nodes, rows[0].size(0)
        if limit is None or size <= limit:
            return rows
        pick = torch.randperm(size, device=rows[0].device)[:limit]
        return tuple(t.index_select(0, pick) for t in rows)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, modalities={self.modalities}, '
                f'embedding_dim={self.embedding_dim}, user_semantic={self.user_semantic!r}, '
                f'fusion={self.fusion!r}, lambda_cl={self.lambda_cl}, cl_target={self.cl_target!r}, '
                f'cl_pair={self.cl_pair!r}, '
                f'cl_max_nodes={self.cl_max_nodes}, '
                f'lambda_reg={self.lambda_reg}, view_bpr={self.view_bpr}, '
                f'reg_form={self.l2.form!r}, '
                f'content_reg={self.content_reg}, semantic_scale={self.semantic_scale}, '
                f'learn_semantic_scale={self.learn_semantic_scale}, '
                f'semantic_gate={self.semantic_gate}, '
                f'edge_dropout={self.edge_dropout}, id_item_graph={self.id_item_graph}, '
                f'id_item_graph_users={self.id_item_graph_users}, '
                f'semantic_item_graph={self.semantic_item_graph}, '
                f'graph_rebuild_every={self.graph_rebuild_every}')
