r"""Training objectives: BPR, in-batch InfoNCE and the embedding L2 penalty."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ('mean', 'sum')


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


class BPRLoss(nn.Module):
    r"""Bayesian Personalised Ranking loss (Rendle et al., 2009):

    .. math::
        \mathcal{L}_{\mathrm{BPR}} = \frac{1}{B} \sum_{b=1}^{B}
            -\log \sigma\!\left(\hat{y}_{u_b i_b} - \hat{y}_{u_b j_b}\right)

    for :math:`B` triples (user, positive item, negative item); computed with
    :func:`torch.nn.functional.logsigmoid` (stable for large score gaps).

    Args:
        reduction (str): ``'mean'`` (above) or ``'sum'``. (default: 'mean')

    Shapes:
        - **input:** ``pos_scores`` :math:`(B)`, ``neg_scores`` :math:`(B)`
          (or any equal shapes);
        - **output:** scalar.
    """

    def __init__(self, reduction: str = 'mean') -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)

    def forward(self, pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
        if pos_scores.shape != neg_scores.shape:
            raise ValueError(f"BPRLoss: pos_scores {list(pos_scores.shape)} and "
                             f"neg_scores {list(neg_scores.shape)} must have the same shape")
        loss = -F.logsigmoid(pos_scores - neg_scores)
        return loss.mean() if self.reduction == 'mean' else loss.sum()

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(reduction={self.reduction!r})'


class InfoNCE(nn.Module):
    r"""InfoNCE contrastive loss with in-batch negatives (van den Oord et al.,
    2018; the SimCLR / SGL form) between two views :math:`\mathbf{A},
    \mathbf{B} \in \mathbb{R}^{B \times d}` whose row :math:`b` describes the
    same node:

    .. math::
        s_{bc} = \frac{\langle \mathbf{a}_b, \mathbf{b}_c \rangle}
            {\lVert \mathbf{a}_b \rVert \, \lVert \mathbf{b}_c \rVert \, \tau},
        \qquad
        \mathcal{L}_{A \to B} = -\frac{1}{B} \sum_{b=1}^{B}
            \log \frac{\exp(s_{bb})}{\sum_{c=1}^{B} \exp(s_{bc})}

    i.e. the cross-entropy of the cosine-similarity logits with the positive
    on the diagonal. With ``symmetric=True`` the loss is
    :math:`\tfrac{1}{2}(\mathcal{L}_{A \to B} + \mathcal{L}_{B \to A})`, where
    :math:`\mathcal{L}_{B \to A}` uses the transposed logits. Memory is
    :math:`O(B^2)` for a batch of :math:`B` rows (deduplicate node ids before
    calling: a node appearing twice would be its own negative).

    Args:
        temperature (float): :math:`\tau > 0`. (default: 0.2)
        symmetric (bool): average both directions. (default: True)
        eps (float): lower bound of the norms in the cosine normalisation.
            (default: 1e-12)

    Shapes:
        - **input:** ``a`` :math:`(B, d)`, ``b`` :math:`(B, d)`;
        - **output:** scalar.
    """

    def __init__(self, temperature: float = 0.2, symmetric: bool = True,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"InfoNCE: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.symmetric = bool(symmetric)
        self.eps = float(eps)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(f"InfoNCE: a and b must both have shape [B, d], got "
                             f"{list(a.shape)} and {list(b.shape)}")
        a = F.normalize(a, dim=-1, eps=self.eps)
        b = F.normalize(b, dim=-1, eps=self.eps)
        # Scale the [B, d] side, not the [B, B] logits, and take the column
        # softmax along dim 0 rather than of a transposed (copied) matrix.
        logits = ((a / self.temperature) @ b.t()).float()  # softmax in float32 under autocast
        loss = -torch.log_softmax(logits, dim=1).diagonal().mean()
        if self.symmetric:
            loss = 0.5 * (loss - torch.log_softmax(logits, dim=0).diagonal().mean())
        return loss

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(temperature={self.temperature}, '
                f'symmetric={self.symmetric})')


#: forms of :class:`EmbeddingL2`
L2_FORMS = ('squared', 'mmrec')


class EmbeddingL2(nn.Module):
    r"""L2 penalty on the (ego) embeddings used in a batch, in one of two
    forms. ``form='squared'`` is that of LightGCN's reference implementation,

    .. math::
        \mathcal{R}_{sq} = \frac{1}{2B} \sum_{k} \lVert \mathbf{E}_k \rVert_F^2,

    and ``form='mmrec'`` that of MMRec's ``EmbLoss`` (the *unsquared*
    Frobenius norms),

    .. math::
        \mathcal{R}_{mmrec} = \frac{1}{B} \sum_{k} \lVert \mathbf{E}_k \rVert_F,

    for embedding tensors :math:`\mathbf{E}_k` (e.g. the batch's users,
    positive and negative items, each :math:`B \times d`), where :math:`B` is
    the size of the first dimension of the *last* tensor (MMRec's choice; all
    tensors usually have the same). Multiply by :math:`\lambda_{reg}`
    outside. At the same :math:`\lambda_{reg}` the two differ in strength:
    the gradient of :math:`\mathcal{R}_{sq}` for one row is
    :math:`\mathbf{e}/B`, that of :math:`\mathcal{R}_{mmrec}` is
    :math:`\mathbf{e}/(B \lVert \mathbf{E}_k \rVert_F)`, i.e. the squared
    form shrinks :math:`\lVert \mathbf{E}_k \rVert_F` (about
    :math:`\sqrt{B}` times a row norm) times harder.

    Args:
        form (str): ``'squared'`` or ``'mmrec'``. (default: ``'squared'``)

    Shapes:
        - **input:** one or more tensors :math:`(B, *)`;
        - **output:** scalar.
    """

    def __init__(self, form: str = 'squared') -> None:
        super().__init__()
        if form not in L2_FORMS:
            raise ValueError(f"EmbeddingL2: form must be one of {list(L2_FORMS)}, got {form!r}")
        self.form = form

    def forward(self, *embeddings: Tensor) -> Tensor:
        if not embeddings:
            raise ValueError("EmbeddingL2 needs at least one embedding tensor")
        batch_size = embeddings[-1].size(0)
        if batch_size == 0:
            raise ValueError("EmbeddingL2: empty batch")
        if self.form == 'mmrec':
            return sum(torch.linalg.vector_norm(emb) for emb in embeddings) / batch_size
        total = sum(emb.pow(2).sum() for emb in embeddings)
        return 0.5 * total / batch_size

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(form={self.form!r})'
