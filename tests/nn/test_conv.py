import pytest
import torch

from crane_pyg.nn import (
    BACKEND_ENV_VAR,
    Adjacency,
    ItemItemConv,
    LayerCombination,
    UserItemConv,
    available_backends,
)
from crane_pyg.nn.backend import FUSED_BACKENDS

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def random_bipartite(num_users=12, num_items=9, num_edges=40, seed=0):
    """Random user-item graph; the last user and the last item stay isolated."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(num_users - 1, (num_edges, ), generator=gen)
    items = torch.randint(num_items - 1, (num_edges, ), generator=gen)
    edge_index = torch.stack([users, items])
    edge_index = torch.unique(edge_index, dim=1)  # interaction graphs are simple
    edge_weight = torch.rand(edge_index.size(1), generator=gen) + 0.5
    return edge_index, edge_weight


def dense_lightgcn(edge_index, num_users, num_items, edge_weight=None, normalize=True):
    """Dense (U+I) x (U+I) bipartite adjacency, D^-1/2 A D^-1/2 if normalize."""
    n = num_users + num_items
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.size(1))
    a = torch.zeros(n, n, dtype=edge_weight.dtype)
    a = a.index_put((edge_index[0], edge_index[1] + num_users), edge_weight, accumulate=True)
    a = a + a.t()
    if normalize:
        deg = a.sum(1)
        inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
        a = inv[:, None] * a * inv[None, :]
    return a


def both(conv, x_user, x_item, edge_index, edge_weight=None):
    """Both directions of one LightGCN step: (users <- items, items <- users)."""
    rev = None if edge_weight is None else edge_weight
    return (conv((x_item, x_user), edge_index.flip(0), rev),
            conv((x_user, x_item), edge_index, edge_weight))


# ---------------------------------------------------------------------------
# UserItemConv
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('weighted', [False, True])
def test_user_item_conv_matches_dense_lightgcn(backend, weighted):
    num_users, num_items = 12, 9
    edge_index, edge_weight = random_bipartite(num_users, num_items)
    edge_weight = edge_weight if weighted else None
    x_user, x_item = torch.randn(num_users, 8), torch.randn(num_items, 8)
    out_user, out_item = both(UserItemConv(backend=backend), x_user, x_item, edge_index,
                              edge_weight)
    a_hat = dense_lightgcn(edge_index, num_users, num_items, edge_weight)
    expected = a_hat @ torch.cat([x_user, x_item])
    torch.testing.assert_close(out_user, expected[:num_users])
    torch.testing.assert_close(out_item, expected[num_users:])
    # isolated user / item get zeros
    assert out_user[-1].abs().sum() == 0 and out_item[-1].abs().sum() == 0


@pytest.mark.parametrize('backend', BACKENDS)
def test_user_item_conv_unnormalised_uses_weights_as_is(backend):
    edge_index = torch.tensor([[0, 0, 1], [0, 1, 1]])
    edge_weight = torch.tensor([2.0, 3.0, 5.0])
    x_user = torch.tensor([[1.0], [10.0]])
    x_item = torch.tensor([[1.0], [100.0]])
    conv = UserItemConv(normalize=False, backend=backend)
    out_user, out_item = both(conv, x_user, x_item, edge_index, edge_weight)
    torch.testing.assert_close(out_user, torch.tensor([[2.0 + 300.0], [500.0]]))
    torch.testing.assert_close(out_item, torch.tensor([[2.0], [3.0 + 50.0]]))
    out_user, out_item = both(conv, x_user, x_item, edge_index)  # weights default to 1
    torch.testing.assert_close(out_user, torch.tensor([[101.0], [100.0]]))
    torch.testing.assert_close(out_item, torch.tensor([[1.0], [11.0]]))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('weight_grad', [False, True])
def test_user_item_conv_backend_equivalence_with_gradients(backend, weight_grad):
    num_users, num_items = 30, 20
    edge_index, edge_weight = random_bipartite(num_users, num_items, 150, seed=3)
    x_user, x_item = torch.randn(num_users, 16), torch.randn(num_items, 16)
    grad_user, grad_item = torch.randn(num_users, 16), torch.randn(num_items, 16)

    def run(name):
        xu, xi = x_user.clone().requires_grad_(), x_item.clone().requires_grad_()
        w = edge_weight.clone().requires_grad_(weight_grad)
        out_user, out_item = both(UserItemConv(backend=name), xu, xi, edge_index, w)
        ((out_user * grad_user).sum() + (out_item * grad_item).sum()).backward()
        return out_user, out_item, xu.grad, xi.grad, *([w.grad] if weight_grad else [])

    for got, ref in zip(run(backend), run('scatter')):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_fused_path_is_used_by_sparse_backends(backend):
    edge_index, _ = random_bipartite()
    conv = UserItemConv(backend=backend)
    calls = {'fused': 0, 'message': 0}
    conv.register_message_and_aggregate_forward_hook(
        lambda *args: calls.__setitem__('fused', calls['fused'] + 1))
    conv.register_message_forward_hook(
        lambda *args: calls.__setitem__('message', calls['message'] + 1))
    both(conv, torch.randn(12, 4), torch.randn(9, 4), edge_index)
    if backend in FUSED_BACKENDS:
        assert calls == {'fused': 2, 'message': 0}
    else:
        assert calls == {'fused': 0, 'message': 2}


@pytest.mark.parametrize('backend', BACKENDS)
def test_user_item_conv_cache(backend):
    num_users, num_items = 12, 9
    edge_index, _ = random_bipartite(num_users, num_items)
    x_user, x_item = torch.randn(num_users, 4), torch.randn(num_items, 4)
    plain = UserItemConv(backend=backend)
    cached = UserItemConv(cached=True, backend=backend)
    x = (x_user, x_item)
    first = cached(x, edge_index)
    torch.testing.assert_close(first, plain(x, edge_index))
    adj = cached._cached_adj
    assert adj is not None and adj._transpose is not None  # both directions built once

    # a different graph of the same shape: the cache is reused until reset
    other = edge_index.clone()
    other[1] = (other[1] + 1) % (num_items - 1)
    torch.testing.assert_close(cached(x, other), first)
    assert cached._cached_adj is adj
    cached.reset_cache()
    torch.testing.assert_close(cached(x, other), plain(x, other))
    assert cached._cached_adj is not adj

    # a graph of a different shape without reset_cache() is an error
    with pytest.raises(ValueError, match='reset_cache'):
        cached(x, edge_index[:, :-3])
    with pytest.raises(ValueError, match='reset_cache'):
        cached((x_item, x_user), edge_index.flip(0))  # the other direction
    # reset_parameters drops the cache, too
    cached.reset_parameters()
    assert cached._cached_adj is None
    with pytest.raises(ValueError, match='requires grad'):
        cached(x, edge_index, torch.rand(edge_index.size(1), requires_grad=True))


def test_user_item_conv_accepts_adjacency_and_checks_shapes():
    num_users, num_items = 12, 9
    edge_index, _ = random_bipartite(num_users, num_items)
    conv = UserItemConv(backend='scatter')
    x_user, x_item = torch.randn(num_users, 4), torch.randn(num_items, 4)
    adj = conv.adjacency(edge_index, num_users, num_items)  # [I, U]: items receive
    torch.testing.assert_close(conv((x_user, x_item), adj), conv((x_user, x_item), edge_index))
    torch.testing.assert_close(conv((x_item, x_user), adj.t()),
                               conv((x_item, x_user), edge_index.flip(0)))
    with pytest.raises(ValueError, match=r'adjacency is \(9, 12\)'):
        conv((x_user[:5], x_item), adj)
    with pytest.raises(ValueError, match='out of range'):
        conv((x_user[:5], x_item), edge_index)
    with pytest.raises(ValueError, match='floating point'):
        conv((x_user.long(), x_item), edge_index)
    with pytest.raises(ValueError, match='size='):
        conv((x_user, None), edge_index)
    torch.testing.assert_close(conv((x_user, None), edge_index, size=(num_users, num_items)),
                               conv((x_user, x_item), edge_index))


def test_repr_and_backend_resolution(monkeypatch):
    assert repr(UserItemConv(backend='scatter')) == \
        "UserItemConv(normalize=True, cached=False, backend='scatter')"
    assert repr(ItemItemConv(cached=True, backend='scatter')) == \
        "ItemItemConv(normalize=False, cached=True, backend='scatter')"
    assert UserItemConv().backend == BACKENDS[0]
    monkeypatch.setenv(BACKEND_ENV_VAR, 'scatter')
    assert UserItemConv().backend == 'scatter'
    with pytest.raises(ValueError, match='Unknown sparse backend'):
        ItemItemConv(backend='nope')


# ---------------------------------------------------------------------------
# ItemItemConv
# ---------------------------------------------------------------------------

def random_knn(num_nodes=15, k=3, seed=0):
    """A directed kNN graph, source -> target: node i (but the last) receives k edges."""
    gen = torch.Generator().manual_seed(seed)
    dst = torch.arange(num_nodes - 1).repeat_interleave(k)  # last node has no neighbours
    src = torch.randint(num_nodes, (dst.numel(), ), generator=gen)
    return torch.stack([src, dst]), torch.rand(dst.numel(), generator=gen) + 0.1


def dense(edge_index, edge_weight, n):
    """A[target, source] (rows receive), as PyG's to_dense_adj(...)[0].t()."""
    return torch.zeros(n, n).index_put((edge_index[1], edge_index[0]), edge_weight,
                                       accumulate=True)


