r"""LightGCN (He et al., SIGIR 2020): the ID-only graph baseline."""
from __future__ import annotations

from typing import Dict, Literal, Tuple

from torch import Tensor, nn

from crane_pyg.models.base import Recommender, check_choice, check_float, check_int
from crane_pyg.nn import BPRLoss, EmbeddingL2, LayerCombination, UserItemConv
from crane_pyg.nn.loss import L2_FORMS

__all__ = ['LightGCN']


class LightGCN(Recommender):
    r"""LightGCN from `"LightGCN: Simplifying and Powering Graph Convolution
    Network for Recommendation" <https://arxiv.org/abs/2002.02126>`_:
    ID embeddings :math:`\mathbf{E}^{(0)} = [\mathbf{E}_U; \mathbf{E}_I]`
    propagated over the symmetrically normalised user-item graph and
    averaged over layers,

    .. math::
        \mathbf{E}^{(l+1)} = \mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}
        \mathbf{E}^{(l)}, \qquad
        \mathbf{E} = \frac{1}{L+1} \sum_{l=0}^{L} \mathbf{E}^{(l)},
        \qquad s(u, i) = \langle \mathbf{e}_u, \mathbf{e}_i \rangle,

    trained with

    .. math::
        \mathcal{L} = \mathrm{BPR}(u, i^+, i^-) + \lambda \frac{1}{B}
        \left( \lVert \mathbf{E}^{(0)}_{u} \rVert +
        \lVert \mathbf{E}^{(0)}_{i^+} \rVert +
        \lVert \mathbf{E}^{(0)}_{i^-} \rVert \right)

    (Frobenius norms of the batch's ego embeddings, batch size :math:`B`:
    MMRec's ``EmbLoss``; ``reg_form='squared'`` gives the squared form of
    LightGCN's reference code, see :class:`~crane_pyg.nn.EmbeddingL2`). Unlike :class:`torch_geometric.nn.models.LightGCN` it
    never builds the :math:`(U+I)`-node graph: it propagates with
    :class:`~crane_pyg.nn.UserItemConv` (normalised adjacency cached).

    Args:
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        edge_index (Tensor): ``[2, E]`` training interactions (row 0 users,
            row 1 items).
        embedding_dim (int): size :math:`d` of the ID embeddings and of the
            final representations. (default: ``64``)
        num_layers (int): propagation layers :math:`L` (``0`` gives matrix
            factorisation). (default: ``2``)
        reg_weight (float): :math:`\lambda`. (default: ``1e-4``)
        reg_form (str): ``'mmrec'`` (unsquared norms, MMRec's ``EmbLoss``) or
            ``'squared'`` (:math:`\frac{1}{2B}\sum\lVert\cdot\rVert^2`).
            (default: ``'mmrec'``)
        backend (str): sparse backend of the propagation (see
            :func:`crane_pyg.nn.backend.resolve_backend`). (default: ``'auto'``)
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        edge_index: Tensor,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        reg_weight: float = 1e-4,
        reg_form: Literal['mmrec', 'squared'] = 'mmrec',
        backend: str = 'auto',
    ) -> None:
        super().__init__(num_users, num_items)
        name = type(self).__name__
        check_int(name, 'embedding_dim', embedding_dim, 1)
        check_int(name, 'num_layers', num_layers, 0)
        check_float(name, 'reg_weight', reg_weight)
        check_choice(name, 'reg_form', reg_form, L2_FORMS)
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.reg_weight = float(reg_weight)

        self.register_buffer('edge_index', self._check_edge_index(edge_index),
                             persistent=False)
        self.user_embedding = nn.Embedding(num_users, embedding_dim)
        self.item_embedding = nn.Embedding(num_items, embedding_dim)
        self.encoder = LayerCombination(UserItemConv(cached=True, backend=backend),
                                        num_layers)
        self.bpr = BPRLoss()
        self.l2 = EmbeddingL2(reg_form)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Xavier-uniform ID embeddings (as PyG's and MMRec's LightGCN)."""
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        self.encoder.reset_parameters()

    def embeddings(self) -> Tuple[Tensor, Tensor]:
        return self.encoder((self.user_embedding.weight, self.item_embedding.weight),
                            self.edge_index)

    def loss(self, users: Tensor, pos_items: Tensor,
             neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        self.check_batch(users, pos_items, neg_items)
        user_emb, item_emb = self.embeddings()
        u = user_emb.index_select(0, users)
        pos, neg = item_emb.index_select(0, pos_items), item_emb.index_select(0, neg_items)
        return self.objective(users, pos_items, neg_items, u, pos, neg)

    def objective(self, users: Tensor, pos_items: Tensor, neg_items: Tensor, u: Tensor,
                  pos: Tensor, neg: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""BPR + :math:`\lambda` L2 from the final embeddings ``u``, ``pos``,
        ``neg`` (``[B, d]`` each) of the batch, however they were computed (on
        the full graph by :meth:`loss`, on a sampled subgraph by
        :class:`~crane_pyg.train.MiniBatchLightGCN`)."""
        bpr = self.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        reg = self.reg_weight * self.l2(self.user_embedding(users),
                                        self.item_embedding(pos_items),
                                        self.item_embedding(neg_items))
        return bpr + reg, {'bpr': bpr.item(), 'reg': reg.item()}

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, embedding_dim={self.embedding_dim}, '
                f'num_layers={self.num_layers}, reg_weight={self.reg_weight}, '
                f'reg_form={self.l2.form!r}')
