import math

import pytest
import torch

from torch_geometric.nn.conv.gcn_conv import gcn_norm

from crane_pyg.nn import (
    BACKEND_ENV_VAR,
    BACKEND_PREFERENCE,
    Adjacency,
    available_backends,
    gcn_norm_bipartite,
    resolve_backend,
    sym_norm,
)
from crane_pyg.nn import backend as backend_module

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def random_matrix(num_rows, num_cols, num_edges, seed=0):
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(num_rows, (num_edges, ), generator=gen),
                              torch.randint(num_cols, (num_edges, ), generator=gen)])
    edge_weight = torch.rand(num_edges, generator=gen) + 0.1
    return edge_index, edge_weight


def dense(edge_index, edge_weight, size):
    out = torch.zeros(size, dtype=edge_weight.dtype)
    return out.index_put((edge_index[0], edge_index[1]), edge_weight, accumulate=True)


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------

def test_preference_order_and_availability():
    assert BACKEND_PREFERENCE == ('torch_csr', 'edge_index', 'scatter')
    assert BACKENDS[-1] == 'scatter' and 'torch_csr' in BACKENDS
    # available backends keep the preference order
    assert BACKENDS == [name for name in BACKEND_PREFERENCE if name in BACKENDS]


def test_resolve_auto_and_env(monkeypatch):
    assert resolve_backend('auto') == BACKENDS[0]
    assert resolve_backend(None) == BACKENDS[0]
    assert resolve_backend('scatter') == 'scatter'
    monkeypatch.setenv(BACKEND_ENV_VAR, 'scatter')
    assert resolve_backend('auto') == 'scatter'
    assert resolve_backend('torch_csr') == 'torch_csr'  # explicit names win
    monkeypatch.setenv(BACKEND_ENV_VAR, 'cusparse')
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend('auto')


def test_resolve_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown sparse backend 'dense'.*available"):
        resolve_backend('dense')
    with pytest.raises(ValueError, match=r"Unknown sparse backend 'torch_sparse'"):
        resolve_backend('torch_sparse')  # removed: a SparseTensor graph is still accepted
    monkeypatch.setitem(backend_module._AVAILABILITY, 'edge_index', lambda: False)
    with pytest.raises(ValueError, match=r"not available: it needs torch-geometric.*'scatter'"):
        resolve_backend('edge_index')
    assert 'edge_index' not in available_backends()


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------

def test_gcn_norm_bipartite_hand_values():
    # u0-i0, u0-i1, u1-i1; user 2 and item 2 isolated
    edge_index = torch.tensor([[0, 0, 1], [0, 1, 1]])
    w = gcn_norm_bipartite(edge_index, num_users=3, num_items=3)
    expected = torch.tensor([1 / math.sqrt(2 * 1), 1 / math.sqrt(2 * 2), 1 / math.sqrt(1 * 2)])
    torch.testing.assert_close(w, expected)

    weight = torch.tensor([1.0, 3.0, 2.0])  # d_u0 = 4, d_u1 = 2, d_i0 = 1, d_i1 = 5
    w = gcn_norm_bipartite(edge_index, 3, 3, weight)
    expected = torch.tensor([1 / math.sqrt(4 * 1), 3 / math.sqrt(4 * 5), 2 / math.sqrt(2 * 5)])
    torch.testing.assert_close(w, expected)


def test_gcn_norm_bipartite_matches_dense_symmetric_normalisation():
    num_users, num_items = 7, 5
    edge_index, edge_weight = random_matrix(num_users, num_items, 15)
    w = gcn_norm_bipartite(edge_index, num_users, num_items, edge_weight)
    n = num_users + num_items
    a = torch.zeros(n, n)
    a.index_put_((edge_index[0], edge_index[1] + num_users), edge_weight, accumulate=True)
    a = a + a.t()
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    a_hat = inv[:, None] * a * inv[None, :]
    torch.testing.assert_close(dense(edge_index, w, (num_users, num_items)),
                               a_hat[:num_users, num_users:])


def test_sym_norm_hand_values_and_pyg_agreement():
    # directed 3-node graph: rows 0 -> {1, 2}, 1 -> {0}; node 2 has zero row sum
    edge_index = torch.tensor([[0, 0, 1], [1, 2, 0]])
    weight = torch.tensor([1.0, 3.0, 2.0])
    w = sym_norm(edge_index, weight, num_nodes=3)
    # row sums d0 = 4, d1 = 2, d2 = 0 -> the edge into node 2 gets 0, not inf
    expected = torch.tensor([1 / math.sqrt(4 * 2), 0.0, 2 / math.sqrt(2 * 4)])
    torch.testing.assert_close(w, expected)
    _, ref = gcn_norm(edge_index, weight, 3, add_self_loops=False, flow='target_to_source')
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(sym_norm(edge_index, None, 3),
                               gcn_norm(edge_index, None, 3, add_self_loops=False,
                                        flow='target_to_source')[1])


def test_normalisation_is_zero_degree_safe():
    edge_index = torch.tensor([[0, 1], [0, 1]])
    w = gcn_norm_bipartite(edge_index, 4, 4, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(w).all()
    assert w.tolist() == [0.0, 1.0]
    w = sym_norm(edge_index, torch.tensor([0.0, 2.0]), 5)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0]))
    empty = torch.empty(2, 0, dtype=torch.long)
    assert gcn_norm_bipartite(empty, 3, 3).numel() == 0


