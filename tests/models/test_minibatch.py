"""Mini-batch LightGCN and CRANE: with all neighbours on every hop the
sampled-subgraph embeddings, loss and gradients equal the full-batch ones; a
finite fan-out bounds the subgraph."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from crane_pyg.models import CRANE, VBPR, LightGCN
from crane_pyg.models.minibatch import (MiniBatchCRANE, MiniBatchLightGCN,
                                       Subgraph, UserItemSubgraphSampler,
                                       minibatch_loss_module)


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


def test_receiver_hop_is_the_distance_from_the_seeds():
    # seeds 0, 1; edges 2 -> 0, 3 -> 2, 4 -> 3, 3 -> 1
    sub = Subgraph(node=torch.arange(5), edge_index=torch.tensor([[2, 3, 4, 3], [0, 2, 3, 1]]),
                   edge_weight=torch.ones(4), num_seeds=2)
    # receivers 0, 2, 3, 1: hops 0, 1, 1 (3 reaches seed 1 directly), 0
    assert sub.receiver_hop(3).tolist() == [0, 1, 1, 0]
    # a receiver's hop is its shortest distance, whatever the number of layers
    assert sub.receiver_hop(2).tolist() == [0, 1, 1, 0]
    assert sub.receiver_hop(1).tolist() == [0, 1, 1, 0]


def test_sample_per_row_draws_distinct_uniform_entries():
    from crane_pyg.models.minibatch import _sample_per_row
    # rows of 0, 3, 7 (k < n <= 2k), 40 and 200 (> 2k) entries
    counts = torch.tensor([0, 3, 7, 40, 200])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    rows = torch.tensor([4, 0, 1, 2, 3])
    torch.manual_seed(0)
    hits = torch.zeros(int(rowptr[-1]))
    for _ in range(400):
        row, pos = _sample_per_row(rowptr, rows, 5)
        per_row = torch.bincount(row, minlength=5)
        assert per_row.tolist() == [5, 0, 3, 5, 5]            # min(n, k) each
        assert pos.unique().numel() == pos.numel()            # distinct entries
        lo, hi = rowptr[rows[row]], rowptr[rows[row] + 1]
        assert bool(((pos >= lo) & (pos < hi)).all())         # inside their row
        hits[pos] += 1
    # uniform: every entry of a row of n > k is drawn 400 k / n times on average
    for r, n in ((2, 7), (3, 40), (4, 200)):
        share = hits[rowptr[r]:rowptr[r + 1]]
        expected = 400 * 5 / n
        assert share.mean().item() == pytest.approx(expected, rel=1e-5)  # k per draw
        # Pearson's statistic against uniform: about n - 1 (a biased draw,
        # e.g. the first entries favoured, gives many times that)
        chi2 = ((share - expected) ** 2 / expected).sum().item()
        assert chi2 < (n - 1) + 5 * (2 * (n - 1)) ** 0.5, (n, chi2)
    row, pos = _sample_per_row(rowptr, rows, -1)
    assert torch.equal(torch.bincount(row, minlength=5), counts[rows])


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_neighbors'):
        MiniBatchLightGCN(model(2), [-1])
    with pytest.raises(ValueError, match='positive or -1'):
        UserItemSubgraphSampler(edges(), U, I, [0, -1])
    features = {'image': torch.randn(I, 4)}
    crane = CRANE(U, I, edges(), features, embedding_dim=4, use_item_graph=False)
    with pytest.raises(TypeError, match='LightGCN only'):
        MiniBatchLightGCN(crane)


# ----------------------------------------------------------------------
# CRANE
# ----------------------------------------------------------------------

def crane(data, **options) -> CRANE:
    torch.manual_seed(0)
    defaults = dict(embedding_dim=8, num_ii_layers=2, knn_k=3, lambda_cl=0.1)
    defaults.update(options)
    return CRANE.from_data(data, **defaults)


def crane_batch(data, size: int = 16, seed: int = 1):
    """Training triples with repeated users and repeated positives."""
    g = torch.Generator().manual_seed(seed)
    edge_index = data['user', 'interacts', 'item'].edge_index
    pick = torch.randint(0, edge_index.size(1), (size,), generator=g)
    users, pos = edge_index[0, pick].clone(), edge_index[1, pick].clone()
    users[1], pos[3] = users[0], pos[2]
    neg = torch.randint(0, int(data['item'].num_nodes), (size,), generator=g)
    return users, pos, neg


def assert_same_loss_and_gradients(model, mini, batch, seed: int = 5):
    params = list(model.parameters())
    torch.manual_seed(seed)  # the InfoNCE subsets (cl_max_nodes) draw from it
    loss_full, parts_full = model.loss(*batch)
    grads_full = torch.autograd.grad(loss_full, params, allow_unused=True)
    torch.manual_seed(seed)
    loss_mini, parts_mini = mini(*batch)
    grads_mini = torch.autograd.grad(loss_mini, params, allow_unused=True)
    torch.testing.assert_close(loss_mini, loss_full, atol=1e-5, rtol=1e-5)
    assert parts_mini == pytest.approx(parts_full, rel=1e-5, abs=1e-7)
    assert set(parts_mini) == set(parts_full)
    names = [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, grads_mini, grads_full):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # the content side really is trained through the subgraph
    encoder = dict(zip(names, grads_mini))['encoders.0.weight']
    assert encoder is not None and encoder.abs().sum() > 0


@pytest.mark.parametrize('edge_dropout', [0.0, 0.3])
@pytest.mark.parametrize('user_semantic', ['profile', 'items', 'both'])
def test_crane_full_fanout_equals_full_batch(synthetic_data, user_semantic, edge_dropout):
    """Loss and all gradients equal CRANE.loss; with edge dropout the sampler
    follows each epoch's pruned graph, and a rebuilt item graph is picked up."""
    model = crane(synthetic_data, user_semantic=user_semantic, edge_dropout=edge_dropout,
                  graph_rebuild_every=1 if edge_dropout > 0 else 0)
    mini = MiniBatchCRANE(model, [-1, -1])
    model.train()
    for epoch in range(2):
        model.on_epoch_start(epoch)  # epoch 1: new pruned graph (and item graph rebuild)
        assert_same_loss_and_gradients(model, mini, crane_batch(synthetic_data, seed=epoch))
        if edge_dropout > 0:
            assert mini.sampler.num_edges == 2 * model.train_edge_index.size(1)
            assert model.train_edge_index.size(1) < model.edge_index.size(1)
    stats = mini.last_stats
    assert stats['users'] <= 16 and stats['items_seed'] <= stats['items_encoded']


