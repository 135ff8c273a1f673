import pytest
import torch

from crane_pyg.data import ITEM, USER_ITEM, BPRSampler

# 4 users, 7 items; user 3 has trained on every item but one.
EDGES = torch.tensor([
    [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 3],
    [1, 4, 6, 0, 2, 3, 0, 1, 2, 3, 5, 6],
])
NUM_USERS, NUM_ITEMS = 4, 7


def trained_sets(edge_index):
    sets = {}
    for u, i in edge_index.t().tolist():
        sets.setdefault(u, set()).add(i)
    return sets


def test_free_item_matches_dense_reference():
    sampler = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS)
    trained = trained_sets(EDGES)
    for u in range(NUM_USERS):
        free = [i for i in range(NUM_ITEMS) if i not in trained[u]]
        r = torch.arange(len(free))
        got = sampler.free_item(torch.full_like(r, u), r)
        assert got.tolist() == free


def test_epoch_is_a_permutation_of_training_edges_with_valid_negatives():
    sampler = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=1)
    trained = trained_sets(EDGES)
    edges = sorted(map(tuple, EDGES.t().tolist()))
    for epoch in range(200):  # exhaustive over many epochs of a small graph
        users, pos, neg = sampler.sample(epoch)
        assert users.dtype == pos.dtype == neg.dtype == torch.long
        assert sorted(zip(users.tolist(), pos.tolist())) == edges  # each edge once
        for u, j in zip(users.tolist(), neg.tolist()):
            assert 0 <= j < NUM_ITEMS and j not in trained[u]
    # user 3 has exactly one free item: 4
    users, _, neg = sampler.sample(0)
    assert set(neg[users == 3].tolist()) == {4}


def test_no_negative_is_a_training_item_on_synthetic_graph(synthetic_data):
    sampler = BPRSampler.from_data(synthetic_data, seed=5)
    edge_index = synthetic_data[USER_ITEM].edge_index
    num_items = synthetic_data[ITEM].num_nodes
    train_keys = edge_index[0] * num_items + edge_index[1]
    for epoch in range(3):
        users, pos, neg = sampler.sample(epoch)
        assert bool(torch.isin(users * num_items + pos, train_keys).all())
        assert not bool(torch.isin(users * num_items + neg, train_keys).any())
        assert torch.equal((users * num_items + pos).sort().values, train_keys.sort().values)


def test_negatives_uniform_chi_square():
    # User 0 trained on items {0, 3, 4} of 8 -> 5 free items, equally likely.
    edge_index = torch.tensor([[0, 0, 0, 1], [0, 3, 4, 7]])
    sampler = BPRSampler(edge_index, 2, 8)
    num = 20000
    neg = sampler.sample_negatives(torch.zeros(num, dtype=torch.long),
                                   torch.Generator().manual_seed(0))
    counts = torch.bincount(neg, minlength=8).double()
    assert counts[[0, 3, 4]].sum() == 0
    free = counts[[1, 2, 5, 6, 7]]
    expected = num / 5
    chi2 = ((free - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47  # 99.9 % quantile of chi-square with 4 degrees of freedom


def test_deterministic_per_seed_and_epoch():
    a = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=7)
    b = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=7)  # e.g. a resumed run
    c = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=8)
    for x, y in zip(a.sample(3), b.sample(3)):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a.sample(3), a.sample(4)))
    assert any(not torch.equal(x, y) for x, y in zip(a.sample(3), c.sample(3)))
    torch.manual_seed(123)  # the global RNG plays no part
    for x, y in zip(a.sample(3), b.sample(3)):
        assert torch.equal(x, y)


@pytest.mark.parametrize('world_size', [2, 3, 5])
def test_shards_are_disjoint_and_cover_the_epoch(world_size):
    full = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=2).sample(9)
    shards = [BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, seed=2, rank=r,
                         world_size=world_size).sample(9) for r in range(world_size)]
    # edges are unique, so (user, pos) identifies a triple
    seen = [set(zip(s[0].tolist(), s[1].tolist())) for s in shards]
    for r in range(world_size):
        for q in range(r):
            assert not seen[r] & seen[q]
    union = sorted(t for s in shards for t in zip(*(x.tolist() for x in s)))
    assert union == sorted(zip(*(x.tolist() for x in full)))
    for r, shard in enumerate(shards):
        for x, y in zip(shard, full):
            assert torch.equal(x, y[r::world_size])


@pytest.mark.parametrize('world_size,batch_size', [(1, 5), (1, 12), (1, 100), (5, 2), (3, 3)])
def test_batches(world_size, batch_size):
    samplers = [BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, rank=r, world_size=world_size)
                for r in range(world_size)]
    for sampler in samplers:
        num_batches = sampler.num_batches(batch_size)
        batches = list(sampler.batches(4, batch_size))
        assert len(batches) == num_batches  # the same on every rank
        assert all(0 < b[0].numel() <= batch_size for b in batches)
        for part, whole in zip(zip(*batches), sampler.sample(4)):
            assert torch.equal(torch.cat(part), whole)
    assert samplers[0].num_batches(batch_size) == -(-(-(-12 // world_size)) // batch_size)


def test_len_and_repr():
    sampler = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, rank=1, world_size=5)
    assert sampler.num_edges == 12 and len(sampler) == 3  # edges 1, 6, 11
    assert repr(sampler) == ('BPRSampler(num_users=4, num_items=7, num_edges=12, seed=0, '
                             'rank=1, world_size=5)')


def test_device_argument():
    users, pos, neg = BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, device='cpu').sample(0)
    assert users.device == pos.device == neg.device == torch.device('cpu')


def test_user_with_every_item_is_an_error():
    edge_index = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2]])
    with pytest.raises(ValueError, match='user 1 has trained on all 3 items'):
        BPRSampler(edge_index, 2, 3)


@pytest.mark.parametrize('edge_index,match', [
    (torch.zeros(3, 4, dtype=torch.long), r'shape \[2, E\]'),
    (torch.zeros(2, 4), 'integer ids'),
    (torch.zeros(2, 0, dtype=torch.long), 'no training interactions'),
    (torch.tensor([[0, 4], [0, 1]]), r'user id 4, outside \[0, 3\]'),
    (torch.tensor([[0, 1], [0, -1]]), r'item id -1, outside \[0, 6\]'),
])
def test_bad_edge_index(edge_index, match):
    with pytest.raises(ValueError, match=match):
        BPRSampler(edge_index, NUM_USERS, NUM_ITEMS)


def test_bad_rank_or_batch_size():
    with pytest.raises(ValueError, match='rank'):
        BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, rank=2, world_size=2)
    with pytest.raises(ValueError, match='batch_size'):
        BPRSampler(EDGES, NUM_USERS, NUM_ITEMS).num_batches(0)
    with pytest.raises(ValueError, match='use batch_size >= 2'):
        list(BPRSampler(EDGES, NUM_USERS, NUM_ITEMS, rank=4, world_size=5).batches(0, 1))