def test_normalisation_bad_input():
    with pytest.raises(ValueError, match=r"'edge_index' must have shape \[2, E\]"):
        sym_norm(torch.zeros(3, 4, dtype=torch.long), None, 3)
    with pytest.raises(ValueError, match=r"'edge_weight' must have shape \[2\]"):
        gcn_norm_bipartite(torch.tensor([[0, 1], [0, 1]]), 2, 2, torch.ones(3))
    with pytest.raises(ValueError, match='integer'):
        sym_norm(torch.zeros(2, 4), None, 3)


# ---------------------------------------------------------------------------
# Adjacency
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_adjacency_matmul_matches_dense(backend):
    edge_index, edge_weight = random_matrix(6, 9, 30)  # contains duplicates
    adj = Adjacency.from_edge_index(edge_index, edge_weight, size=(6, 9), backend=backend)
    a = dense(edge_index, edge_weight, (6, 9))
    assert adj.backend == backend and adj.size == (6, 9)
    torch.testing.assert_close(adj.to_dense(), a)
    x = torch.randn(9, 4)
    torch.testing.assert_close(adj.matmul(x), a @ x)
    torch.testing.assert_close(adj @ x, a @ x)
    y = torch.randn(6, 3)
    torch.testing.assert_close(adj.t().matmul(y), a.t() @ y)
    assert adj.t() is adj.t() and adj.t().t() is adj and adj.transpose() is adj.t()
    # any trailing shape
    x3 = torch.randn(9, 2, 5)
    torch.testing.assert_close(adj.matmul(x3), (a @ x3.reshape(9, 10)).reshape(6, 2, 5))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('weight_grad', [False, True])
@pytest.mark.parametrize('transpose', [False, True])
def test_adjacency_gradients_match_dense(backend, weight_grad, transpose):
    # non-square on purpose: (5 x 7) and its transpose
    edge_index, edge_weight = random_matrix(5, 7, 20, seed=1)
    weight = edge_weight.clone().requires_grad_(weight_grad)
    adj = Adjacency.from_edge_index(edge_index, weight, size=(5, 7), backend=backend)
    adj = adj.t() if transpose else adj
    num_rows, num_cols = adj.size
    x = torch.randn(num_cols, 3, requires_grad=True)
    grad_out = torch.randn(num_rows, 3)
    (adj.matmul(x) * grad_out).sum().backward()

    weight_ref = edge_weight.clone().requires_grad_(weight_grad)
    x_ref = x.detach().clone().requires_grad_()
    a = dense(edge_index, weight_ref, (5, 7))
    a = a.t() if transpose else a
    (a @ x_ref * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    if weight_grad:
        torch.testing.assert_close(weight.grad, weight_ref.grad)


@pytest.mark.parametrize('backend', BACKENDS)
def test_adjacency_empty_and_isolated(backend):
    adj = Adjacency.from_edge_index(torch.empty(2, 0, dtype=torch.long), size=(3, 4),
                                    backend=backend)
    assert adj.nnz == 0
    torch.testing.assert_close(adj.matmul(torch.randn(4, 2)), torch.zeros(3, 2))
    torch.testing.assert_close(adj.t().matmul(torch.randn(3, 2)), torch.zeros(4, 2))


def test_adjacency_size_inference_devices_and_repr():
    edge_index = torch.tensor([[0, 2], [1, 3]])
    adj = Adjacency.from_edge_index(edge_index, backend='scatter')
    assert adj.size == (3, 4) and adj.nnz == 2
    assert Adjacency.from_edge_index(edge_index, size=5).size == (5, 5)
    assert adj.to('cpu') is adj
    assert adj.with_backend('scatter') is adj
    csr = adj.with_backend('torch_csr')
    assert csr.backend == 'torch_csr'
    torch.testing.assert_close(csr.to_dense(), adj.to_dense())
    assert repr(adj) == "Adjacency(size=(3, 4), nnz=2, backend='scatter', device=cpu)"
    torch.testing.assert_close(adj.edge_index, edge_index)
    torch.testing.assert_close(adj.edge_weight, torch.ones(2))


def test_adjacency_bad_input():
    edge_index = torch.tensor([[0, 2], [1, 3]])
    with pytest.raises(ValueError, match=r"row 1 has index 3, out of range for 3 columns"):
        Adjacency.from_edge_index(edge_index, size=(3, 3))
    with pytest.raises(ValueError, match=r"row 0 has index 2, out of range for 2 rows"):
        Adjacency.from_edge_index(edge_index, size=(2, 4))
    with pytest.raises(ValueError, match='negative'):
        Adjacency.from_edge_index(torch.tensor([[0, -1], [0, 0]]), size=(2, 2))
    with pytest.raises(ValueError, match=r"'edge_weight' must have shape \[2\]"):
        Adjacency.from_edge_index(edge_index, torch.ones(2, 1), size=(3, 4))
    adj = Adjacency.from_edge_index(edge_index, size=(3, 4))
    with pytest.raises(ValueError, match=r"expected x with 4 rows"):
        adj.matmul(torch.randn(3, 2))