@pytest.mark.parametrize('options', [
    dict(precompute_profiles=False, profile_norm='sym', cl_max_nodes=4),
    dict(use_profiles=False, use_rca=False, num_ui_layers=1),
    dict(use_item_graph=False, fusion='concat', semantic_scale=None, user_semantic='items'),
    dict(eval_mode=True, edge_dropout=0.3, num_ii_layers=1),
    dict(id_item_graph=False, num_ii_layers=2),
    dict(id_item_graph=True, num_ii_layers=2),
    dict(semantic_gate=True, semantic_scale=None, precompute_profiles=False),
    dict(semantic_item_graph=False, num_ii_layers=2, semantic_scale=None),
], ids=['profiles-on-the-fly', 'no-profiles-no-rca', 'no-item-graph-concat', 'eval',
        'no-id-item-graph', 'id-item-graph-2-hops', 'semantic-gate', 'ids-only-item-graph'])
def test_crane_full_fanout_equals_full_batch_variants(synthetic_data, options):
    options = dict(options)
    eval_mode = options.pop('eval_mode', False)
    model = crane(synthetic_data, **options)
    model.train(not eval_mode)  # eval: the full graph, not the pruned one
    mini = MiniBatchCRANE(model)
    assert mini.num_neighbors == [-1] * model.num_ui_layers
    assert_same_loss_and_gradients(model, mini, crane_batch(synthetic_data))


