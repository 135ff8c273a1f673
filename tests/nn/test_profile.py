import math

import pytest
import torch

from crane_pyg.nn import BACKEND_ENV_VAR, UserProfileAggregation, available_backends

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def random_bipartite(num_users=12, num_items=9, num_edges=40, seed=0):
    """Random user-item graph; the last two users have no items."""
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(num_users - 2, (num_edges, ), generator=gen),
                              torch.randint(num_items, (num_edges, ), generator=gen)])
    return torch.unique(edge_index, dim=1)


def dense_interactions(edge_index, num_users, num_items):
    return torch.zeros(num_users, num_items).index_put(
        (edge_index[0], edge_index[1]), torch.ones(edge_index.size(1)), accumulate=True)


def agg(layer, x_item, edge_index, num_users, edge_weight=None):
    """The profiles of num_users users from the user -> item edges (the layer
    reads them item -> user, PyG's source-to-target order)."""
    return layer((x_item, None), edge_index.flip(0), edge_weight,
                 size=(x_item.size(0), num_users))


@pytest.mark.parametrize('backend', BACKENDS)
def test_profile_hand_values(backend):
    # user 0 has items {0, 1}, user 1 has item {1}, user 2 has none
    edge_index = torch.tensor([[0, 0, 1], [0, 1, 1]])
    x_item = torch.tensor([[2.0, 0.0], [4.0, 8.0]])
    mean = agg(UserProfileAggregation('mean', backend=backend), x_item, edge_index, 3)
    torch.testing.assert_close(mean, torch.tensor([[3.0, 4.0], [4.0, 8.0], [0.0, 0.0]]))
    sym = agg(UserProfileAggregation('sym', backend=backend), x_item, edge_index, 3)
    # |N(u0)| = 2, |N(u1)| = 1, |N(i0)| = 1, |N(i1)| = 2
    expected = torch.tensor([[2 / math.sqrt(2) + 4 / 2, 8 / 2],
                             [4 / math.sqrt(2), 8 / math.sqrt(2)], [0.0, 0.0]])
    torch.testing.assert_close(sym, expected)
    total = agg(UserProfileAggregation('sum', backend=backend), x_item, edge_index, 3)
    torch.testing.assert_close(total, torch.tensor([[6.0, 8.0], [4.0, 8.0], [0.0, 0.0]]))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('normalize', ['mean', 'sym'])
def test_profile_matches_dense_reference(backend, normalize):
    num_users, num_items = 12, 9
    edge_index = random_bipartite(num_users, num_items)
    x_item = torch.randn(num_items, 3, 5)  # [I, M, d]: all modalities at once
    out = agg(UserProfileAggregation(normalize, backend=backend), x_item, edge_index, num_users)
    r = dense_interactions(edge_index, num_users, num_items)
    deg_u, deg_i = r.sum(1), r.sum(0)
    if normalize == 'mean':
        a = r / deg_u.clamp(min=1)[:, None]
    else:
        a = r / (deg_u[:, None] * deg_i[None, :]).clamp(min=1).sqrt()
    expected = (a @ x_item.reshape(num_items, 15)).reshape(num_users, 3, 5)
    assert out.shape == (num_users, 3, 5)
    torch.testing.assert_close(out, expected)
    assert out[-2:].abs().sum() == 0  # users without items: zero profile


@pytest.mark.parametrize('backend', BACKENDS)
def test_weighted_mean(backend):
    edge_index = torch.tensor([[0, 0], [0, 1]])
    x_item = torch.tensor([[1.0], [4.0]])
    out = agg(UserProfileAggregation('mean', backend=backend), x_item, edge_index, 1,
              torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[(3 * 1.0 + 4.0) / 4]]))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('normalize', ['mean', 'sym'])
@pytest.mark.parametrize('weight_grad', [False, True])
def test_profile_backend_equivalence_with_gradients(backend, normalize, weight_grad):
    num_users, num_items = 25, 18
    edge_index = random_bipartite(num_users, num_items, 120, seed=4)
    x_item = torch.randn(num_items, 2, 8)
    weight = torch.rand(edge_index.size(1)) + 0.5
    grad_out = torch.randn(num_users, 2, 8)

    def run(name):
        x, w = x_item.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
        out = agg(UserProfileAggregation(normalize, backend=name), x, edge_index, num_users, w)
        (out * grad_out).sum().backward()
        return out, x.grad, *([w.grad] if weight_grad else [])

    for got, ref in zip(run(backend), run('scatter')):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_profile_cache(backend):
    num_users, num_items = 12, 9
    edge_index = random_bipartite(num_users, num_items)
    x_item = torch.randn(num_items, 4)
    layer = UserProfileAggregation(cached=True, backend=backend)
    ref = agg(UserProfileAggregation(backend=backend), x_item, edge_index, num_users)
    torch.testing.assert_close(agg(layer, x_item, edge_index, num_users), ref)
    other = edge_index.flip(1)
    other[1] = (other[1] + 1) % num_items
    torch.testing.assert_close(agg(layer, x_item, other, num_users), ref)  # cached
    layer.reset_cache()
    torch.testing.assert_close(
        agg(layer, x_item, other, num_users),
        agg(UserProfileAggregation(backend=backend), x_item, other, num_users))
    with pytest.raises(ValueError, match='reset_cache'):
        agg(layer, x_item, edge_index, num_users + 1)


def test_profile_errors_and_repr():
    with pytest.raises(ValueError, match="normalize must be one of"):
        UserProfileAggregation('max')
    layer = UserProfileAggregation(backend='scatter')
    assert repr(layer) == \
        "UserProfileAggregation(normalize='mean', cached=False, backend='scatter')"
    edge_index = torch.tensor([[0, 3], [0, 1]])
    with pytest.raises(ValueError, match=r"row 1 has index 3, out of range for 2 users"):
        agg(layer, torch.randn(2, 4), edge_index, 2)
    with pytest.raises(ValueError, match=r"row 0 has index 1, out of range for 1 items"):
        agg(layer, torch.randn(1, 4), edge_index, 4)
    # PyG's bipartite form: (x_item, x_user), x_user only gives the number of users
    x_item, x_user = torch.randn(2, 4), torch.randn(4, 3)
    torch.testing.assert_close(layer((x_item, x_user), edge_index.flip(0)),
                               agg(layer, x_item, edge_index, 4))