@pytest.mark.parametrize('backend', BACKENDS)
def test_item_item_conv_direction_and_values(backend):
    # 1 -> 0 (w=2), 2 -> 0 (w=3), 0 -> 2 (w=5): edge_index[1] receives
    edge_index = torch.tensor([[1, 2, 0], [0, 0, 2]])
    edge_weight = torch.tensor([2.0, 3.0, 5.0])
    x = torch.tensor([[1.0], [10.0], [100.0]])
    out = ItemItemConv(backend=backend)(x, edge_index, edge_weight)
    torch.testing.assert_close(out, torch.tensor([[320.0], [0.0], [5.0]]))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('normalize', [False, True])
def test_item_item_conv_matches_dense(backend, normalize):
    edge_index, edge_weight = random_knn()
    x = torch.randn(15, 2, 4)  # any trailing shape
    conv = ItemItemConv(normalize=normalize, backend=backend)
    out = conv(x, edge_index, edge_weight)
    s = dense(edge_index, edge_weight, 15)
    if normalize:  # D^-1/2 A D^-1/2 with in-degrees, PyG's gcn_norm without self-loops
        deg = s.sum(1)
        inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
        s = inv[:, None] * s * inv[None, :]
    torch.testing.assert_close(out, (s @ x.reshape(15, 8)).reshape(15, 2, 4))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('weight_grad', [False, True])
