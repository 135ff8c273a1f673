r"""Mini-batch (sampled-subgraph) training for graphs whose full propagation
does not fit in memory.

Full-batch training propagates all :math:`U + I` embeddings over the whole
graph at every step (memory :math:`O((U + I) d L)` for the activations kept
for the backward pass). In mini-batch mode a step only computes the final
embeddings of the nodes of its BPR triples, on their :math:`L`-hop
neighbourhood sampled with PyG's
:class:`~torch_geometric.sampler.NeighborSampler` (the sampler behind
:class:`~torch_geometric.loader.NeighborLoader`):

1. the user-item graph is one homogeneous graph of :math:`U + I` nodes
   (item :math:`i` is node :math:`U + i`), both edge directions, each edge
   weighted with its **full-graph** symmetric normalisation
   :math:`\hat{w}_{ui} = 1 / \sqrt{d_u d_i}`;
2. the seeds are the batch's unique users, positive and negative items;
   ``num_neighbors[h]`` in-neighbours are sampled per node at hop :math:`h`
   (``-1``: all of them);
3. :math:`L` layers of :class:`~torch_geometric.nn.conv.LGConv`
   (``normalize=False``) run on the subgraph with the sampled edges'
   weights, rescaled by :math:`d_v / \tilde{d}_v` (full over sampled
   in-degree of the receiving node :math:`v`, the usual unbiased estimate
   of the neighbourhood sum), and the layer mean is read at the seeds.

With ``num_neighbors=[-1] * L`` the subgraph holds every in-edge of every
node within :math:`L - 1` hops of a seed, so a seed's layer-:math:`l`
embedding depends only on exact values and the result **equals** the
full-batch one (tested against :meth:`LightGCN.embeddings
<crane_pyg.models.LightGCN.embeddings>` and :meth:`LightGCN.loss`). With a
finite fan-out it is a stochastic estimate, and the cost of a step is
bounded by :math:`B \prod_h k_h` nodes instead of :math:`U + I`.

When to choose it: when a full-batch step runs out of device memory (large
:math:`U + I`, large :math:`d` or many layers) and data-parallel training
alone does not help (every DDP rank still holds the full propagation).
Otherwise full-batch is faster (one propagation serves the whole batch, no
sampling) and exact. Evaluation stays full-ranking on the full graph
(:meth:`embeddings` under :func:`torch.no_grad`, no activations kept), which
fits whenever the embedding tables do.

Scope: :class:`MiniBatchLightGCN` supports :class:`~crane_pyg.models.LightGCN`.
CRANE is not supported yet (its item-item kNN branch and user profiles need
the ``('item', 'similar', 'item')`` edges and the profile inputs in the
sampled subgraph).

Neighbour sampling needs ``pyg-lib`` or ``torch-sparse``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import LGConv

__all__ = ['UserItemSubgraphSampler', 'Subgraph', 'MiniBatchLightGCN']


@dataclass
class Subgraph:
    r"""A sampled neighbourhood in the homogeneous numbering (users
    :math:`0..U-1`, item :math:`i` is :math:`U + i`).

    Attributes:
        node (Tensor): ``[N]`` global ids of the subgraph's nodes; the first
            ``num_seeds`` are the seeds, in the order given.
        edge_index (Tensor): ``[2, E_s]`` local ids, messages flow from
            row 0 to row 1.
        edge_weight (Tensor): ``[E_s]`` normalised (and rescaled) weights.
        num_seeds (int): the number of seeds.
    """
    node: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    num_seeds: int


class UserItemSubgraphSampler:
    r"""Samples the :math:`L`-hop neighbourhood of users and items on the
    user-item graph (see :mod:`crane_pyg.train.minibatch`).

    Args:
        edge_index (Tensor): ``[2, E]`` training interactions (row 0 users,
            row 1 items).
        num_users (int): :math:`U`.
        num_items (int): :math:`I`.
        num_neighbors (sequence of int): fan-out per hop, ``-1`` for all
            neighbours; its length is the number of layers :math:`L`.
    """

    def __init__(self, edge_index: Tensor, num_users: int, num_items: int,
                 num_neighbors: Sequence[int]) -> None:
        from torch_geometric.sampler import NeighborSampler

        from crane_pyg.models.base import check_bipartite_edge_index
        from crane_pyg.nn import gcn_norm_bipartite

        self.num_neighbors = [int(k) for k in num_neighbors]
        if any(k == 0 or k < -1 for k in self.num_neighbors):
            raise ValueError(f"'num_neighbors' entries must be positive or -1 (all), "
                             f'got {list(num_neighbors)}')
        edge_index = check_bipartite_edge_index(edge_index, num_users, num_items,
                                                "UserItemSubgraphSampler: 'edge_index'")
        self.num_users, self.num_items = int(num_users), int(num_items)
        weight = gcn_norm_bipartite(edge_index, num_users, num_items)
        user, item = edge_index[0], edge_index[1] + num_users
        homo = torch.stack([torch.cat([user, item]), torch.cat([item, user])])
        self.edge_weight = torch.cat([weight, weight]).cpu()
        self.in_degree = torch.bincount(homo[1].cpu(), minlength=num_users + num_items)
        self.data = Data(edge_index=homo.cpu(), num_nodes=num_users + num_items)
        self._sampler = NeighborSampler(self.data, num_neighbors=self.num_neighbors) \
            if self.num_neighbors else None

    @property
    def num_layers(self) -> int:
        return len(self.num_neighbors)

    def sample(self, seeds: Tensor) -> Subgraph:
        r"""The sampled neighbourhood of the (homogeneous, unique) ``seeds``."""
        from torch_geometric.sampler import NodeSamplerInput

        seeds = seeds.detach().cpu().long()
        if self._sampler is None:  # L = 0: no propagation
            empty = torch.empty(2, 0, dtype=torch.long)
            return Subgraph(seeds, empty, self.edge_weight[:0], seeds.numel())
        out = self._sampler.sample_from_nodes(NodeSamplerInput(input_id=None, node=seeds))
        edge = out.edge
        perm = getattr(self._sampler, 'perm', None)
        if perm is not None:
            edge = perm[edge]  # the sampler's CSC order -> original edge ids
        edge_index = torch.stack([out.row, out.col])
        weight = self.edge_weight[edge]
        # rescale by full / sampled in-degree of the receiving node (1 with fan-out -1)
        sampled = torch.bincount(out.col, minlength=out.node.numel())
        scale = self.in_degree[out.node].to(weight.dtype) / sampled.clamp(min=1)
        return Subgraph(out.node, edge_index, weight * scale[out.col], seeds.numel())


class MiniBatchLightGCN(nn.Module):
    r"""Computes :class:`~crane_pyg.models.LightGCN`'s training loss on sampled
    subgraphs; calling it, ``module(users, pos_items, neg_items)``, returns
    ``(loss, parts)`` like :meth:`LightGCN.loss`, so the trainer (or DDP) can
    use it in place of the model. The parameters are the model's own.

    Args:
        model (LightGCN): the model (its ``num_layers`` must equal
            ``len(num_neighbors)``).
        num_neighbors (sequence of int, optional): fan-out per hop
            (default: all neighbours on every hop, exact).
    """

    def __init__(self, model: nn.Module, num_neighbors: Sequence[int] | None = None) -> None:
        super().__init__()
        from crane_pyg.models import LightGCN
        if not isinstance(model, LightGCN):
            raise TypeError(f'MiniBatchLightGCN supports LightGCN only, got '
                            f'{type(model).__name__} (CRANE mini-batch training is not '
                            f'implemented)')
        if num_neighbors is None:
            num_neighbors = [-1] * model.num_layers
        if len(num_neighbors) != model.num_layers:
            raise ValueError(f"'num_neighbors' has {len(num_neighbors)} hops but the model "
                             f'has num_layers={model.num_layers}')
        self.model = model
        self.sampler = UserItemSubgraphSampler(model.edge_index, model.num_users,
                                               model.num_items, num_neighbors)
        self.conv = LGConv(normalize=False)

    def subgraph_embeddings(self, seeds: Tensor) -> Tensor:
        r"""Final (layer-mean) embeddings ``[len(seeds), d]`` of the unique
        homogeneous node ids ``seeds``, computed on their sampled subgraph."""
        model = self.model
        sub = self.sampler.sample(seeds)
        device = model.user_embedding.weight.device
        node = sub.node.to(device)
        is_user = node < model.num_users
        x = torch.zeros(node.numel(), model.embedding_dim, device=device,
                        dtype=model.user_embedding.weight.dtype)
        x = x.index_put((is_user.nonzero().view(-1),), model.user_embedding(node[is_user]))
        x = x.index_put(((~is_user).nonzero().view(-1),),
                        model.item_embedding(node[~is_user] - model.num_users))
        edge_index = sub.edge_index.to(device)
        edge_weight = sub.edge_weight.to(device, x.dtype)
        out = x
        for _ in range(model.num_layers):
            x = self.conv(x, edge_index, edge_weight)
            out = out + x
        return out[:sub.num_seeds] / (model.num_layers + 1)

    def forward(self, users: Tensor, pos_items: Tensor,
                neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""LightGCN's BPR + L2 loss of the batch, embeddings from the sampled
        subgraph of the batch's users and items."""
        model = self.model
        model._check_batch(users, pos_items, neg_items)
        U = model.num_users
        seeds, inverse = torch.unique(torch.cat([users, pos_items + U, neg_items + U]),
                                      return_inverse=True)
        emb = self.subgraph_embeddings(seeds)
        B = users.numel()
        u, pos, neg = (emb.index_select(0, inverse[j * B:(j + 1) * B]) for j in range(3))
        bpr = model.bpr((u * pos).sum(-1), (u * neg).sum(-1))
        reg = model.reg_weight * model.l2(model.user_embedding(users),
                                          model.item_embedding(pos_items),
                                          model.item_embedding(neg_items))
        return bpr + reg, {'bpr': bpr.item(), 'reg': reg.item()}

    def extra_repr(self) -> str:
        return f'num_neighbors={self.sampler.num_neighbors}'
