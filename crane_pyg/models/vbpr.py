r"""VBPR (He & McAuley, AAAI 2016): matrix factorisation with a content term."""
from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from crane_pyg.models.base import (
    Recommender,
    check_choice,
    check_features,
    check_float,
    check_int,
        modality_features,
)
from crane_pyg.nn import BPRLoss, EmbeddingL2
from crane_pyg.nn.loss import L2_FORMS

__all__ = ['VBPR']


class VBPR(Recommender):
    r"""VBPR from `"VBPR: Visual Bayesian Personalized Ranking from Implicit
    Feedback" <https://arxiv.org/abs/1510.01784>`_, in the multimodal form of
    the MMRec toolbox: an item is its ID embedding concatenated with a linear
    projection of all its modality features,

    .. math::
        \mathbf{e}_i = \big[\, \mathbf{q}_i \,\big\Vert\, \mathbf{W}
        [\mathbf{f}_1(i) \Vert \cdots \Vert \mathbf{f}_M(i)] + \mathbf{b}
        \,\big] \in \mathbb{R}^{d}, \qquad
        \mathbf{e}_u \in \mathbb{R}^{d}, \qquad
        s(u, i) = \langle \mathbf{e}_u, \mathbf{e}_i \rangle,

    with :math:`\mathbf{q}_i \in \mathbb{R}^{d/2}`,
    :math:`\mathbf{W} \in \mathbb{R}^{(d/2) \times \sum_m d_m}`; the user
    embedding holds the latent and the "visual" preference halves. Loss:
    BPR plus :math:`\lambda \frac{1}{B}(\lVert \mathbf{E}_u \rVert +
    \lVert \mathbf{E}_{i^+} \rVert + \lVert \mathbf{E}_{i^-} \rVert)`
    over the batch (MMRec's ``EmbLoss``; ``reg_form='squared'``:
    :math:`\frac{1}{2B}\sum \lVert\cdot\rVert^2`). There is no graph propagation.

    :math:`\mathbf{W}[\mathbf{f}_1 \Vert \cdots \Vert \mathbf{f}_M]` is
    computed as :math:`\sum_m \mathbf{W}_{:, m} \mathbf{f}_m` with column
    blocks of one :class:`torch.nn.Linear`, so the concatenated feature
    matrix is never materialised.

    Args:
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        features (Mapping[str, Tensor]): ``{modality: [I, d_m]}``, at least one.
        embedding_dim (int): size :math:`d` of the *final* user and item
            representations (even): the item ID embedding and the content
            projection have :math:`d/2` each. (MMRec's ``embedding_size``
            is :math:`d/2`.) (default: ``64``)
        reg_weight (float): :math:`\lambda`. (default: ``1e-4``)
        reg_form (str): ``'mmrec'`` or ``'squared'`` (see
            :class:`~crane_pyg.nn.EmbeddingL2`). (default: ``'mmrec'``)
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        features: Mapping[str, Tensor],
        *,
        embedding_dim: int = 64,
        reg_weight: float = 1e-4,
        reg_form: Literal['mmrec', 'squared'] = 'mmrec',
    ) -> None:
        super().__init__(num_users, num_items)
        name = type(self).__name__
        check_int(name, 'embedding_dim', embedding_dim, 2)
        if embedding_dim % 2 != 0:
            raise ValueError(f"{name}: 'embedding_dim' must be even (half ID "
                             f"embedding, half content projection), got {embedding_dim}")
        check_float(name, 'reg_weight', reg_weight)
        check_choice(name, 'reg_form', reg_form, L2_FORMS)
        features = check_features(features, num_items, name)
        if not features:
            raise ValueError(f'{name} needs at least one item modality, but the '
                             f'dataset has none (data.modalities is empty: no '
                             f'<modality>_feat.npy file)')
        self.embedding_dim = embedding_dim
        self.reg_weight = float(reg_weight)
        self.modalities = list(features)
        self.feature_dims = [int(x.size(1)) for x in features.values()]
        for m, x in enumerate(features.values()):
            self.register_buffer(f'feature_{m}', x.float(), persistent=False)

        half = embedding_dim // 2
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, half)
        self.item_linear = nn.Linear(sum(self.feature_dims), half)
        self.bpr = BPRLoss()
        self.l2 = EmbeddingL2(reg_form)
        self.reset_parameters()

    @classmethod
    def _args_from_data(cls, data: HeteroData, options: Dict[str, Any]) -> Dict[str, Any]:
        args = super()._args_from_data(data, options)
        del args['edge_index']
        args['features'] = modality_features(data)
        return args

    def reset_parameters(self) -> None:
        r"""Xavier-normal embeddings and projection (as MMRec), zero bias."""
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)

    def _items(self, items: Optional[Tensor] = None) -> Tensor:
        r"""Item representations, of all items or of :obj:`items` only."""
        out = self.item_linear.bias
        start = 0
        for m, dim in enumerate(self.feature_dims):
            feature = getattr(self, f'feature_{m}')
            if items is not None:
                feature = feature.index_select(0, items)
            block = self.item_linear.weight[:, start:start + dim]
            out = out + feature @ block.t()
            start += dim
        ids = self.item_embedding.weight if items is None else self.item_embedding(items)
        return torch.cat([ids, out], dim=-1)

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        return self.user_embedding.weight, self._items()

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        u = self.user_embedding(users)
        p, n = self._items(pos_items), self._items(neg_items)
        bpr = self.bpr((u * p).sum(-1), (u * n).sum(-1))
        reg = self.reg_weight * self.l2(u, p, n)
        return bpr + reg, {'bpr': bpr.item(), 'reg': reg.item()}

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, modalities={self.modalities}, '
                f'embedding_dim={self.embedding_dim}, reg_weight={self.reg_weight}, '
                f'reg_form={self.l2.form!r}')