def test_crane_item_closure_is_the_l_hop_in_neighbourhood(synthetic_data):
    """The items encoded are the seeds and their L_ii-hop in-neighbours, and
    the propagated edges are all in-edges of the items within L_ii - 1 hops."""
    model = crane(synthetic_data, num_ii_layers=2)
    mini = MiniBatchCRANE(model)
    num_items = model.num_items
    S = torch.zeros(num_items, num_items)
    S[model.item_adj_index[1], model.item_adj_index[0]] = model.item_adj_weight  # rows receive
    seeds = torch.tensor([5, 0, 17])
    nodes, edge_index, edge_weight = mini.item_closure(seeds)
    assert torch.equal(nodes[:3], seeds) and nodes.unique().numel() == nodes.numel()
    hop1 = torch.zeros(num_items, dtype=torch.bool)
    hop1[seeds] = True
    hop1 |= (S[seeds] != 0).any(0)
    hop2 = hop1 | (S[hop1] != 0).any(0)
    assert set(nodes.tolist()) == set(hop2.nonzero().view(-1).tolist())
    assert nodes.numel() < num_items
    # the subgraph's matrix is S restricted to rows in hop1, columns in hop2
    sub = torch.zeros(nodes.numel(), nodes.numel())
    sub[edge_index[1], edge_index[0]] = edge_weight  # source -> target
    expected = S[nodes][:, nodes] * hop1[nodes].unsqueeze(1)
    torch.testing.assert_close(sub, expected)


def test_crane_finite_fanout_samples_and_trains(synthetic_data):
    """A finite fan-out gives a finite loss and gradients, samples at most
    k items per user for the item mean and touches fewer nodes and items."""
    model = crane(synthetic_data, user_semantic='both', num_ii_layers=1, edge_dropout=0.2)
    model.train()
    model.on_epoch_start(0)
    users, pos, neg = crane_batch(synthetic_data, size=6)
    full = MiniBatchCRANE(model, [-1, -1])
    full(users, pos, neg)
    mini = MiniBatchCRANE(model, [3, 2])
    assert mini.item_mean_fanout == 3
    loss, parts = mini(users, pos, neg)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'bpr', 'cl', 'reg'}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoders[0].weight.grad.abs().sum() > 0
    assert model.user_embedding.weight.grad.abs().sum() > 0
    stats = mini.last_stats
    assert stats['ui_nodes'] < full.last_stats['ui_nodes']
    assert stats['items_seed'] < full.last_stats['items_seed']
    assert stats['items_encoded'] < model.num_items
    # the item mean's sample: min(deg, k) distinct training items per user
    batch_users = users.unique()
    seg, item = mini._user_items_of(batch_users, 3)
    edge_index = model.edge_index
    for j, u in enumerate(batch_users.tolist()):
        mine = item[seg == j]
        own = edge_index[1, edge_index[0] == u]
        assert mine.numel() == min(own.numel(), 3) == mine.unique().numel()
        assert bool(torch.isin(mine, own).all())


def test_crane_bad_arguments(synthetic_data):
    model = crane(synthetic_data, num_ii_layers=1)
    with pytest.raises(ValueError, match='num_ui_layers=2'):
        MiniBatchCRANE(model, [-1])
    with pytest.raises(ValueError, match='item_mean_fanout'):
        MiniBatchCRANE(model, [-1, -1], item_mean_fanout=0)
    with pytest.raises(TypeError, match='CRANE only'):
        MiniBatchCRANE(LightGCN(U, I, edges()))
    assert isinstance(minibatch_loss_module(model, [4, 4]), MiniBatchCRANE)
    assert isinstance(minibatch_loss_module(LightGCN(U, I, edges()), [2, 2]),
                      MiniBatchLightGCN)
    vbpr = VBPR.from_data(synthetic_data, embedding_dim=4)
    with pytest.raises(TypeError, match='supports CRANE and LightGCN, got VBPR'):
        minibatch_loss_module(vbpr, [-1])