def test_item_item_conv_backend_equivalence_with_gradients(backend, weight_grad):
    edge_index, edge_weight = random_knn(40, 5, seed=2)
    x = torch.randn(40, 16)
    grad_out = torch.randn(40, 16)

    def run(name):
        xx = x.clone().requires_grad_()
        w = edge_weight.clone().requires_grad_(weight_grad)
        out = ItemItemConv(normalize=True, backend=name)(xx, edge_index, w)
        (out * grad_out).sum().backward()
        return out, xx.grad, *([w.grad] if weight_grad else [])

    for got, ref in zip(run(backend), run('scatter')):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_item_item_conv_cache(backend):
    edge_index, edge_weight = random_knn()
    x = torch.randn(15, 4)
    cached = ItemItemConv(cached=True, backend=backend)
    ref = ItemItemConv(backend=backend)(x, edge_index, edge_weight)
    torch.testing.assert_close(cached(x, edge_index, edge_weight), ref)
    new_weight = edge_weight * 2
    torch.testing.assert_close(cached(x, edge_index, new_weight), ref)  # stale until reset
    cached.reset_cache()
    torch.testing.assert_close(cached(x, edge_index, new_weight), 2 * ref)


# ---------------------------------------------------------------------------
# LayerCombination
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_layer_combination_user_item(backend):
    num_users, num_items = 12, 9
    edge_index, _ = random_bipartite(num_users, num_items)
    x_user, x_item = torch.randn(num_users, 4), torch.randn(num_items, 4)
    a_hat = dense_lightgcn(edge_index, num_users, num_items)
    e0 = torch.cat([x_user, x_item])
    e1 = a_hat @ e0
    e2 = a_hat @ e1

    enc = LayerCombination(UserItemConv(backend=backend), num_layers=2)
    out_user, out_item = enc((x_user, x_item), edge_index)
    expected = (e0 + e1 + e2) / 3
    torch.testing.assert_close(out_user, expected[:num_users])
    torch.testing.assert_close(out_item, expected[num_users:])

    enc = LayerCombination(UserItemConv(backend=backend), num_layers=2, alpha=[0.0, 0.0, 1.0])
    out_user, _ = enc((x_user, x_item), edge_index)
    torch.testing.assert_close(out_user, e2[:num_users])

    enc = LayerCombination(UserItemConv(backend=backend), num_layers=0)
    out_user, out_item = enc((x_user, x_item), edge_index)
    torch.testing.assert_close(out_user, x_user)
    torch.testing.assert_close(out_item, x_item)


