r"""CRANE's layers inside PyG's :class:`~torch_geometric.nn.HeteroConv`, next to
PyG's own :class:`~torch_geometric.nn.conv.LGConv`.

The layers follow PyG's conventions (messages flow from ``edge_index[0]`` to
``edge_index[1]``; a bipartite layer takes ``(x_src, x_dst)`` and returns the
target side), so they sit on the edge types of the :class:`HeteroData` that
:func:`crane_pyg.data.load_mmrec` returns, as any PyG conv does:

* ``('user', 'interacts', 'item')`` / ``('item', 'rev_interacts', 'user')``:
  :class:`~crane_pyg.nn.UserItemConv`, one LightGCN step each way, in
  ``HeteroConv`` and in a model turned heterogeneous by
  :func:`~torch_geometric.nn.to_hetero` (the same numbers as PyG's ``LGConv``
  on ``data.to_homogeneous()``);
* ``('item', 'rev_interacts', 'user')``:
  :class:`~crane_pyg.nn.UserProfileAggregation`, users' profiles and the
  mean of their items' semantic vectors;
* ``('item', 'similar', 'item')``: :class:`~crane_pyg.nn.ItemItemConv` on
  :class:`~crane_pyg.transforms.ItemKNNGraph`'s output, as it is;
* :class:`~crane_pyg.nn.RecursiveCrossModalAttention` is node-wise: one
  module for every node type (shared weights, as in CRANE).

With a trained (here: freshly initialised) :class:`~crane_pyg.models.CRANE`'s
parameters, :func:`crane_views` recomputes the model's two views and its
final embeddings from these pieces and the script checks them against
:meth:`CRANE.behavioural`, :meth:`CRANE.semantic` and :meth:`CRANE.embeddings`.

Run ``python examples/hetero_layers.py`` (seconds).
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.nn import HeteroConv, LGConv, to_hetero

from crane_pyg.data import load_synthetic
from crane_pyg.models import CRANE
from crane_pyg.nn import ItemItemConv, UserItemConv, UserProfileAggregation
from crane_pyg.transforms import ItemKNNGraph

UI, IU, II = ('user', 'interacts', 'item'), ('item', 'rev_interacts', 'user'), \
    ('item', 'similar', 'item')


def lightgcn_hetero(x_dict: Dict[str, Tensor], data: HeteroData, num_layers: int,
                    backend: str = 'auto') -> Dict[str, Tensor]:
    r"""LightGCN over the user-item edge types: :math:`L` HeteroConv steps of
    :class:`UserItemConv`, mean over the layers 0..L."""
    conv = HeteroConv({UI: UserItemConv(backend=backend), IU: UserItemConv(backend=backend)})
    out = {t: x / (num_layers + 1) for t, x in x_dict.items()}
    for _ in range(num_layers):
        x_dict = conv(x_dict, data.edge_index_dict)
        out = {t: out[t] + x_dict[t] / (num_layers + 1) for t in out}
    return out


class LightGCNStack(torch.nn.Module):
    r"""A homogeneous-looking GNN of :class:`UserItemConv` layers (mean over
    layers 0..L) for :func:`~torch_geometric.nn.to_hetero` to turn into one
    conv per edge type."""

    def __init__(self, num_layers: int, backend: str = 'auto') -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList([UserItemConv(backend=backend)
                                          for _ in range(num_layers)])

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        out = x / (len(self.convs) + 1)
        for conv in self.convs:
            x = conv(x, edge_index)
            out = out + x / (len(self.convs) + 1)
        return out


def lightgcn_to_hetero(x_dict: Dict[str, Tensor], data: HeteroData, num_layers: int,
                       backend: str = 'auto') -> Dict[str, Tensor]:
    r"""The same through :func:`~torch_geometric.nn.to_hetero`."""
    metadata = (['user', 'item'], [UI, IU])
    model = to_hetero(LightGCNStack(num_layers, backend), metadata, aggr='sum')
    return model(x_dict, {t: data[t].edge_index for t in metadata[1]})


def lightgcn_homogeneous(x_dict: Dict[str, Tensor], data: HeteroData,
                         num_layers: int) -> Dict[str, Tensor]:
    r"""The same with PyG's :class:`LGConv` on the homogeneous graph."""
    graph = data.edge_type_subgraph([UI, IU])
    types = graph.node_types  # to_homogeneous stacks the node types in this order
    x = torch.cat([x_dict[t] for t in types])
    edge_index = graph.to_homogeneous().edge_index
    conv, out = LGConv(), x / (num_layers + 1)
    for _ in range(num_layers):
        x = conv(x, edge_index)
        out = out + x / (num_layers + 1)
    return dict(zip(types, out.split([data[t].num_nodes for t in types])))


