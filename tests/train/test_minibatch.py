"""Mini-batch LightGCN: with all neighbours on every hop the sampled-subgraph
embeddings, loss and gradients equal the full-batch ones."""
from __future__ import annotations

import pytest
import torch
import torch_geometric.typing as pyg_typing

from crane_pyg.models import CRANE, LightGCN
from crane_pyg.train.minibatch import MiniBatchLightGCN, UserItemSubgraphSampler

pytestmark = pytest.mark.skipif(
    not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE),
    reason='neighbour sampling needs pyg-lib or torch-sparse')

U, I = 30, 25


def edges() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(U, I, generator=g) < 0.15
    keep[torch.arange(U), torch.arange(U) % I] = True  # every user has an item
    return keep.nonzero().t()


def model(num_layers: int = 3) -> LightGCN:
    torch.manual_seed(0)
    return LightGCN(U, I, edges(), embedding_dim=6, num_layers=num_layers, reg_weight=1e-2)


@pytest.mark.parametrize('num_layers', [1, 3])
def test_full_fanout_embeddings_equal_full_batch(num_layers):
    m = model(num_layers)
    mini = MiniBatchLightGCN(m)
    user_emb, item_emb = m.embeddings()
    seeds = torch.tensor([0, 7, 29, U + 3, U + 24])
    sub = mini.subgraph_embeddings(seeds)
    expected = torch.cat([user_emb[[0, 7, 29]], item_emb[[3, 24]]])
    torch.testing.assert_close(sub, expected, atol=1e-6, rtol=1e-5)
    # the subgraph is a real restriction for one layer (not the whole graph)
    if num_layers == 1:
        assert mini.sampler.sample(seeds).node.numel() < U + I


def test_full_fanout_loss_and_gradients_equal_full_batch():
    m = model(2)
    mini = MiniBatchLightGCN(m)
    users = torch.tensor([0, 0, 5, 12, 29])
    pos = torch.tensor([0, 1, 5, 12, 4])
    neg = torch.tensor([9, 10, 11, 3, 20])
    loss_full, parts_full = m.loss(users, pos, neg)
    grads_full = torch.autograd.grad(loss_full, list(m.parameters()))
    loss_mini, parts_mini = mini(users, pos, neg)
    grads_mini = torch.autograd.grad(loss_mini, list(m.parameters()))
    torch.testing.assert_close(loss_mini, loss_full, atol=1e-6, rtol=1e-6)
    assert parts_mini == pytest.approx(parts_full, rel=1e-5)
    for a, b in zip(grads_mini, grads_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert grads_mini[0].abs().sum() > 0


def test_partial_fanout_bounds_the_subgraph_and_rescales():
    ei = edges()
    sampler = UserItemSubgraphSampler(ei, U, I, num_neighbors=[2])
    seeds = torch.tensor([0, 1, 2])
    sub = sampler.sample(seeds)
    src, dst = sub.node[sub.edge_index[0]], sub.node[sub.edge_index[1]]
    assert torch.equal(sub.node[:3], seeds)
    deg_u = torch.bincount(ei[0], minlength=U).float()
    deg_i = torch.bincount(ei[1], minlength=I).float()
    sampled = torch.bincount(dst, minlength=3).float()
    assert torch.equal(sampled, torch.minimum(deg_u[:3], torch.tensor(2.0)))
    assert bool((src >= U).all()) and bool((dst < 3).all())   # item -> seed user edges
    # weight = 1 / sqrt(d_u d_i), rescaled by full / sampled degree of the receiver
    expected = (deg_u[dst] * deg_i[src - U]).rsqrt() * deg_u[dst] / sampled[dst]
    torch.testing.assert_close(sub.edge_weight, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_neighbors'):
        MiniBatchLightGCN(model(2), [-1])
    with pytest.raises(ValueError, match='positive or -1'):
        UserItemSubgraphSampler(edges(), U, I, [0, -1])
    features = {'image': torch.randn(I, 4)}
    crane = CRANE(U, I, edges(), features, embedding_dim=4, use_item_graph=False)
    with pytest.raises(TypeError, match='LightGCN only'):
        MiniBatchLightGCN(crane)


def test_trainer_minibatch_mode_equals_full_batch(tmp_path):
    """``train.num_neighbors=[-1, -1]`` trains exactly like full-batch LightGCN."""
    import dataclasses

    from crane_pyg.train import Trainer

    from .test_distributed import make_model, tiny_config, tiny_data
    config = dataclasses.replace(tiny_config(), epochs=1)
    full = Trainer(make_model(), tiny_data(), config, tmp_path / 'full', quiet=True,
                   plot=False, restore_best=False)
    full.fit()
    mini_config = dataclasses.replace(config, num_neighbors=(-1, -1))
    mini = Trainer(make_model(), tiny_data(), mini_config, tmp_path / 'mini', quiet=True,
                   plot=False, restore_best=False)
    assert isinstance(mini.train_model, MiniBatchLightGCN)
    mini.fit()
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(mini.model.state_dict()[name], value, atol=1e-5, rtol=0)
    assert mini.history[0]['loss'] == pytest.approx(full.history[0]['loss'], abs=1e-6)
