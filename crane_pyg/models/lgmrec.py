r"""LGMRec (Guo et al., AAAI 2024): local graph embeddings (collaborative and
modality-specific) and global hypergraph embeddings."""
from __future__ import annotations

from itertools import combinations
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crane_pyg.models.base import (
    ModalityGraphRecommender,
    check_float,
    check_int,
    interaction_matrix,
)
from crane_pyg.nn import BPRLoss, EmbeddingL2

__all__ = ['LGMRec', 'hyperedge_dependencies']


def hyperedge_dependencies(logits: Tensor, temperature: float, training: bool) -> Tensor:
    r"""Soft assignments of nodes to hyperedges, row-wise over the last
    dimension: the Gumbel-softmax :math:`\operatorname{softmax}((\boldsymbol
    {\Lambda} + \mathbf{G}) / \tau)`, :math:`G \sim \mathrm{Gumbel}(0, 1)`
    i.i.d. (from torch's global generator), when :obj:`training`, and its
    noise-free form :math:`\operatorname{softmax}(\boldsymbol{\Lambda} /
    \tau)` otherwise."""
    if training:
        return F.gumbel_softmax(logits, tau=temperature, hard=False, dim=-1)
    return torch.softmax(logits / temperature, dim=-1)


class LGMRec(ModalityGraphRecommender):
    r"""LGMRec from `"LGMRec: Local and Global Graph Learning for Multimodal
    Recommendation" <https://arxiv.org/abs/2312.16400>`_, our own code
    after the paper's description, the equations as MMRec's reference model
    (``src/models/lgmrec.py``) computes them, with the settings of MMRec's
    ``LGMRec.yaml``.

    Notation: ID embeddings :math:`\mathbf{E}_U, \mathbf{E}_I` (dimension
    :math:`d`), features :math:`\mathbf{X}_m \in \mathbb{R}^{I \times d_m}`
    of modality :math:`m \in \{1..M\}` (frozen), the binary interaction
    matrix :math:`\mathbf{R}`, :math:`\bar{\mathbf{R}} = \mathbf{D}_U^{-1}
    \mathbf{R}` (mean over a user's items) and LightGCN's normalised
    :math:`(U+I)`-node adjacency :math:`\hat{\mathbf{A}}`;
    :math:`\mathrm{nrm}(\cdot)` is the row-wise L2 normalisation.

    **Local graph embeddings.** Collaborative (LightGCN, mean over layers
    :math:`0..L_{ui}`) and modality-specific (the projected features of the
    items, their mean for a user, propagated :math:`L_{mm}` times, last
    layer only):

    .. math::
        \mathbf{E}^{c} = \tfrac{1}{L_{ui}+1}\textstyle\sum_{l=0}^{L_{ui}}
        \hat{\mathbf{A}}^{l}[\mathbf{E}_U; \mathbf{E}_I], \qquad
        \mathbf{E}^{m} = \hat{\mathbf{A}}^{L_{mm}}
        [\bar{\mathbf{R}}\mathbf{X}_m\mathbf{W}_m; \mathbf{X}_m\mathbf{W}_m],
        \qquad \mathbf{E}^{loc} = \mathbf{E}^{c} + \textstyle\sum_m
        \mathrm{nrm}(\mathbf{E}^{m}).

    **Global hypergraph embeddings.** :math:`K` learnable hyperedges per
    modality, :math:`\mathbf{V}_m \in \mathbb{R}^{d_m \times K}`; item and
    user dependencies on them, Gumbel-softmax relaxed (temperature
    :math:`\tau`) and dropped out with probability :math:`1 - \rho` during
    training (:func:`hyperedge_dependencies`):

    .. math::
        \mathbf{H}_{I,m} = \mathrm{drop}\big(\mathrm{GS}(\mathbf{X}_m
        \mathbf{V}_m)\big), \qquad \mathbf{H}_{U,m} =
        \mathrm{drop}\big(\mathrm{GS}(\mathbf{R}\mathbf{X}_m\mathbf{V}_m)\big).

    :math:`L_h` hypergraph layers pass the collaborative item embeddings
    through the hyperedges (:math:`\mathbf{G}^{(0)}_{I,m} =
    \mathbf{E}^{c}_I`):

    .. math::
        \mathbf{Z}_m = \mathbf{H}_{I,m}^\top \mathbf{G}^{(l)}_{I,m}, \qquad
        \mathbf{G}^{(l+1)}_{I,m} = \mathbf{H}_{I,m}\mathbf{Z}_m, \qquad
        \mathbf{G}^{(l+1)}_{U,m} = \mathbf{H}_{U,m}\mathbf{Z}_m,

    and :math:`\mathbf{E}^{glo} = \sum_m [\mathbf{G}_{U,m};
    \mathbf{G}_{I,m}]` (last layer). Final representations
    :math:`\mathbf{E} = \mathbf{E}^{loc} + \alpha\,
    \mathrm{nrm}(\mathbf{E}^{glo})`, scores :math:`\langle \mathbf{e}_u,
    \mathbf{e}_i \rangle`.

    **Loss.** BPR, the hypergraph contrastive term between modalities
    :math:`a < b` (positives: the same node in both views; negatives: every
    user, resp. item, of view :math:`b`; summed over the batch),

    .. math::
        \mathcal{L}_{hcl} = \sum_{a<b} \sum_{n \in \text{batch}} -\log
        \frac{\exp(\cos(\mathbf{g}^{a}_n, \mathbf{g}^{b}_n)/\tau)}
        {\sum_{n'} \exp(\cos(\mathbf{g}^{a}_n, \mathbf{g}^{b}_{n'})/\tau)}

    over the batch's users (against all users) and positive items (against
    all items), and MMRec's unsquared L2 of the batch's final
    representations:

    .. math::
        \mathcal{L} = \mathrm{BPR} + \lambda_{cl}\mathcal{L}_{hcl} +
        \frac{\lambda}{B}\big(\lVert\mathbf{E}_{u}\rVert_F +
        \lVert\mathbf{E}_{i^+}\rVert_F + \lVert\mathbf{E}_{i^-}\rVert_F\big).

    **Defaults and their sources.** MMRec's ``LGMRec.yaml`` (its Baby
    block; ``configs/dataset/sports.yaml`` and ``clothing.yaml`` carry its
    Sports and Clothing blocks): ``embedding_dim=64`` (= ``feat_embed_dim``),
    ``num_ui_layers=2``, ``num_mm_layers=2``, ``num_hyper_layers=1``,
    ``num_hyperedges=4``, ``keep_rate=0.5``, ``alpha=0.3``,
    ``cl_weight=1e-4``, ``reg_weight=1e-6``; ``temperature=0.2`` is the
    model file's fixed :math:`\tau` (Gumbel-softmax and contrastive term).
    Initialisation as MMRec: Xavier-uniform everywhere.

    **Deviations.** (1) At evaluation (:meth:`embeddings`, and :meth:`loss`
    in eval mode) the dependencies are the noise-free
    :math:`\operatorname{softmax}(\boldsymbol{\Lambda}/\tau)`, so rankings
    are deterministic; MMRec draws Gumbel noise at evaluation too. (2) Any
    :math:`M \geq 1` modalities: the contrastive term sums over the
    :math:`M(M-1)/2` pairs (the paper's single image-text pair for
    :math:`M = 2`) and is absent for :math:`M = 1`, where MMRec falls back to
    the collaborative embeddings alone. (3) The L2 term divides by the
    batch's size (MMRec too, here), and zero-degree nodes get a zero
    normalisation instead of MMRec's :math:`(d + 10^{-7})^{-1/2}` (same
    numbers: their rows are empty).

    Args:
        num_users (int), num_items (int): the numbers of users and items.
        edge_index (Tensor): ``[2, E]`` (user, item) training interactions.
        features (Mapping[str, Tensor]): ``{modality: Tensor[I, d_m]}``
            (frozen), not empty.
        embedding_dim (int): :math:`d` (ID and modality embeddings).
            (default: ``64``)
        num_ui_layers (int): :math:`L_{ui}`, LightGCN layers of the
            collaborative embeddings (``0``: matrix factorisation, MMRec's
            ``cf_model: mf``). (default: ``2``)
        num_mm_layers (int): :math:`L_{mm}`, propagation layers of the
            modality-specific embeddings. (default: ``2``)
        num_hyper_layers (int): :math:`L_h \geq 1`. (default: ``1``)
        num_hyperedges (int): :math:`K`, hyperedges per modality.
            (default: ``4``)
        keep_rate (float): :math:`\rho \in (0, 1]`, the fraction of
            dependencies kept by dropout in training. (default: ``0.5``)
        alpha (float): :math:`\alpha`, weight of the global embeddings.
            (default: ``0.3``)
        cl_weight (float): :math:`\lambda_{cl}`. (default: ``1e-4``)
        reg_weight (float): :math:`\lambda`. (default: ``1e-6``)
        temperature (float): :math:`\tau`. (default: ``0.2``)
    """

    def __init__(
        self, num_users: int, num_items: int, edge_index: Tensor,
        features: Mapping[str, Tensor], *,
        embedding_dim: int = 64, num_ui_layers: int = 2, num_mm_layers: int = 2,
        num_hyper_layers: int = 1, num_hyperedges: int = 4, keep_rate: float = 0.5,
        alpha: float = 0.3, cl_weight: float = 1e-4, reg_weight: float = 1e-6,
        temperature: float = 0.2,
    ) -> None:
        super().__init__(num_users, num_items)
        owner = type(self).__name__
        minimum = {'embedding_dim': 1, 'num_ui_layers': 0, 'num_mm_layers': 0,
                   'num_hyper_layers': 1, 'num_hyperedges': 1}
        given = dict(embedding_dim=embedding_dim, num_ui_layers=num_ui_layers,
                     num_mm_layers=num_mm_layers, num_hyper_layers=num_hyper_layers,
                     num_hyperedges=num_hyperedges)
        for option, value in given.items():
            check_int(owner, option, value, minimum[option])
        rates = dict(keep_rate=keep_rate, alpha=alpha, cl_weight=cl_weight,
                     reg_weight=reg_weight, temperature=temperature)
        for option, value in rates.items():
            check_float(owner, option, value, 1e-6 if option == 'temperature' else 0.0,
                        1.0 if option == 'keep_rate' else None)
        if keep_rate == 0:
            raise ValueError(f"{owner}: 'keep_rate' must be in (0, 1], got {keep_rate!r}")
        given.update((key, float(value)) for key, value in rates.items())
        edge_index, features = self._setup(edge_index, features, given)

        index, ones = interaction_matrix(edge_index, num_users, num_items, None)
        self.register_matrix('ui', index, ones, (num_users, num_items))
        _, mean = interaction_matrix(edge_index, num_users, num_items, 'row')
        self.register_matrix('ui_mean', index, mean, (num_users, num_items))
        dims = []
        for m, x in enumerate(features.values()):
            self.register_buffer(f'feature_{m}', x.detach().float(), persistent=False)
            dims.append(int(x.size(1)))
        self.feature_proj = nn.ModuleList(
            nn.Linear(dim, embedding_dim, bias=False) for dim in dims)
        self.hyperedges = nn.ModuleList(
            nn.Linear(dim, num_hyperedges, bias=False) for dim in dims)
        self.bpr = BPRLoss()
        self.l2 = EmbeddingL2('mmrec')
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Xavier-uniform ID embeddings, projections and hyperedges (as MMRec)."""
        for param in self.parameters():
            nn.init.xavier_uniform_(param)
        self.reset_cache()

    # ------------------------------------------------------------------
    def modality_specific(self, m: int) -> Tensor:
        r""":math:`\mathbf{E}^{m}`, ``[U + I, d]``."""
        items = self.feature_proj[m](getattr(self, f'feature_{m}'))
        x = torch.cat([self.propagate('ui_mean', items), items])
        for _ in range(self.num_mm_layers):
            x = self.propagate('adj', x)
        return x

    def dependencies(self, m: int) -> Tuple[Tensor, Tensor]:
        r"""``(H_U [U, K], H_I [I, K])`` of modality :obj:`m`."""
        item_logits = self.hyperedges[m](getattr(self, f'feature_{m}'))
        user_logits = self.propagate('ui', item_logits)
        p = 1.0 - self.keep_rate
        return tuple(F.dropout(hyperedge_dependencies(logits, self.temperature, self.training),
                               p, self.training)
                     for logits in (user_logits, item_logits))

    def hypergraph(self, m: int, items: Tensor) -> Tuple[Tensor, Tensor]:
        r"""``(G_U [U, d], G_I [I, d])`` of modality :obj:`m` from the
        collaborative item embeddings :obj:`items`."""
        h_user, h_item = self.dependencies(m)
        for _ in range(self.num_hyper_layers):
            latent = h_item.t() @ items
            items = h_item @ latent
        return h_user @ latent, items

    def _forward(self) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        collaborative = self.lightgcn(self.num_ui_layers)
        local = collaborative
        for m in range(len(self.modalities)):
            local = local + F.normalize(self.modality_specific(m), dim=-1)
        item_c = collaborative[self.num_users:]
        hyper = [self.hypergraph(m, item_c) for m in range(len(self.modalities))]
        global_ = torch.cat([sum(g[0] for g in hyper), sum(g[1] for g in hyper)])
        return local + self.alpha * F.normalize(global_, dim=-1), hyper

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        return self._forward()[0].split([self.num_users, self.num_items])

    def _contrast(self, anchor: Tensor, other: Tensor, index: Tensor) -> Tensor:
        r""":math:`\sum_n -\log` softmax of the cosine similarities of
        ``anchor[index]`` to every row of ``other`` at the rows ``index``."""
        logits = (F.normalize(anchor.index_select(0, index), dim=-1) / self.temperature
                  @ F.normalize(other, dim=-1).t())
        return F.cross_entropy(logits, index, reduction='sum')

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        final, hyper = self._forward()
        user_emb, item_emb = final.split([self.num_users, self.num_items])
        u = user_emb.index_select(0, users)
        pos, neg = item_emb.index_select(0, pos_items), item_emb.index_select(0, neg_items)
        bpr = self.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        reg = self.reg_weight * self.l2(u, pos, neg)
        parts = {'bpr': bpr.item(), 'reg': reg.item()}
        if len(hyper) < 2:  # one modality: no pair of hypergraph views
            return bpr + reg, parts
        hcl = sum(self._contrast(hyper[a][0], hyper[b][0], users)
                  + self._contrast(hyper[a][1], hyper[b][1], pos_items)
                  for a, b in combinations(range(len(hyper)), 2))
        hcl = self.cl_weight * hcl
        parts['hcl'] = hcl.item()
        return bpr + reg + hcl, parts