def item_graph(x: Tensor, data: HeteroData, num_layers: int,
               backend: str = 'auto') -> Tensor:
    r""":math:`\hat{\mathbf{S}}^{L} \mathbf{x}` over ItemKNNGraph's graph, in HeteroConv."""
    conv = HeteroConv({II: ItemItemConv(backend=backend)})
    for _ in range(num_layers):
        x = conv({'item': x}, data.edge_index_dict,
                 {II: data[II].edge_weight})['item']
    return x


def item_to_user(x_item: Tensor, data: HeteroData, normalize: str,
                 backend: str = 'auto') -> Tensor:
    r"""Per-user aggregation of item rows (profiles, item mean) in HeteroConv;
    users carry no features, so the number of users comes as ``size``."""
    with warnings.catch_warnings():  # items are sources only here, on purpose
        warnings.filterwarnings('ignore', message='.*do not occur as destination type.*')
        conv = HeteroConv({IU: UserProfileAggregation(normalize, backend=backend)})
    size = (data['item'].num_nodes, data['user'].num_nodes)
    return conv({'item': x_item}, data.edge_index_dict, size_dict={IU: size})['user']


@torch.no_grad()
def crane_views(model: CRANE, data: HeteroData, backend: str = 'auto'
                ) -> Dict[str, Tuple[Tensor, Tensor]]:
    r"""CRANE's behavioural view, semantic view and fused embeddings (users,
    items) from the layers in HeteroConv and the model's parameters."""
    x_dict = {'user': model.user_embedding.weight, 'item': model.item_embedding.weight}
    e = lightgcn_hetero(x_dict, data, model.num_ui_layers, backend)
    for other in (lightgcn_homogeneous(x_dict, data, model.num_ui_layers),  # PyG's LGConv
                  lightgcn_to_hetero(x_dict, data, model.num_ui_layers, backend)):
        for t in e:
            torch.testing.assert_close(other[t], e[t], atol=1e-5, rtol=1e-5)
    if model.id_item_graph:  # FREEDOM's smoothing of the item IDs
        e['item'] = e['item'] + item_graph(x_dict['item'], data, model.num_ii_layers, backend)

    # semantic view: encoders, profiles, RCA (node-wise, shared), item graph, item mean
    x_item = model.encode_items()                                      # [I, M, d]
    z = {'item': model.rca(x_item),
         'user': model.rca(item_to_user(x_item, data, model.profile_norm, backend))}
    h_item = item_graph(z['item'], data, model.num_ii_layers, backend)
    h_user = {'profile': z['user'], 'items': item_to_user(h_item, data, 'mean', backend),
              'both': 0.5 * (z['user'] + item_to_user(h_item, data, 'mean', backend))
              }[model.user_semantic]
    if model.semantic_scale is not None:  # the model's fixed-norm semantic view
        scale_user, scale_item = model.semantic_scales()
        h_user = scale_user * torch.nn.functional.normalize(h_user, dim=-1)
        h_item = scale_item * torch.nn.functional.normalize(h_item, dim=-1)
    fuse = (lambda a, b: a + b) if model.fusion == 'sum' else \
        (lambda a, b: torch.cat([a, b], dim=-1))
    return {'behavioural': (e['user'], e['item']), 'semantic': (h_user, h_item),
            'full': (fuse(e['user'], h_user), fuse(e['item'], h_item))}


def build(root: str, backend: str = 'auto', seed: int = 0, **options) -> Tuple[CRANE, HeteroData]:
    r"""The synthetic dataset with its kNN graph, and a seeded CRANE on it."""
    data = load_synthetic(root, num_users=300, num_items=200, num_interactions=4000,
                          modalities={'image': 32, 'text': 24})
    data = ItemKNNGraph(k=options.get('knn_k', 10))(data)
    torch.manual_seed(seed)
    return CRANE.from_data(data, backend=backend, **options).eval(), data


def check(model: CRANE, data: HeteroData, backend: str = 'auto',
          atol: float = 1e-5) -> Dict[str, float]:
    r"""The largest difference per view between :func:`crane_views` and the
    model's own forward; raises if one exceeds :obj:`atol`."""
    ours = crane_views(model, data, backend)
    with torch.no_grad():
        theirs = {view: model.view_embeddings(view) for view in ours}
    diff = {}
    for view in ours:
        diff[view] = max((a - b).abs().max().item() for a, b in zip(ours[view], theirs[view]))
        if diff[view] > atol:
            raise AssertionError(f'{view} view differs from the model by {diff[view]:.3g}')
    return diff


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backend', default='auto')
    parser.add_argument('--root', default=None, help='dataset cache (default: a temp dir)')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build(args.root or tmp, args.backend)
    diff = check(model, data, args.backend)
    for view, d in diff.items():
        print(f'{view}: max |HeteroConv - CRANE| = {d:.2e}')
    return diff


if __name__ == '__main__':
    main()
