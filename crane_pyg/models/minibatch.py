r"""Mini-batch (sampled-subgraph) training for graphs whose full propagation
does not fit in memory.

Full-batch training propagates all :math:`U + I` embeddings over the whole
graph at every step (memory :math:`O((U + I) d L)` for the activations kept
for the backward pass). In mini-batch mode a step only computes the final
embeddings of the nodes of its BPR triples, on their :math:`L`-hop
neighbourhood, sampled hop by hop as PyG's
:class:`~torch_geometric.sampler.NeighborSampler` (the sampler behind
:class:`~torch_geometric.loader.NeighborLoader`) samples, by
:class:`UserItemSubgraphSampler` (vectorised over each hop's nodes: without
``pyg-lib``, PyG's sampler falls back to ``torch-sparse``, which draws every
neighbour with its own call: 350 ms per batch against 126-207 ms here, at the
Electronics shape with fan-out 10, busy machine):

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

**CRANE** (:class:`MiniBatchCRANE`) adds the semantic view, computed on the
items a step needs only (notation of :class:`~crane_pyg.models.CRANE`):

* the behavioural view :math:`\mathbf{e}^{cf}` is the above on the graph the
  full model trains on (the epoch's pruned graph ``model.train_edge_index``
  when ``edge_dropout > 0``, re-read whenever it changes), combined over
  layers with the model's own weights :math:`\alpha_l`;
* the semantic seeds are :math:`S_0 = \mathcal{I}^+_b \cup \mathcal{I}^-_b`
  (the batch's positive and negative items), plus, when ``user_semantic``
  uses the item mean (``'items'``/``'both'``), the items
  :math:`\tilde{\mathcal{N}}(u)` of each batch user: all of
  :math:`\mathcal{N}(u)`, or a uniform sample without replacement of
  :math:`\min(|\mathcal{N}(u)|, k_{mean})` of them, :math:`k_{mean}` =
  ``item_mean_fanout`` (default: the first user-item fan-out
  ``num_neighbors[0]``). The mean over a uniform subset is an unbiased
  estimate of the mean over :math:`\mathcal{N}(u)`, so the sampled mean
  uses the weight :math:`1/|\tilde{\mathcal{N}}(u)|` (the full graph's
  :math:`1/|\mathcal{N}(u)|` rescaled by full over sampled degree, as
  above);
* :math:`S_0` is expanded by :math:`L_{ii}` hops of in-neighbours in the
  item-item graph :math:`\hat{\mathbf{S}}` (all of them: :math:`\le k` per
  modality, no sampling), :math:`S_{l+1} = S_l \cup \{j : \hat{S}_{ij} \neq
  0, i \in S_l\}`;
* only the rows of :math:`S_{L_{ii}}` are encoded (the feature buffers are
  indexed before the linear encoders) and go through RCA, together with the
  batch users' profiles :math:`\mathbf{p}_m(u)`;
* :math:`L_{ii}` item-item layers run on the edges of :math:`\hat{\mathbf{S}}`
  whose receiver lies in :math:`S_{L_{ii}-1}` (all its in-edges); after layer
  :math:`l` the rows of :math:`S_{L_{ii}-l}` are exact, so
  :math:`\mathbf{h}_{S_0} = (\hat{\mathbf{S}}^{L_{ii}} \mathbf{Z}_I)_{S_0}`
  exactly;
* :math:`\mathbf{h}_u` (profile, item mean, or their average),
  ``semantic_scale``, fusion, BPR, :math:`\lambda_{cl}` InfoNCE (batch unique
  users and unique positive items, at most ``cl_max_nodes`` of each, drawn
  with the same generator calls) and :math:`\lambda_{reg}` L2 are those of
  :meth:`CRANE.loss <crane_pyg.models.CRANE.loss>`.

With fan-out ``-1`` everywhere the loss and every parameter gradient equal
:meth:`CRANE.loss <crane_pyg.models.CRANE.loss>` on the same batch (tested
for every ``user_semantic``, with and without edge dropout, after an item
graph rebuild); with a finite fan-out it is a stochastic estimate (the
behavioural view and the item mean are unbiased before the non-linear
``semantic_scale`` normalisation and the loss).

**Cost per step** (:class:`MiniBatchCRANE`): encoders and RCA on
:math:`|S_{L_{ii}}| \le |S_0| (1 + \bar{k})^{L_{ii}}` items instead of all
:math:`I` (:math:`\bar{k}` the in-degree of the item graph, about :math:`k`
per modality), :math:`|S_0| \le 2B + U_b k_{mean}`;
:math:`O(|S_{L_{ii}}| (\sum_m d_m d + R M d^2) + U_b (\sum_m d_m d + R M
d^2))` for the content side and :math:`O(\lvert\mathcal{E}_{sub}\rvert d
L_{ui})` for the behavioural subgraph, against :math:`O(I \sum_m d_m d + R
(I + U_b) M d^2 + L_{ui} E d)` for :meth:`CRANE.loss`. With small batches or
a finite fan-out this touches a small fraction of the items; with a batch
of 2048 triples, fan-out ``-1`` and a dense graph :math:`S_{L_{ii}}` can be
all :math:`I` items and a step costs more than full-batch (the sampling
comes on top).

**With the semantic cache** (``semantic_cache=T``, ``train.semantic_cache``
together with ``train.num_neighbors``): only the batch's own positive and
negative items (and the contrastive items) go through the encoders and RCA;
the codes :math:`\mathbf{z}_j` of every other item of :math:`S_{L_{ii}}`
(the item-graph neighbours, the batch users' items of the item mean) are read
from a :class:`~crane_pyg.models.semantic_cache.SemanticCodeCache`
refreshed at each epoch start and every :math:`T` steps. The content side of
a step is then :math:`O(2B (\sum_m d_m d + R M d^2))` whatever the
catalogue, plus the refreshes (:math:`O(I (\sum_m d_m d + R M d^2))`
without gradient, :math:`\lceil \text{steps} / T \rceil` per epoch).
Right after a refresh, at fan-out ``-1``, the loss equals the exact one.

When to choose it: when a full-batch step runs out of device memory (large
:math:`U + I`, large :math:`d` or many layers, high-dimensional features
times many items) and data-parallel training alone does not help (every
DDP rank still holds the full propagation).
Otherwise full-batch is faster (one propagation serves the whole batch, no
sampling) and exact. Evaluation stays full-ranking on the full graph
(:meth:`embeddings` under :func:`torch.no_grad`, no activations kept), which
fits whenever the embedding tables do.

Scope: :class:`MiniBatchLightGCN` supports :class:`~crane_pyg.models.LightGCN`
and :class:`MiniBatchCRANE` supports :class:`~crane_pyg.models.CRANE` (every
option; with ``rca_dropout > 0`` the dropout masks differ from a full-batch
step's, as between any two steps). :func:`minibatch_loss_module` picks the
one for a model (what ``train.num_neighbors`` does) and raises
:class:`TypeError` for the other models (VBPR, FREEDOM).

Layer :math:`l` of the propagation only updates the nodes within :math:`L - l`
hops of the seeds (:meth:`Subgraph.receiver_hop`): the last layer runs on the
edges into the seeds only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.nn import LGConv

from crane_pyg.models.base import check_bipartite_edge_index
from crane_pyg.models.crane import CRANE
from crane_pyg.models.lightgcn import LightGCN
from crane_pyg.models.semantic_cache import SemanticCodeCache
from crane_pyg.nn import ItemItemConv, gcn_norm_bipartite

__all__ = ['UserItemSubgraphSampler', 'Subgraph', 'MiniBatchLightGCN', 'MiniBatchCRANE',
           'minibatch_loss_module']


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

    def receiver_hop(self, num_layers: int) -> Tensor:
        r"""``[E_s]`` the hop of each edge's receiving node: its distance from
        the seeds along the sampled edges (seeds 0; ``num_layers`` for nodes
        farther than ``num_layers - 1`` hops, which receive no edge). Layer
        :math:`l` of an :math:`L`-layer propagation only has to update the
        nodes within :math:`L - l` hops, i.e. the edges whose receiver hop is
        at most :math:`L - l` (:func:`_subgraph_layers`)."""
        num_nodes = self.node.numel()
        hop = torch.full((num_nodes,), num_layers, dtype=torch.long)
        hop[:self.num_seeds] = 0
        src, dst = self.edge_index[0], self.edge_index[1]
        for h in range(1, num_layers):
            reached = src[hop[dst] == h - 1]
            reached = reached[hop[reached] > h]
            hop[reached] = h
        return hop[dst]


class UserItemSubgraphSampler:
    r"""Samples the :math:`L`-hop neighbourhood of users and items on the
    user-item graph (see :mod:`crane_pyg.models.minibatch`).

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
        self.num_neighbors = [int(k) for k in num_neighbors]
        if any(k == 0 or k < -1 for k in self.num_neighbors):
            raise ValueError(f"'num_neighbors' entries must be positive or -1 (all), "
                             f'got {list(num_neighbors)}')
        edge_index = check_bipartite_edge_index(edge_index, num_users, num_items,
                                                "UserItemSubgraphSampler: 'edge_index'")
        self.num_users, self.num_items = int(num_users), int(num_items)
        num_nodes = num_users + num_items
        weight = gcn_norm_bipartite(edge_index, num_users, num_items)
        user, item = edge_index[0].cpu(), edge_index[1].cpu() + num_users
        source, target = torch.cat([user, item]), torch.cat([item, user])
        #: the ``2E`` directed edges (both directions), sorted by receiving node
        self.rowptr, perm = _csr(target, num_nodes)
        self.source = source.index_select(0, perm)
        self.edge_weight = torch.cat([weight, weight]).cpu().index_select(0, perm)
        self.in_degree = self.rowptr.diff()

    @property
    def num_layers(self) -> int:
        return len(self.num_neighbors)

    @property
    def num_edges(self) -> int:
        r"""Directed edges of the sampled graph (twice the interactions)."""
        return int(self.source.numel())

    def sample(self, seeds: Tensor) -> Subgraph:
        r"""The sampled neighbourhood of the (homogeneous, unique) ``seeds``:
        hop by hop, every node reached for the first time in the previous hop
        (the seeds at hop 1) receives ``num_neighbors[h]`` of its in-edges,
        drawn uniformly without replacement (all of them for ``-1`` or a
        smaller in-degree), as PyG's
        :class:`~torch_geometric.sampler.NeighborSampler` samples; the draws
        are vectorised over the hop's nodes (:func:`_sample_per_row`) and use
        torch's global generator."""
        seeds = seeds.detach().cpu().long()
        nodes, frontier = seeds, seeds
        sources, targets, positions = [], [], []
        seen = torch.zeros(self.num_users + self.num_items, dtype=torch.bool)
        seen[seeds] = True
        for k in self.num_neighbors:
            row, pos = _sample_per_row(self.rowptr, frontier, k)
            src = self.source.index_select(0, pos)
            sources.append(src)
            targets.append(frontier.index_select(0, row))
            positions.append(pos)
            new = torch.unique(src)
            new = new[~seen[new]]
            seen[new] = True
            nodes, frontier = torch.cat([nodes, new]), new
        if not positions:  # L = 0: no propagation
            empty = torch.empty(2, 0, dtype=torch.long)
            return Subgraph(seeds, empty, self.edge_weight[:0], seeds.numel())
        pos = torch.cat(positions)
        edge_index = torch.stack([_local_ids(nodes, torch.cat(sources)),
                                  _local_ids(nodes, torch.cat(targets))])
        weight = self.edge_weight.index_select(0, pos)
        # rescale by full / sampled in-degree of the receiving node (1 with fan-out -1)
        sampled = torch.bincount(edge_index[1], minlength=nodes.numel())
        scale = self.in_degree.index_select(0, nodes).to(weight.dtype) / sampled.clamp(min=1)
        return Subgraph(nodes, edge_index, weight * scale.index_select(0, edge_index[1]),
                        seeds.numel())


