r"""Reusing crane_pyg layers in a model that is not ours.

PyG's own :class:`torch_geometric.nn.models.LightGCN` (one homogeneous graph
over the :math:`U + I` user and item nodes) gets multimodal input embeddings:
item modality features are encoded, users receive the mean of their items'
encodings (:class:`crane_pyg.nn.UserProfileAggregation`), and
:class:`crane_pyg.nn.RecursiveCrossModalAttention` fuses the modalities of
every node into one vector that is added to the node's ID embedding before
LightGCN's propagation. No crane_pyg model class is involved.

Run ``python examples/reuse_layers.py`` (about 10 s on a laptop CPU): it
trains on a small synthetic dataset for a few BPR epochs and prints the loss
and the validation Recall@20.
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn.models import LightGCN

from crane_pyg.data import BPRSampler, load_synthetic
from crane_pyg.metrics import FullRankingEvaluator
from crane_pyg.nn import RecursiveCrossModalAttention, UserProfileAggregation


class ContentLightGCN(nn.Module):
    r"""PyG's LightGCN whose input embedding of node :math:`v` is
    :math:`\mathbf{e}_v + \mathrm{RCA}([\mathbf{x}_1(v), \dots,
    \mathbf{x}_M(v)])`, with :math:`\mathbf{x}_m(i) = \mathbf{W}_m
    \mathbf{f}_m(i)` for items and the mean over the user's training items
    for users."""

    def __init__(self, num_users: int, num_items: int, feature_dims: Sequence[int],
                 dim: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.lightgcn = LightGCN(num_users + num_items, dim, num_layers)
        self.encoders = nn.ModuleList([nn.Linear(d, dim) for d in feature_dims])
        self.profile = UserProfileAggregation(normalize='mean')
        self.rca = RecursiveCrossModalAttention(len(feature_dims), dim, num_recursions=2)

    def forward(self, features: List[Tensor], iu_edge_index: Tensor,
                edge_index: Tensor) -> Tensor:
        # --- begin core ---
        x_item = torch.stack([enc(f) for enc, f in zip(self.encoders, features)], dim=1)
        x_user = self.profile((x_item, None), iu_edge_index,          # items -> users
                              size=(self.num_items, self.num_users))  # [U, M, d]
        content = self.rca(torch.cat([x_user, x_item], dim=0))        # [U + I, d]
        x = self.lightgcn.embedding.weight + content                  # augmented input
        out = x * self.lightgcn.alpha[0]
        for conv, alpha in zip(self.lightgcn.convs, self.lightgcn.alpha[1:]):
            x = conv(x, edge_index)                                   # PyG's LGConv
            out = out + alpha * x
        # --- end core ---
        return out  # [U + I, d]; users first, then items


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=1024)
    parser.add_argument('--lr', type=float, default=5e-3)
    parser.add_argument('--root', default=None, help='dataset cache (default: a temp dir)')
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data = load_synthetic(args.root or tmp, num_users=600, num_items=400,
                              num_interactions=9000,
                              modalities={'image': 64, 'text': 96})
    num_users, num_items = data['user'].num_nodes, data['item'].num_nodes
    ui_edge_index = data['user', 'interacts', 'item'].edge_index
    iu_edge_index = data['item', 'rev_interacts', 'user'].edge_index
    features = [data['item'][m] for m in data.modalities]
    # Homogeneous graph for PyG's LightGCN: items become nodes U..U+I-1.
    ui = torch.stack([ui_edge_index[0], ui_edge_index[1] + num_users])
    edge_index = torch.cat([ui, ui.flip(0)], dim=1)

    model = ContentLightGCN(num_users, num_items, [f.size(1) for f in features])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = BPRSampler(ui_edge_index, num_users, num_items, seed=0)
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20, ))

    def recall() -> float:
        model.eval()
        with torch.no_grad():
            emb = model(features, iu_edge_index, edge_index)
        user_emb, item_emb = emb[:num_users], emb[num_users:]
        return evaluator.evaluate(lambda u: user_emb[u] @ item_emb.t())['recall@20']

    losses, recalls = [], [recall()]
    print(f'untrained: valid recall@20 {recalls[0]:.4f}')
    for epoch in range(args.epochs):
        model.train()
        total, count = 0.0, 0
        for users, pos, neg in sampler.batches(epoch, args.batch_size):
            emb = model(features, iu_edge_index, edge_index)
            src, dst_pos, dst_neg = emb[users], emb[num_users + pos], emb[num_users + neg]
            node_id = torch.cat([users, num_users + pos, num_users + neg])
            loss = model.lightgcn.recommendation_loss(
                (src * dst_pos).sum(-1), (src * dst_neg).sum(-1), node_id=node_id)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * users.numel(), count + users.numel()
        losses.append(total / count)
        recalls.append(recall())
        print(f'epoch {epoch}: BPR loss {losses[-1]:.4f}, valid recall@20 {recalls[-1]:.4f}')
    return {'losses': losses, 'recalls': recalls}


if __name__ == '__main__':
    main()