@pytest.mark.parametrize('backend', BACKENDS)
def test_layer_combination_item_item(backend):
    edge_index, edge_weight = random_knn()
    x = torch.randn(15, 4)
    s = dense(edge_index, edge_weight, 15)
    enc = LayerCombination(ItemItemConv(backend=backend), num_layers=1, alpha=0.5)
    torch.testing.assert_close(enc(x, edge_index, edge_weight), 0.5 * x + 0.5 * (s @ x))
    adj = Adjacency.from_edge_index(edge_index.flip(0), edge_weight, size=15, backend=backend)
    torch.testing.assert_close(enc(x, adj), 0.5 * x + 0.5 * (s @ x))


def test_layer_combination_errors():
    with pytest.raises(ValueError, match='num_layers'):
        LayerCombination(ItemItemConv(), -1)
    with pytest.raises(ValueError, match='alpha'):
        LayerCombination(ItemItemConv(), 2, alpha=[0.5, 0.5])
    with pytest.raises(TypeError, match='x_user, x_item'):
        LayerCombination(UserItemConv(), 1)(torch.randn(3, 2), torch.tensor([[0], [0]]))
    with pytest.raises(TypeError):
        LayerCombination(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize('backend', BACKENDS)
def test_double_precision_features(backend):
    num_users, num_items = 12, 9
    edge_index, _ = random_bipartite(num_users, num_items)
    x_user = torch.randn(num_users, 4, dtype=torch.double)
    x_item = torch.randn(num_items, 4, dtype=torch.double)
    out_user, out_item = both(UserItemConv(backend=backend), x_user, x_item, edge_index)
    assert out_user.dtype == out_item.dtype == torch.double
    a_hat = dense_lightgcn(edge_index, num_users, num_items).double()
    expected = a_hat @ torch.cat([x_user, x_item])
    torch.testing.assert_close(out_user, expected[:num_users])
    torch.testing.assert_close(out_item, expected[num_users:])


@pytest.mark.parametrize('backend', BACKENDS)
def test_cached_layer_survives_deepcopy(backend):
    import copy
    edge_index, _ = random_bipartite()
    x_user, x_item = torch.randn(12, 4), torch.randn(9, 4)
    conv = UserItemConv(cached=True, backend=backend)
    first = conv((x_user, x_item), edge_index)
    clone = copy.deepcopy(conv)
    assert clone._cached_adj is not conv._cached_adj
    assert clone._cached_adj.backend == backend
    torch.testing.assert_close(clone((x_user, x_item), edge_index), first)


# ---------------------------------------------------------------------------
# no files left in $TMPDIR
# ---------------------------------------------------------------------------
def test_layers_do_not_render_pyg_templates():
    """PyG writes a rendered ``propagate`` module into $TMPDIR for every
    MessagePassing class that does not define its own; ours do."""
    import sys
    from crane_pyg.nn import UserProfileAggregation
    for cls in (UserItemConv, ItemItemConv, UserProfileAggregation):
        cls()
        assert 'propagate' in cls.__dict__
        assert f'{cls.__module__}_{cls.__name__}_propagate' not in sys.modules


def test_a_process_leaves_no_files_in_tmpdir(tmp_path):
    """Our layers render nothing, and PyG's own (LGConv, used in mini-batch
    mode) have their rendered module removed at exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    code = ('import os, tempfile; from crane_pyg.nn import UserItemConv, ItemItemConv, '
            'UserProfileAggregation; from torch_geometric.nn import LGConv; '
            '[c() for c in (UserItemConv, ItemItemConv, UserProfileAggregation, LGConv)]; '
            'print(sorted(f for f in os.listdir(tempfile.gettempdir()) if f.endswith(".py")))')
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, 'TMPDIR': str(tmp), 'PYTHONPATH': repo},
                          timeout=300, check=True)
    during = eval(proc.stdout.strip().splitlines()[-1])
    assert [f for f in during if 'crane_pyg' in f] == []
    assert [f for f in during if 'LGConv_propagate' in f]  # the test does see PyG's file
    assert [p.name for p in tmp.iterdir() if not p.name.startswith('torchinductor_')] == []


# ---------------------------------------------------------------------------
# PyG's conventions: direction, adjacency types, agreement with PyG's layers
# ---------------------------------------------------------------------------

def _dense_knn(x, k, binary=False):
    """FREEDOM's dense item graph of one modality: row i holds i's top-k cosine
    neighbours (itself included), D^-1/2 A D^-1/2 with row sums."""
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.t()
    top = sim.topk(k, dim=-1).indices
    a = torch.zeros_like(sim).scatter(1, top, 1.0 if binary else sim.gather(1, top).clamp(min=0))
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    return inv[:, None] * a * inv[None, :]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('binary', [True, False])
def test_item_knn_graph_output_goes_straight_into_item_item_conv(backend, binary):
    """ItemKNNGraph writes the graph source -> target and ItemItemConv reads it
    so: the layer computes FREEDOM's dense A_hat @ x, like PyG's SimpleConv."""
    from torch_geometric.data import HeteroData
    from torch_geometric.nn import SimpleConv

    from crane_pyg.transforms import ItemKNNGraph
    gen = torch.Generator().manual_seed(0)
    data = HeteroData()
    data['item'].num_nodes = 30
    data['item'].image = torch.randn(30, 12, generator=gen)
    data['item'].text = torch.randn(30, 7, generator=gen)
    data.modalities = ['image', 'text']
    data = ItemKNNGraph(k=4, binary=binary)(data)
    store = data['item', 'similar', 'item']
    a_hat = (0.1 * _dense_knn(data['item'].image, 4, binary)
             + 0.9 * _dense_knn(data['item'].text, 4, binary))
    assert (a_hat != a_hat.t()).any()  # a directed graph: the direction matters
    x = torch.randn(30, 5, generator=gen)
    out = ItemItemConv(backend=backend)(x, store.edge_index, store.edge_weight)
    torch.testing.assert_close(out, a_hat @ x, atol=1e-6, rtol=0)
    pyg = SimpleConv(aggr='sum')(x, store.edge_index, store.edge_weight)
    torch.testing.assert_close(out, pyg, atol=1e-6, rtol=0)


def _adjacency_inputs(edge_index, edge_weight, num_src, num_dst):
    """The same graph as each of PyG's adjacency types (sparse: adj_t, rows receive)."""
    from torch_geometric import EdgeIndex
    from torch_geometric.typing import WITH_TORCH_SPARSE
    inputs = {
        'edge_index': (edge_index, edge_weight),
        'EdgeIndex': (EdgeIndex(edge_index.contiguous(), sparse_size=(num_src, num_dst)),
                      edge_weight),
        'torch.sparse_coo': (torch.sparse_coo_tensor(edge_index.flip(0), edge_weight,
                                                     (num_dst, num_src)), None),
        'torch.sparse_csr': (torch.sparse_coo_tensor(edge_index.flip(0), edge_weight,
                                                     (num_dst, num_src)).to_sparse_csr(), None),
    }
    if WITH_TORCH_SPARSE:
        from torch_sparse import SparseTensor
        inputs['SparseTensor'] = (SparseTensor(row=edge_index[1], col=edge_index[0],
                                               value=edge_weight,
                                               sparse_sizes=(num_dst, num_src)), None)
    return inputs


@pytest.mark.parametrize('backend', BACKENDS)
def test_layers_accept_pyg_adjacency_types(backend):
    from crane_pyg.nn import UserProfileAggregation
    num_users, num_items = 12, 9
    ui, w = random_bipartite(num_users, num_items)
    x_user, x_item = torch.randn(num_users, 4), torch.randn(num_items, 4)
    knn, knn_w = random_knn()
    x = torch.randn(15, 4)
    cases = [
        (UserItemConv(backend=backend), (x_user, x_item), ui, w, num_users, num_items),
        (UserItemConv(backend=backend), (x_item, x_user), ui.flip(0), w, num_items, num_users),
        (UserProfileAggregation('sym', backend=backend), (x_item, x_user), ui.flip(0), w,
         num_items, num_users),
        (ItemItemConv(normalize=True, backend=backend), x, knn, knn_w, 15, 15),
    ]
    for conv, xs, edge_index, edge_weight, num_src, num_dst in cases:
        ref = conv(xs, edge_index, edge_weight)
        for name, (graph, weight) in _adjacency_inputs(edge_index, edge_weight, num_src,
                                                       num_dst).items():
            torch.testing.assert_close(conv(xs, graph, weight), ref, msg=f'{conv} {name}')


@pytest.mark.parametrize('backend', BACKENDS)
def test_user_item_conv_is_lgconv_on_the_homogeneous_graph(backend):
    from torch_geometric.nn import LGConv
    num_users, num_items = 12, 9
    ui, _ = random_bipartite(num_users, num_items)
    homo = torch.cat([torch.stack([ui[0], ui[1] + num_users]),
                      torch.stack([ui[1] + num_users, ui[0]])], dim=1)
    x = torch.randn(num_users + num_items, 4)
    expected = LGConv()(x, homo)
    torch.testing.assert_close(UserItemConv(backend=backend)(x, homo), expected)
    out_user, out_item = both(UserItemConv(backend=backend), x[:num_users], x[num_users:], ui)
    torch.testing.assert_close(torch.cat([out_user, out_item]), expected)