def _subgraph_layers(sub: 'Subgraph', conv: nn.Module, num_layers: int,
                     model: nn.Module) -> List[Tensor]:
    r"""The layer outputs :math:`\mathbf{X}^{(0)}, \dots, \mathbf{X}^{(L)}`
    ``[len(sub.node), d]`` of LightGCN propagation (``conv``, :math:`L` =
    :obj:`num_layers`) of :obj:`model`'s ID embeddings over the sampled
    subgraph :obj:`sub`."""
    x = _ego_features(sub.node, model.num_users, model.user_embedding,
                      model.item_embedding)
    edge_index = sub.edge_index.to(x.device)
    edge_weight = sub.edge_weight.to(x.device, x.dtype)
    hop = sub.receiver_hop(num_layers).to(x.device)
    layers = [x]
    for layer in range(1, num_layers + 1):
        # only the nodes within L - l hops are read later (the last layer: the
        # seeds); the other rows of this layer stay zero
        keep = hop <= num_layers - layer
        if bool(keep.all()):
            layers.append(conv(layers[-1], edge_index, edge_weight))
        else:
            layers.append(conv(layers[-1], edge_index[:, keep], edge_weight[keep]))
    return layers


def _ego_features(node: Tensor, num_users: int, user_embedding: nn.Embedding,
                  item_embedding: nn.Embedding) -> Tensor:
    r"""Layer-0 features ``[N, d]`` of homogeneous node ids ``node`` (users
    :math:`u`, items :math:`U + i`), on the embeddings' device."""
    weight = user_embedding.weight
    node = node.to(weight.device)
    is_user = node < num_users
    x = torch.zeros(node.numel(), weight.size(1), device=weight.device, dtype=weight.dtype)
    x = x.index_put((is_user.nonzero().view(-1),), user_embedding(node[is_user]))
    return x.index_put(((~is_user).nonzero().view(-1),),
                       item_embedding(node[~is_user] - num_users))


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
        num_neighbors = _fanouts(self, model, LightGCN, 'num_layers', num_neighbors)
        self.model = model
        self.sampler = UserItemSubgraphSampler(model.edge_index, model.num_users,
                                               model.num_items, num_neighbors)
        self.conv = LGConv(normalize=False)

    def subgraph_embeddings(self, seeds: Tensor) -> Tensor:
        r"""Final (layer-mean) embeddings ``[len(seeds), d]`` of the unique
        homogeneous node ids ``seeds``, computed on their sampled subgraph."""
        model = self.model
        sub = self.sampler.sample(seeds)
        layers = _subgraph_layers(sub, self.conv, model.num_layers, model)
        out = layers[0]
        for x in layers[1:]:
            out = out + x
        return out[:sub.num_seeds] / (model.num_layers + 1)

    def forward(self, users: Tensor, pos_items: Tensor,
                neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""LightGCN's BPR + L2 loss of the batch, embeddings from the sampled
        subgraph of the batch's users and items."""
        model = self.model
        model.check_batch(users, pos_items, neg_items)
        U = model.num_users
        seeds, inverse = torch.unique(torch.cat([users, pos_items + U, neg_items + U]),
                                      return_inverse=True)
        emb = self.subgraph_embeddings(seeds)
        B = users.numel()
        u, pos, neg = (emb.index_select(0, inverse[j * B:(j + 1) * B]) for j in range(3))
        return model.objective(users, pos_items, neg_items, u, pos, neg)

    def extra_repr(self) -> str:
        return f'num_neighbors={self.sampler.num_neighbors}'


def _fanouts(module: nn.Module, model: nn.Module, model_cls: type, layers: str,
             num_neighbors: Sequence[int] | None) -> List[int]:
    r"""Checks that :obj:`model` is a :obj:`model_cls` and returns the fan-out per
    hop, one per layer (the model's attribute :obj:`layers`), all by default."""
    if not isinstance(model, model_cls):
        other = 'MiniBatchCRANE for CRANE' if model_cls is LightGCN else \
            'MiniBatchLightGCN for LightGCN'
        raise TypeError(f'{type(module).__name__} supports {model_cls.__name__} only, got '
                        f'{type(model).__name__} (use {other}, or minibatch_loss_module '
                        f'to pick)')
    num_layers = getattr(model, layers)
    if num_neighbors is None:
        return [-1] * num_layers
    num_neighbors = [_check_fanout(k, 'num_neighbors') for k in num_neighbors]
    if len(num_neighbors) != num_layers:
        raise ValueError(f"'num_neighbors' has {len(num_neighbors)} hops but the model "
                         f'has {layers}={num_layers}')
    return num_neighbors


def _check_fanout(value: int, name: str) -> int:
    value = int(value)
    if value == 0 or value < -1:
        raise ValueError(f"'{name}' must be positive or -1 (all), got {value}")
    return value


def _csr(row: Tensor, num_rows: int) -> Tuple[Tensor, Tensor]:
    r"""``(rowptr [num_rows + 1], perm)``: ``perm`` sorts the entries by
    ``row`` (stable), ``rowptr`` delimits each row's entries in that order."""
    perm = torch.argsort(row, stable=True)
    count = torch.bincount(row, minlength=num_rows)
    rowptr = torch.zeros(num_rows + 1, dtype=torch.long, device=row.device)
    rowptr[1:] = torch.cumsum(count, 0)
    return rowptr, perm


def _csr_gather(rowptr: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
    r"""The entries of ``rows`` in a CSR matrix: ``(segment, position)``,
    ``segment[e]`` the index in ``rows`` of entry ``e``, ``position[e]`` its
    position in the CSR order."""
    start = rowptr.index_select(0, rows)
    count = rowptr.index_select(0, rows + 1) - start
    seg = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    offset = torch.arange(seg.numel(), device=rows.device) - first
    return seg, start.index_select(0, seg) + offset


def _sample_per_segment(seg: Tensor, num_segments: int, k: int) -> Tensor:
    r"""Positions (into ``seg``) of at most ``k`` entries per segment, drawn
    uniformly without replacement (all entries when ``k == -1``); ``seg``
    must be sorted."""
    if k < 0:
        return torch.arange(seg.numel(), device=seg.device)
    perm = torch.argsort(torch.rand(seg.numel(), device=seg.device))
    perm = perm[torch.argsort(seg.index_select(0, perm), stable=True)]  # by segment, random within
    count = torch.bincount(seg, minlength=num_segments)
    first = torch.cumsum(count, 0) - count
    rank = torch.arange(seg.numel(), device=seg.device) - first.index_select(0, seg)
    return torch.sort(perm[rank < k]).values


def _sample_per_row(rowptr: Tensor, rows: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    r"""``(row, position)`` of at most :obj:`k` entries per row :obj:`rows` of
    a CSR matrix (``row[e]`` the index in :obj:`rows`), drawn uniformly
    without replacement; every entry of a row with at most :obj:`k` of them
    (and of every row for ``k == -1``). Rows with more than :math:`2k`
    entries draw :math:`k` positions and redraw the repeated ones until they
    are distinct (:math:`O(k)` per row whatever its length: a popular item
    does not cost its degree); rows with :math:`k < n \le 2k` entries keep
    the :math:`k` smallest of random keys (:func:`_sample_per_segment`)."""
    if k < 0:
        return _csr_gather(rowptr, rows)
    start = rowptr.index_select(0, rows)
    count = rowptr.index_select(0, rows + 1) - start
    index = torch.arange(rows.numel())
    take_all = count <= k
    seg, pos = _csr_gather(rowptr, rows[take_all])
    parts_row, parts_pos = [index[take_all].index_select(0, seg)], [pos]
    medium = ~take_all & (count <= 2 * k)
    if bool(medium.any()):
        seg, pos = _csr_gather(rowptr, rows[medium])
        keep = _sample_per_segment(seg, int(medium.sum()), k)
        parts_row.append(index[medium].index_select(0, seg.index_select(0, keep)))
        parts_pos.append(pos.index_select(0, keep))
    large = count > 2 * k
    if bool(large.any()):
        row = index[large].repeat_interleave(k)                      # k slots per row
        size = count.index_select(0, row)
        offset = (torch.rand(row.numel()) * size).long().clamp_(max=size - 1)
        stride = int(count.max())  # key = (row, offset) in one integer
        while True:  # redraw the slots that repeat an earlier slot of their row
            key = row * stride + offset
            order = torch.argsort(key, stable=True)
            sorted_key = key.index_select(0, order)
            repeat = torch.zeros_like(row, dtype=torch.bool)
            repeat[order[1:]] = sorted_key[1:] == sorted_key[:-1]
            if not bool(repeat.any()):
                break
            redo = repeat.nonzero().view(-1)
            offset[redo] = (torch.rand(redo.numel()) * size.index_select(0, redo)).long() \
                .clamp_(max=size.index_select(0, redo) - 1)
        parts_row.append(row)
        parts_pos.append(start.index_select(0, row) + offset)
    return torch.cat(parts_row), torch.cat(parts_pos)


def _local_ids(nodes: Tensor, query: Tensor) -> Tensor:
    r"""Positions in ``nodes`` (unique global ids, any order) of the global
    ids ``query`` (each must occur in ``nodes``)."""
    order = torch.argsort(nodes)
    return order.index_select(0, torch.searchsorted(nodes.index_select(0, order), query))


class MiniBatchCRANE(nn.Module):
    r"""Computes :class:`~crane_pyg.models.CRANE`'s training loss on sampled
    subgraphs (see :mod:`crane_pyg.models.minibatch` for the math and the
    cost): the behavioural view on the batch's sampled user-item subgraph,
    the semantic view on the batch's items and their :math:`L_{ii}`-hop
    item-item neighbourhood only. Calling it, ``module(users, pos_items,
    neg_items)``, returns ``(loss, parts)`` like :meth:`CRANE.loss
    <crane_pyg.models.CRANE.loss>`, so the trainer (or DDP) can use it in
    place of the model. The parameters are the model's own; evaluation stays
    full-batch (:meth:`CRANE.embeddings <crane_pyg.models.CRANE.embeddings>`).

    The user-item sampler follows the graph the model trains on: the full
    graph in eval mode or without edge dropout, the epoch's pruned graph
    ``model.train_edge_index`` in training mode with ``edge_dropout > 0``;
    it is rebuilt whenever that tensor changes (after
    :meth:`CRANE.on_epoch_start <crane_pyg.models.CRANE.on_epoch_start>`
    prunes a new epoch's graph), and the item-item index whenever the model's
    item graph changes (a rebuild, a checkpoint load or a device move).

    Args:
        model (CRANE): the model (its ``num_ui_layers`` must equal
            ``len(num_neighbors)``).
        num_neighbors (sequence of int, optional): user-item fan-out per hop,
            ``-1`` for all neighbours (default: all on every hop, exact).
        item_mean_fanout (int, optional): :math:`k_{mean}`, the items sampled
            per batch user for the item mean of the user semantic view
            (``user_semantic`` ``'items'``/``'both'``), ``-1`` for all
            (default: ``num_neighbors[0]``, or ``-1`` when
            ``num_ui_layers == 0``). The item-item graph is never sampled.
        semantic_cache (int, optional): read the codes of the items outside
            the batch from a cache refreshed every this many steps (see
            above); :obj:`None`: every needed item through RCA.
            (default: :obj:`None`)

    Attributes:
        last_stats (dict): sizes of the last step: ``'users'`` (:math:`U_b`),
            ``'ui_nodes'`` (nodes of the user-item subgraph), ``'items_seed'``
            (:math:`|S_0|`), ``'items_encoded'`` (items through the encoders
            and RCA), ``'item_edges'`` (item-item edges propagated).
        cache (SemanticCodeCache or None): the items' cached codes
            (``semantic_cache``).
    """

    def __init__(self, model: nn.Module, num_neighbors: Sequence[int] | None = None,
                 item_mean_fanout: int | None = None,
                 semantic_cache: int | None = None) -> None:
        super().__init__()
        num_neighbors = _fanouts(self, model, CRANE, 'num_ui_layers', num_neighbors)
        if model.id_item_graph_users:
            raise ValueError('MiniBatchCRANE: id_item_graph_users=True is not supported by '
                             'mini-batch training; train full batch (train.num_neighbors: '
                             'null) or set model.id_item_graph_users to false')
        self.cache = (None if semantic_cache is None
                      else SemanticCodeCache(model, semantic_cache))
        if item_mean_fanout is None:
            item_mean_fanout = num_neighbors[0] if num_neighbors else -1
        self.model = model
        self.num_neighbors = num_neighbors
        self.item_mean_fanout = _check_fanout(item_mean_fanout, 'item_mean_fanout')
        self.conv = LGConv(normalize=False)
        self.item_conv = (ItemItemConv(cached=False, backend=model.item_conv.backend)
                          if model.propagate_items else None)
        # caches keyed on the graph tensors they were built from
        self._samplers: Dict[str, Tuple[Tensor, UserItemSubgraphSampler]] = {}
        self._item_graph: Tuple[Any, ...] | None = None
        self._user_items: Tuple[Any, ...] | None = None
        self.last_stats: Dict[str, int] = {}
        _ = self.sampler  # builds (and validates) the sampler of the current graph

    # ------------------------------------------------------------------
    # graph indices (rebuilt when the model's graph tensors change)
    # ------------------------------------------------------------------
    @property
    def sampler(self) -> UserItemSubgraphSampler:
        r"""The user-item sampler of the graph the model currently trains on."""
        model = self.model
        graph = model.ui_graph(model.training)[1]
        key = 'full' if graph is model.edge_index else 'train'
        cached = self._samplers.get(key)
        if cached is None or cached[0] is not graph:
            cached = (graph, UserItemSubgraphSampler(graph, model.num_users, model.num_items,
                                                     self.num_neighbors))
            self._samplers[key] = cached
        return cached[1]

    def _item_csr(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""``(rowptr [I + 1], source [nnz], weight [nnz])`` of the model's
        item-item graph, rows = receiving items (``item_adj_index[1]``)."""
        model = self.model
        index, weight = model.item_adj_index, model.item_adj_weight
        key = (index, index._version, weight, weight._version)
        if self._item_graph is None or not _same_key(self._item_graph[0], key):
            rowptr, perm = _csr(index[1], model.num_items)
            self._item_graph = (key, rowptr, index[0].index_select(0, perm),
                                weight.index_select(0, perm))
        return self._item_graph[1:]

    def _user_item_csr(self) -> Tuple[Tensor, Tensor, Tensor]:
        r"""``(rowptr [U + 1], item [E], item_degree [I])`` of the model's
        full training graph (the one of the item mean and the profiles)."""
        model = self.model
        edge_index = model.edge_index
        key = (edge_index, edge_index._version)
        if self._user_items is None or not _same_key(self._user_items[0], key):
            rowptr, perm = _csr(edge_index[0], model.num_users)
            deg_item = torch.bincount(edge_index[1], minlength=model.num_items)
            self._user_items = (key, rowptr, edge_index[1].index_select(0, perm), deg_item)
        return self._user_items[1:]

    def _user_items_of(self, batch_users: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        r"""``(segment, item)`` of the training edges of ``batch_users``, at most
        ``k`` per user uniformly without replacement (``-1``: all)."""
        rowptr, item, _ = self._user_item_csr()
        seg, pos = _csr_gather(rowptr, batch_users)
        keep = _sample_per_segment(seg, batch_users.numel(), k)
        return seg.index_select(0, keep), item.index_select(0, pos.index_select(0, keep))

    # ------------------------------------------------------------------
    # the two views on the batch
    # ------------------------------------------------------------------
    def behavioural(self, seeds: Tensor) -> Tensor:
        r""":math:`\mathbf{e}^{cf}` ``[len(seeds), d]`` of the unique homogeneous
        node ids ``seeds`` (users :math:`u`, items :math:`U + i`), on their
        sampled subgraph of the graph the model trains on."""
        model = self.model
        alpha = model.ui_graph(model.training)[0].alpha
        sub = self.sampler.sample(seeds)
        layers = _subgraph_layers(sub, self.conv, model.num_ui_layers, model)
        alpha = alpha.to(layers[0].dtype)
        out = alpha[0] * layers[0]
        for layer in range(1, model.num_ui_layers + 1):
            out = out + alpha[layer] * layers[layer]
        self.last_stats['ui_nodes'] = int(sub.node.numel())
        return out[:sub.num_seeds]

    def item_closure(self, seeds: Tensor, hops: int | None = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
        r"""The items whose content the semantic view of ``seeds`` (unique item
        ids) needs: ``(nodes, edge_index, edge_weight)`` with ``nodes`` the
        global ids of :math:`S_{L_{ii}}` (``seeds`` first, in their order),
        and the item-item edges of the receivers in :math:`S_{L_{ii} - 1}` in
        local ids, source to target (``edge_index[1]`` receives from
        ``edge_index[0]``, as :class:`~crane_pyg.nn.ItemItemConv`).
        :obj:`hops` overrides :math:`L_{ii}` (``0``: the seeds alone, no
        edges)."""
        device = seeds.device
        hops = self.model.num_ii_layers if hops is None else hops
        if self.item_conv is None or hops == 0:
            empty = torch.empty(2, 0, dtype=torch.long, device=device)
            return seeds, empty, torch.empty(0, device=device)
        rowptr, source, weight = self._item_csr()
        nodes, frontier, receivers, positions = seeds, seeds, [], []
        for _ in range(hops):
            seg, pos = _csr_gather(rowptr, frontier)
            receivers.append(frontier.index_select(0, seg))
            positions.append(pos)
            new = torch.unique(source.index_select(0, pos))
            new = new[~torch.isin(new, nodes)]
            nodes, frontier = torch.cat([nodes, new]), new
        pos = torch.cat(positions)
        edge_index = torch.stack([_local_ids(nodes, source.index_select(0, pos)),
                                  _local_ids(nodes, torch.cat(receivers))])
        return nodes, edge_index, weight.index_select(0, pos)

    def smoothed_item_ids(self, items: Tensor) -> Tensor:
        r""":math:`(\hat{\mathbf{S}}^{L_{ii}} \mathbf{E}^{(0)}_I)` of the unique
        ``items`` (``id_item_graph=True``), from their :math:`L_{ii}`-hop
        item-item neighbourhood only."""
        model = self.model
        nodes, edge_index, edge_weight = self.item_closure(items)
        h = model.item_embedding(nodes)
        adj = self.item_conv.adjacency(edge_index, nodes.numel(), nodes.numel(),
                                         edge_weight.to(h.dtype))
        for _ in range(model.num_ii_layers):
            h = self.item_conv(h, adj)
        return h[:items.numel()]

    def semantic(self, batch_users: Tensor, items: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The semantic view :math:`(\mathbf{H}_{users}, \mathbf{H}_{items})`,
        ``[U_b, d]`` and ``[len(items), d]``, of the unique ``batch_users``
        and unique ``items``, as :meth:`CRANE.semantic
        <crane_pyg.models.CRANE.semantic>` computes it (including
        ``semantic_scale``) but from the items' :math:`L_{ii}`-hop item-item
        neighbourhood only."""
        model = self.model
        num_items = items.numel()
        seeds = items
        if model.needs_item_mean:
            mean_seg, mean_item = self._user_items_of(batch_users, self.item_mean_fanout)
            extra = torch.unique(mean_item)
            seeds = torch.cat([items, extra[~torch.isin(extra, items)]])
        smooth = model.semantic_item_graph  # implies the item graph (and self.item_conv)
        nodes, edge_index, edge_weight = self.item_closure(seeds, hops=None if smooth else 0)
        num_seeds, num_nodes = seeds.numel(), nodes.numel()

        profile_nodes = None
        if model.needs_z_user and model.use_profiles and not model.precompute_profiles:
            # profiles aggregate the encoded vectors of *all* the users' items
            prof_seg, prof_item = self._user_items_of(batch_users, -1)
            extra = torch.unique(prof_item)
            nodes = torch.cat([nodes, extra[~torch.isin(extra, nodes)]])
            profile_nodes = (prof_seg, prof_item)

        if self.cache is None:
            x_item = model.encode_items(nodes)  # the encoders on the needed rows only
            profiles = None
            if profile_nodes is not None:
                profiles = self._aggregate_profiles(x_item, nodes, batch_users,
                                                    *profile_nodes)
            z_item, z_user = model.semantic_codes(x_item[:num_nodes], batch_users, profiles)
            encoded = nodes.numel()
        else:  # the batch's own items fresh (nodes start with them), the rest cached
            codes = self.cache.next_step()
            z_fresh, z_user = model.semantic_codes(model.encode_items(items), batch_users)
            z_item = torch.cat([z_fresh.to(codes.dtype),
                                codes.index_select(0, nodes[num_items:num_nodes])])
            encoded = num_items
        z_item, z_user = model.gate_codes(z_item, nodes[:num_nodes], z_user, batch_users)
        h = z_item
        if smooth:
            # one adjacency of the step's subgraph for all L_ii layers
            adj = self.item_conv.adjacency(edge_index, num_nodes, num_nodes,
                                             edge_weight.to(h.dtype))
            for _ in range(model.num_ii_layers):
                h = self.item_conv(h, adj)
        h_seeds = h[:num_seeds]
        item_mean = None
        if model.needs_item_mean:
            rows = h_seeds.index_select(0, _local_ids(seeds, mean_item))
            count = torch.bincount(mean_seg, minlength=batch_users.numel())
            inv = count.to(h.dtype).reciprocal().masked_fill(count == 0, 0.0)
            item_mean = torch.zeros(batch_users.numel(), h.size(-1), dtype=h.dtype,
                                    device=h.device).index_add(
                0, mean_seg, rows * inv.index_select(0, mean_seg).unsqueeze(-1))
        h_user, h_item = model.semantic_output(z_user, item_mean, h_seeds[:num_items])
        self.last_stats.update(items_seed=int(num_seeds), items_encoded=int(encoded),
                               item_edges=int(edge_index.size(1)))
        return h_user, h_item

    def _aggregate_profiles(self, x_item: Tensor, nodes: Tensor, batch_users: Tensor,
                            seg: Tensor, item: Tensor) -> Tensor:
        r""":math:`\mathbf{p}_m(u) = \sum_{i \in \mathcal{N}(u)} a_{ui}
        \mathbf{x}_m(i)` of ``batch_users`` from the encoded rows ``x_item``
        of ``nodes`` (``precompute_profiles=False``)."""
        model = self.model
        _, _, deg_item = self._user_item_csr()
        deg_user = torch.bincount(seg, minlength=batch_users.numel()).to(x_item.dtype)
        if model.profile_norm == 'mean':
            a = deg_user.reciprocal().index_select(0, seg)
        else:  # 'sym'
            a = (deg_user.index_select(0, seg)
                 * deg_item.index_select(0, item).to(x_item.dtype)).rsqrt()
        rows = x_item.index_select(0, _local_ids(nodes, item))
        out = torch.zeros(batch_users.numel(), *x_item.shape[1:], dtype=x_item.dtype,
                          device=x_item.device)
        return out.index_add(0, seg, rows * a.view(-1, 1, 1))

    # ------------------------------------------------------------------
    def forward(self, users: Tensor, pos_items: Tensor,
                neg_items: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        r"""CRANE's BPR + :math:`\lambda_{cl}` InfoNCE + :math:`\lambda_{reg}`
        L2 loss of the batch (see :meth:`CRANE.loss
        <crane_pyg.models.CRANE.loss>`), both views computed on the batch's
        subgraphs."""
        model = self.model
        model.check_batch(users, pos_items, neg_items)
        batch_users, user_pos = torch.unique(users, return_inverse=True)
        batch_items = pos_items[:0]
        if model.lambda_cl > 0:  # drawn first, as in CRANE.loss (same generator calls)
            batch_items, = model.cl_subset(torch.unique(pos_items))
        items, item_pos = torch.unique(torch.cat([pos_items, neg_items, batch_items]),
                                       return_inverse=True)
        self.last_stats = {'users': int(batch_users.numel())}
        cf = self.behavioural(torch.cat([batch_users, items + model.num_users]))
        e_user, e_items = cf[:batch_users.numel()], cf[batch_users.numel():]
        if model.id_item_graph:
            e_items = e_items + self.smoothed_item_ids(items)
        h_user, h_items = self.semantic(batch_users, items)
        e_rows, h_rows = e_items.index_select(0, item_pos), h_items.index_select(0, item_pos)
        return model.objective(users, pos_items, neg_items, user_pos, e_user, h_user,
                               e_rows, h_rows)

    def on_epoch_start(self, epoch: int) -> None:
        r"""The cache (``semantic_cache``) is refreshed at the epoch's first step."""
        if self.cache is not None:
            self.cache.on_epoch_start(epoch)

    def extra_repr(self) -> str:
        cache = '' if self.cache is None else f', semantic_cache={self.cache.refresh_every}'
        return (f'num_neighbors={self.num_neighbors}, '
                f'item_mean_fanout={self.item_mean_fanout}{cache}')


def _same_key(old: Tuple[Any, ...], new: Tuple[Any, ...]) -> bool:
    r"""Whether two cache keys of ``(tensor, version, ...)`` pairs match
    (same tensor objects, not modified in place since)."""
    return all((a is b) if isinstance(a, Tensor) else a == b for a, b in zip(old, new))


def minibatch_loss_module(model: nn.Module, num_neighbors: Sequence[int] | None = None,
                          semantic_cache: int | None = None) -> nn.Module:
    r"""The mini-batch loss module of :obj:`model`: :class:`MiniBatchCRANE` for
    :class:`~crane_pyg.models.CRANE`, :class:`MiniBatchLightGCN` for
    :class:`~crane_pyg.models.LightGCN` (what the trainer uses when
    ``train.num_neighbors`` is set).

    Raises:
        TypeError: for any other model (VBPR, FREEDOM: no sampled-subgraph
            loss; train them full-batch, ``train.num_neighbors: null``).
    """
    if isinstance(model, CRANE):
        return MiniBatchCRANE(model, num_neighbors, semantic_cache=semantic_cache)
    if semantic_cache is not None:
        raise TypeError(f'train.semantic_cache supports CRANE only, got '
                        f'{type(model).__name__}; set train.semantic_cache to null')
    if isinstance(model, LightGCN):
        return MiniBatchLightGCN(model, num_neighbors)
    raise TypeError(f'mini-batch training (train.num_neighbors) supports CRANE and '
                    f'LightGCN, got {type(model).__name__}; set train.num_neighbors to '
                    f'null to train it full-batch')
