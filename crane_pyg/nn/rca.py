r"""Recursive Cross-Modal Attention (RCA), the fusion module of CRANE."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from torch_geometric.nn.resolver import activation_resolver

OUTPUTS = ('concat_proj', 'concat', 'mean')


def _resolve_activation(activation: Union[str, nn.Module, None]) -> nn.Module:
    if activation is None or activation in ('identity', 'linear', 'none'):
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return activation
    return activation_resolver(activation)


class CrossModalAttentionBlock(nn.Module):
    r"""One refinement step of :class:`RecursiveCrossModalAttention`, applied
    independently to every node (see there for the equations).

    Args:
        num_modalities (int): :math:`M`.
        dim (int): :math:`d`.
        num_joint_tokens (int): :math:`T`.
        dropout (float): dropout on the update. (default: 0.0)
        activation (str or torch.nn.Module or None): :math:`\sigma`.
            (default: 'gelu')
        layer_norm (bool): apply :class:`~torch.nn.LayerNorm` after the
            residual update. (default: False)
    """

    def __init__(self, num_modalities: int, dim: int, num_joint_tokens: int,
                 dropout: float = 0.0, activation: Union[str, nn.Module, None] = 'gelu',
                 layer_norm: bool = False) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.dim = dim
        self.num_joint_tokens = num_joint_tokens
        self.lin_j = nn.Linear(num_modalities * dim, num_joint_tokens * dim)  # W_J, b_J
        self.lin_q = nn.Linear(dim, dim, bias=False)  # W_Q
        self.lin_k = nn.Linear(dim, dim, bias=False)  # W_K
        self.lin_v = nn.Linear(dim, dim, bias=False)  # W_V
        self.lin_o = nn.Linear(dim, dim)  # W_O
        self.act = _resolve_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in (self.lin_j, self.lin_q, self.lin_k, self.lin_v, self.lin_o):
            module.reset_parameters()
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        r"""``x`` :math:`(N, M, d)` -> refined ``x`` :math:`(N, M, d)` and the
        attention weights :math:`(N, M, T)`.

        Computed in the associative form (same function, fewer node-wise
        products): :math:`(\mathbf{x}_m \mathbf{W}_Q^\top)(\mathbf{J}_t
        \mathbf{W}_K^\top)^\top = \mathbf{x}_m (\mathbf{W}_Q^\top
        \mathbf{W}_K) \mathbf{J}_t^\top` and :math:`\mathbf{W}_O \sum_t a_{m,t}
        \mathbf{W}_V \mathbf{J}_t = (\mathbf{W}_O \mathbf{W}_V) \sum_t
        a_{m,t} \mathbf{J}_t`, so a node costs :math:`(MT + 2M) d^2` instead
        of :math:`(MT + 2M + 2T) d^2` multiply-adds; the :math:`d \times d`
        weight products cost :math:`O(d^3)` once per call. The tiny
        :math:`M \times T` products are broadcast multiply-sums (a batched
        matrix product of :math:`N` :math:`2 \times 2` problems is far
        slower on CPU)."""
        num_nodes, dim = x.size(0), self.dim
        joint = self.lin_j(x.reshape(num_nodes, self.num_modalities * dim))
        joint = joint.view(num_nodes, 1, self.num_joint_tokens, dim)  # J: [N, 1, T, d]
        w_qk = self.lin_q.weight.t() @ self.lin_k.weight  # W_Q^T W_K: [d, d]
        w_ov = self.lin_o.weight @ self.lin_v.weight  # W_O W_V: [d, d]
        query = (x.reshape(-1, dim) @ w_qk).view(num_nodes, self.num_modalities, 1, dim)
        corr = torch.tanh((query * joint).sum(-1) * (1.0 / math.sqrt(dim)))  # [N, M, T]
        attn = torch.softmax(corr, dim=-1)
        mixed = (attn.unsqueeze(-1) * joint).sum(2)  # sum_t a_mt J_t: [N, M, d]
        update = torch.addmm(self.lin_o.bias, mixed.reshape(-1, dim), w_ov.t())
        x = x + self.dropout(self.act(update.view_as(x)))
        return self.norm(x), attn

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_modalities={self.num_modalities}, '
                f'dim={self.dim}, num_joint_tokens={self.num_joint_tokens})')


class RecursiveCrossModalAttention(nn.Module):
    r"""Recursive Cross-Modal Attention (RCA) from `"Cross-Modal Attention
    Network with Dual Graph Learning in Multimodal Recommendation"
    <https://arxiv.org/abs/2601.11151>`_ (CRANE), as reconstructed in
    crane_pyg (the paper gives the ideas, the algebra below is ours).

    Every node (user or item) carries :math:`M` modality vectors
    :math:`\mathbf{x}_1, \dots, \mathbf{x}_M \in \mathbb{R}^d`. Each of
    :math:`R` recursions refines them from their cross-correlation with a
    joint representation of all modalities:

    .. math::
        \mathbf{J} &= \mathbf{W}_J \left[\mathbf{x}_1 \,\Vert\, \cdots
            \,\Vert\, \mathbf{x}_M\right] + \mathbf{b}_J
            \in \mathbb{R}^{T \times d}
            \quad \text{(reshaped into } T \text{ joint tokens)}

        \mathbf{C}_m &= \tanh\!\left(\frac{(\mathbf{x}_m \mathbf{W}_Q)
            (\mathbf{J}\mathbf{W}_K)^\top}{\sqrt{d}}\right)
            \in [-1, 1]^{T}

        \mathbf{a}_m &= \mathrm{softmax}(\mathbf{C}_m)
            \quad \text{(over the } T \text{ joint tokens)}

        \mathbf{x}_m &\leftarrow \mathrm{LN}\!\left(\mathbf{x}_m +
            \mathrm{Dropout}\!\left(\sigma\!\left(\mathbf{W}_O
            \textstyle\sum_{t=1}^{T} a_{m,t}\, \mathbf{J}_t \mathbf{W}_V
            + \mathbf{b}_O\right)\right)\right)

    (:math:`\mathrm{LN}` is the identity unless ``layer_norm=True``.) The
    joint tokens are recomputed from the refined vectors in every recursion,
    and the weights are shared across recursions by default (hence
    "recursive"). The output fuses the refined modalities:

    .. math::
        \mathbf{z} = \mathbf{W}_Z \left[\mathbf{x}_1 \,\Vert\, \cdots
            \,\Vert\, \mathbf{x}_M\right] + \mathbf{b}_Z \in \mathbb{R}^{d}.

    With :math:`R = 0` the module is exactly the concatenation baseline
    :math:`\mathbf{z} = \mathbf{W}_Z [\mathbf{x}_1 \Vert \cdots \Vert
    \mathbf{x}_M] + \mathbf{b}_Z` (the ablation). Since :math:`\tanh`
    bounds the correlations, the softmax weights of one modality differ by
    at most a factor :math:`e^2` across tokens.

    **Cost.** All operations are per node (batched over :math:`N`), so time
    and memory are linear in :math:`N`; no :math:`N \times N` tensor exists.
    Per recursion: :math:`O(N M T d^2)` for :math:`\mathbf{W}_J` and
    :math:`O(N M d^2)` for the query and output maps (computed as the
    products :math:`\mathbf{W}_Q^\top \mathbf{W}_K` and
    :math:`\mathbf{W}_O \mathbf{W}_V`, see
    :meth:`CrossModalAttentionBlock.forward`) plus :math:`O(N M T d)` for the
    correlation and the attention-weighted sum;
    with :math:`T = M` (default) and small :math:`M` that is
    :math:`O(R N M d^2)` time and :math:`O(R N M d)` memory for autograd.

    Args:
        num_modalities (int): :math:`M \geq 1`.
        dim (int): :math:`d`, the size of every modality vector.
        num_recursions (int): :math:`R \geq 0`. (default: 2)
        num_joint_tokens (int, optional): :math:`T`. (default: :math:`M`)
        dropout (float): dropout probability on the update. (default: 0.0)
        activation (str or torch.nn.Module or None): :math:`\sigma`, any
            name known to :func:`torch_geometric.nn.resolver.activation_resolver`
            or ``'identity'``. (default: 'gelu')
        share_across_recursions (bool): one set of weights for all
            recursions; :obj:`False` gives every recursion its own.
            (default: True)
        output (str): ``'concat_proj'`` (:math:`\mathbf{z}` above, size
            ``out_dim``), ``'concat'`` (the :math:`M d` concatenation, no
            projection) or ``'mean'`` (mean over modalities, size :math:`d`).
            (default: 'concat_proj')
        layer_norm (bool): LayerNorm after each residual update.
            (default: False: the refined vectors stay in the scale of the
            input, so :math:`R = 0` and :math:`R > 0` are directly
            comparable)
        out_dim (int, optional): size of :math:`\mathbf{z}` for
            ``'concat_proj'``. (default: :math:`d`)

    Shapes:
        - **input:** ``x`` :math:`(N, M, d)`;
        - **output:** ``z`` :math:`(N, d_{out})`, or ``(z, x_refined)`` with
          ``x_refined`` :math:`(N, M, d)` when ``return_tokens=True``.

    Example:
        >>> rca = RecursiveCrossModalAttention(num_modalities=2, dim=64)
        >>> z_item = rca(torch.stack([x_image, x_text], dim=1))   # [I, 64]
        >>> z_user = rca(torch.stack([p_image, p_text], dim=1))   # shared weights
    """

    def __init__(self, num_modalities: int, dim: int, num_recursions: int = 2,
                 num_joint_tokens: Optional[int] = None, dropout: float = 0.0,
                 activation: Union[str, nn.Module, None] = 'gelu',
                 share_across_recursions: bool = True, output: str = 'concat_proj',
                 layer_norm: bool = False, out_dim: Optional[int] = None) -> None:
        super().__init__()
        if int(num_modalities) < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if int(num_recursions) < 0:
            raise ValueError(f"num_recursions must be >= 0, got {num_recursions}")
        if num_joint_tokens is not None and int(num_joint_tokens) < 1:
            raise ValueError(f"num_joint_tokens must be >= 1, got {num_joint_tokens}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        self.num_modalities = int(num_modalities)
        self.dim = int(dim)
        self.num_recursions = int(num_recursions)
        self.num_joint_tokens = int(num_joint_tokens or num_modalities)
        self.share_across_recursions = bool(share_across_recursions)
        self.output = output
        self.out_dim = {'concat_proj': int(out_dim or dim),
                        'concat': self.num_modalities * self.dim,
                        'mean': self.dim}[output]
        if out_dim is not None and output != 'concat_proj':
            raise ValueError("out_dim only applies to output='concat_proj'")

        num_blocks = 0 if self.num_recursions == 0 else (
            1 if self.share_across_recursions else self.num_recursions)
        self.blocks = nn.ModuleList([
            CrossModalAttentionBlock(self.num_modalities, self.dim, self.num_joint_tokens,
                                     dropout=dropout, activation=activation,
                                     layer_norm=layer_norm)
            for _ in range(num_blocks)
        ])
        self.lin_z = (nn.Linear(self.num_modalities * self.dim, self.out_dim)
                      if output == 'concat_proj' else None)  # W_Z, b_Z
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for block in self.blocks:
            block.reset_parameters()
        if self.lin_z is not None:
            self.lin_z.reset_parameters()

    def refine(self, x: Tensor) -> Tensor:
        r"""The :math:`R` refinement steps alone: :math:`(N, M, d) \to (N, M, d)`."""
        self._check_input(x)
        for r in range(self.num_recursions):
            block = self.blocks[0 if self.share_across_recursions else r]
            x, _ = block(x)
        return x

    def forward(self, x: Tensor, return_tokens: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        x = self.refine(x)
        num_nodes = x.size(0)
        if self.output == 'mean':
            z = x.mean(dim=1)
        else:
            z = x.reshape(num_nodes, self.num_modalities * self.dim)
            if self.lin_z is not None:
                z = self.lin_z(z)
        return (z, x) if return_tokens else z

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"RecursiveCrossModalAttention expects a tensor x of "
                            f"shape [N, M, d], got {type(x).__name__}")
        expected = (self.num_modalities, self.dim)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"RecursiveCrossModalAttention: x must have shape [N, "
                             f"{self.num_modalities}, {self.dim}] (nodes, modalities, "
                             f"dim), got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"RecursiveCrossModalAttention: x must be floating "
                             f"point, got {x.dtype}")

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_modalities={self.num_modalities}, '
                f'dim={self.dim}, num_recursions={self.num_recursions}, '
                f'num_joint_tokens={self.num_joint_tokens}, '
                f'share_across_recursions={self.share_across_recursions}, '
                f'output={self.output!r})')