def test_trainer_minibatch_mode_equals_full_batch_crane(synthetic_data, tmp_path):
    """``train.num_neighbors=[-1, -1]`` trains CRANE exactly like full-batch
    (edge dropout: the pruned graph changes every epoch)."""
    from crane_pyg.train import TrainConfig, Trainer

    def make():
        return crane(synthetic_data, user_semantic='both', num_ii_layers=1,
                     edge_dropout=0.2, cl_max_nodes=64)

    config = TrainConfig(epochs=2, batch_size=1024, lr=0.01, eval_batch_size=512, seed=3,
                         device='cpu', ks=(20,), stop_metric='recall@20')
    full = Trainer(make(), synthetic_data, config, tmp_path / 'full', quiet=True,
                   plot=False, restore_best=False)
    full.fit()
    mini = Trainer(make(), synthetic_data,
                   dataclasses.replace(config, num_neighbors=(-1, -1)), tmp_path / 'mini',
                   quiet=True, plot=False, restore_best=False)
    assert isinstance(mini.train_model, MiniBatchCRANE)
    mini.fit()
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(mini.model.state_dict()[name], value, atol=1e-5, rtol=0)
    for a, b in zip(mini.history, full.history):
        assert a['loss'] == pytest.approx(b['loss'], abs=1e-6)
    with pytest.raises(TypeError, match='supports CRANE and LightGCN'):
        Trainer(VBPR.from_data(synthetic_data, embedding_dim=4), synthetic_data,
                dataclasses.replace(config, num_neighbors=(-1,)), tmp_path / 'vbpr',
                quiet=True, plot=False)


@pytest.mark.parametrize('options', [
    dict(), dict(user_semantic='items'), dict(user_semantic='profile', num_ii_layers=1),
    dict(semantic_gate=True, semantic_scale=None),
    dict(semantic_item_graph=False, user_semantic='items')],
    ids=['both', 'items', 'profile', 'gate', 'ids-only-item-graph'])
def test_crane_full_fanout_with_the_cache_equals_full_batch_after_a_refresh(synthetic_data,
                                                                            options):
    """semantic_cache: the batch's items through RCA, every other item's code
    from the cache; right after a refresh the loss is the exact one, and the
    gradient reaches the same parameters."""
    model = crane(synthetic_data, **options).train()
    plain = MiniBatchCRANE(model)
    mini = MiniBatchCRANE(model, semantic_cache=4)
    assert 'semantic_cache=4' in repr(mini)
    batch = crane_batch(synthetic_data)
    params = list(model.parameters())
    torch.manual_seed(5)
    exact, parts = model.loss(*batch)
    grads = torch.autograd.grad(exact, params, allow_unused=True)
    torch.manual_seed(5)
    plain(*batch)
    torch.manual_seed(5)
    cached, cached_parts = mini(*batch)
    grads_cached = torch.autograd.grad(cached, params, allow_unused=True)
    torch.testing.assert_close(cached, exact, atol=1e-5, rtol=1e-5)
    assert cached_parts == pytest.approx(parts, rel=1e-5, abs=1e-7)
    for name, a, b in zip([n for n, _ in model.named_parameters()], grads_cached, grads):
        assert (a is None) == (b is None), name
    assert mini.cache.refreshes == 1
    # RCA ran on the batch's own items only, fewer than the subgraph needs
    assert mini.last_stats['items_encoded'] < plain.last_stats['items_encoded']
    assert mini.last_stats['items_seed'] == plain.last_stats['items_seed']


def test_crane_cache_refresh_schedule_in_minibatch_training(synthetic_data):
    model = crane(synthetic_data).train()
    mini = MiniBatchCRANE(model, [5, 5], semantic_cache=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(5):
        loss, _ = mini(*crane_batch(synthetic_data, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mini.cache.refreshes == 3  # steps 0, 2, 4
    stale = mini.cache.codes.clone()
    mini.on_epoch_start(1)
    mini(*crane_batch(synthetic_data, seed=7))
    assert mini.cache.refreshes == 4 and not torch.equal(stale, mini.cache.codes)
    with pytest.raises(TypeError, match='CRANE only'):
        minibatch_loss_module(LightGCN.from_data(synthetic_data), [-1, -1], semantic_cache=2)
