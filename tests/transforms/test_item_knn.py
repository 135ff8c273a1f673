import math

import pytest
import torch
from conftest import require_dataset
from torch_geometric.data import HeteroData
from torch_geometric.nn import SimpleConv
from torch_geometric.utils import coalesce, degree, to_dense_adj

from crane_pyg.data import load_mmrec
from crane_pyg.data.schema import ITEM_ITEM
from crane_pyg.transforms import ItemKNNGraph, knn_adjacency


def dense_reference(features, k, weights, *, include_self=True, binary=True,
                    normalize='sym'):
    r"""The full I x I computation: cosine matrix, dense top-k, dense
    normalisation, dense fusion (float64)."""
    num_items = features[0].size(0)
    total = torch.zeros(num_items, num_items, dtype=torch.float64)
    for x, w in zip(features, weights):
        x = x.double()
        x = x / x.norm(dim=1, keepdim=True)
        sim = x @ x.t()
        sim.fill_diagonal_(1.0 if include_self else float('-inf'))
        value, index = sim.topk(k, dim=1)
        adj = torch.zeros_like(sim)
        adj.scatter_(1, index, 1.0 if binary else value.clamp(min=0))
        deg = adj.sum(dim=1)
        if normalize == 'sym':
            adj = adj / deg.sqrt().view(-1, 1) / deg.sqrt().view(1, -1)
        elif normalize == 'row':
            adj = adj / deg.view(-1, 1)
        total += w * adj
    return total


def to_dense(edge_index, edge_weight, num_items):
    # edge (j, i) carries A_hat[i, j]: transpose back to "row i aggregates"
    return to_dense_adj(edge_index, edge_attr=edge_weight,
                        max_num_nodes=num_items)[0].t().double()


def make_data(num_items=30, dims=None, seed=0) -> HeteroData:
    dims = dims or {'image': 6, 'text': 9}
    g = torch.Generator().manual_seed(seed)
    data = HeteroData()
    data.name = 'toy'
    data.modalities = sorted(dims)
    data['user'].num_nodes = 4
    data['item'].num_nodes = num_items
    for name, d in dims.items():
        data['item'][name] = torch.randn(num_items, d, generator=g)
    data['user', 'interacts', 'item'].edge_index = torch.tensor([[0, 1],
                                                                 [2, 3]])
    return data


@pytest.mark.parametrize('binary', [True, False])
@pytest.mark.parametrize('include_self', [True, False])
@pytest.mark.parametrize('normalize', ['sym', 'row', None])
@pytest.mark.parametrize('chunk_size', [7, 1000])
def test_matches_dense_reference(binary, include_self, normalize, chunk_size):
    data = make_data()
    feats = [data['item'].image, data['item'].text]
    k = 4
    edge_index, edge_weight = knn_adjacency(
        feats, k, [0.3, 0.7], chunk_size=chunk_size,
        include_self=include_self, binary=binary, normalize=normalize)
    expected = dense_reference(feats, k, [0.3, 0.7], binary=binary,
                               include_self=include_self, normalize=normalize)
    torch.testing.assert_close(to_dense(edge_index, edge_weight, 30),
                               expected, atol=1e-6, rtol=0)
    # coalesced: sorted, no duplicates, only positive weights
    key = edge_index[0] * 30 + edge_index[1]
    assert (key[1:] > key[:-1]).all()
    assert (edge_weight > 0).all()
    assert edge_index.size(1) <= 2 * k * 30


def test_freedom_binary_sym_values():
    data = make_data()
    feats = [data['item'].image, data['item'].text]
    k = 5
    edge_index, edge_weight = knn_adjacency(feats, k, [0.1, 0.9])
    # binary + 'sym': every row sum is k, so each modality's entries are 1/k
    # and the fused entries are 0.1/k, 0.9/k or 1/k (neighbour in both)
    allowed = torch.tensor([0.1 / k, 0.9 / k, 1.0 / k])
    diff = (edge_weight.view(-1, 1) - allowed.view(1, -1)).abs().min(dim=1)
    assert diff.values.max() < 1e-7
    # each item aggregates total weight 1 (rows of A_hat sum to one)
    row_sum = torch.zeros(30).index_add_(0, edge_index[1], edge_weight)
    torch.testing.assert_close(row_sum, torch.ones(30))


@pytest.mark.parametrize('include_self', [True, False])
def test_exactly_k_neighbours_before_normalisation(include_self):
    x = torch.randn(50, 8)
    k = 6
    edge_index, edge_weight = knn_adjacency([x], k, normalize=None,
                                            include_self=include_self,
                                            chunk_size=16)
    assert torch.equal(degree(edge_index[1], 50), torch.full((50, ), 6.))
    assert torch.equal(edge_weight, torch.ones_like(edge_weight))
    has_self = edge_index[0] == edge_index[1]
    assert int(has_self.sum()) == (50 if include_self else 0)


def test_orientation_matches_message_passing():
    data = make_data()
    feats = [data['item'].image, data['item'].text]
    edge_index, edge_weight = knn_adjacency(feats, 3, [0.5, 0.5],
                                            binary=False)
    dense = dense_reference(feats, 3, [0.5, 0.5], binary=False).float()
    h = torch.randn(30, 4)
    out = SimpleConv(aggr='sum')(h, edge_index, edge_weight)
    torch.testing.assert_close(out, dense @ h, atol=1e-5, rtol=1e-5)


def test_zero_norm_rows_are_isolated():
    x = torch.randn(20, 5)
    x[[3, 11]] = 0.0
    y = torch.randn(20, 4)
    k = 4
    edge_index, edge_weight = knn_adjacency([x], k, normalize=None)
    assert torch.isfinite(edge_weight).all()
    touches = (edge_index == 3).any(dim=0) | (edge_index == 11).any(dim=0)
    assert not touches.any()
    deg = degree(edge_index[1], 20)
    assert deg[[3, 11]].tolist() == [0, 0]
    assert (deg[deg > 0] == k).all() and int((deg > 0).sum()) == 18
    # normalised and fused with a modality where the items are fine: finite,
    # and items 3 / 11 only get their neighbours from the second modality
    edge_index, edge_weight = knn_adjacency([x, y], k, [0.5, 0.5],
                                            binary=False)
    assert torch.isfinite(edge_weight).all()
    ref_y = dense_reference([y], k, [0.5], binary=False)
    dense = to_dense(edge_index, edge_weight, 20)
    torch.testing.assert_close(dense[3], ref_y[3])
    torch.testing.assert_close(dense[:, 11], ref_y[:, 11])


def test_weights_are_normalised():
    feats = [torch.randn(25, 3), torch.randn(25, 4)]
    a = knn_adjacency(feats, 3, [1.0, 9.0])
    b = knn_adjacency(feats, 3, torch.tensor([0.1, 0.9]))
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    # a zero weight drops the modality: same as the other modality alone
    c = knn_adjacency(feats, 3, [0.0, 2.0])
    d = knn_adjacency(feats[1:], 3)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


def test_knn_adjacency_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match='1 <= k < num_items = 10'):
        knn_adjacency([x], 10)
    with pytest.raises(ValueError, match="'k' must be >= 1"):
        knn_adjacency([x], 0)
    with pytest.raises(ValueError, match='at least one modality'):
        knn_adjacency([], 3)
    with pytest.raises(ValueError, match=r'features\[1\] has 9 rows'):
        knn_adjacency([x, torch.randn(9, 3)], 3)
    with pytest.raises(ValueError, match='one weight per modality'):
        knn_adjacency([x, x], 3, [1.0])
    with pytest.raises(ValueError, match='non-negative'):
        knn_adjacency([x, x], 3, [1.0, -0.5])
    with pytest.raises(ValueError, match='non-negative'):
        knn_adjacency([x, x], 3, [1.0, math.nan])
    with pytest.raises(ValueError, match='all be zero'):
        knn_adjacency([x, x], 3, [0.0, 0.0])
    with pytest.raises(ValueError, match='NaN or Inf'):
        knn_adjacency([x, torch.full((10, 3), math.inf)], 3)
    with pytest.raises(ValueError, match="'normalize'"):
        knn_adjacency([x], 3, normalize='left')


def test_no_grad_and_dtype():
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    edge_index, edge_weight = knn_adjacency([x], 2)
    assert not edge_weight.requires_grad
    assert edge_weight.dtype == torch.float64
    assert edge_index.dtype == torch.long


def test_transform_adds_graph_and_metadata():
    data = make_data()
    out = ItemKNNGraph(k=4, chunk_size=7)(data)
    assert ITEM_ITEM not in data.edge_types  # the input is left untouched
    store = out[ITEM_ITEM]
    # FREEDOM's defaults for exactly {image, text}
    assert store.knn_modalities == ['image', 'text']
    assert store.knn_weights == pytest.approx([0.1, 0.9])
    assert store.knn_k == 4 and store.knn_binary is True
    assert store.knn_normalize == 'sym' and store.knn_include_self is True
    expected = dense_reference([data['item'].image, data['item'].text], 4,
                               [0.1, 0.9])
    torch.testing.assert_close(to_dense(store.edge_index, store.edge_weight,
                                        30), expected, atol=1e-6, rtol=0)


def test_transform_weights_and_modalities():
    data = make_data(dims={'audio': 4, 'image': 5, 'text': 6})
    out = ItemKNNGraph(k=3)(data)
    assert out[ITEM_ITEM].knn_weights == pytest.approx([1 / 3] * 3)

    out = ItemKNNGraph(k=3, modalities=['text', 'audio'],
                       modality_weights={'audio': 2.0, 'text': 6.0})(data)
    store = out[ITEM_ITEM]
    assert store.knn_modalities == ['text', 'audio']
    assert store.knn_weights == pytest.approx([0.75, 0.25])
    expected = dense_reference([data['item'].text, data['item'].audio], 3,
                               [0.75, 0.25])
    torch.testing.assert_close(to_dense(store.edge_index, store.edge_weight,
                                        30), expected, atol=1e-6, rtol=0)

    # sequence weights align with 'modalities'
    seq = ItemKNNGraph(k=3, modalities=['text', 'audio'],
                       modality_weights=[6.0, 2.0])(data)[ITEM_ITEM]
    assert torch.equal(seq.edge_index, store.edge_index)
    torch.testing.assert_close(seq.edge_weight, store.edge_weight)

    # external features override data['item']
    feats = {'learned': torch.randn(30, 7)}
    out = ItemKNNGraph(k=3, features=feats)(data)[ITEM_ITEM]
    assert out.knn_modalities == ['learned']
    ref = dense_reference([feats['learned']], 3, [1.0])
    torch.testing.assert_close(to_dense(out.edge_index, out.edge_weight, 30),
                               ref, atol=1e-6, rtol=0)


def test_transform_errors():
    data = make_data()
    with pytest.raises(ValueError, match=r"modality 'audio' not found in "
                       r"data\['item'\]; available modalities: "
                       r"\['image', 'text'\]"):
        ItemKNNGraph(modalities=['audio'])(data)
    with pytest.raises(ValueError, match=r"1 <= k < num_items = 30"):
        ItemKNNGraph(k=30)(data)
    with pytest.raises(ValueError, match="'k' must be >= 1"):
        ItemKNNGraph(k=0)
    with pytest.raises(ValueError, match=r"missing: \['text'\]"):
        ItemKNNGraph(modality_weights={'image': 1.0})(data)
    with pytest.raises(ValueError, match="do not match 'modalities'"):
        ItemKNNGraph(modalities=['image'], modality_weights={'text': 1.0})
    with pytest.raises(ValueError, match='explicit'):
        ItemKNNGraph(modality_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match='non-negative'):
        ItemKNNGraph(modalities=['image', 'text'],
                     modality_weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match='one weight per modality'):
        ItemKNNGraph(modalities=['image', 'text'], modality_weights=[1.0])

    empty = make_data()
    empty.modalities = []
    with pytest.raises(ValueError, match="dataset 'toy' has none"):
        ItemKNNGraph()(empty)

    short = make_data()
    short['item'].text = torch.randn(29, 9)
    with pytest.raises(ValueError, match=r"data\['item'\]\['text'\] has 29 "
                       r"rows but data\['item'\].num_nodes = 30"):
        ItemKNNGraph(k=3)(short)


def test_repr():
    assert repr(ItemKNNGraph()) == (
        "ItemKNNGraph(k=10, binary=True, normalize='sym', include_self=True, "
        "chunk_size=2048)")
    assert repr(ItemKNNGraph(k=5, modalities=['image', 'text'],
                             modality_weights={'image': 1, 'text': 3},
                             binary=False)) == (
        "ItemKNNGraph(k=5, modalities=['image', 'text'], "
        "modality_weights={'image': 1, 'text': 3}, binary=False, "
        "normalize='sym', include_self=True, chunk_size=2048)")


# ---------------------------------------------------------------------------
# Integration with crane_pyg.data.load_mmrec
# ---------------------------------------------------------------------------
def test_synthetic_data_matches_dense_reference(synthetic_data):
    data = synthetic_data
    assert len(data.modalities) >= 1
    out = ItemKNNGraph(k=10, chunk_size=64)(data)
    store = out[ITEM_ITEM]
    modalities = store.knn_modalities
    assert modalities == list(data.modalities)
    num_items = data['item'].num_nodes
    expected = dense_reference([data['item'][m] for m in modalities], 10,
                               store.knn_weights)
    torch.testing.assert_close(
        to_dense(store.edge_index, store.edge_weight, num_items), expected,
        atol=1e-6, rtol=0)


@pytest.mark.realdata
def test_tiktok():
    data = load_mmrec(require_dataset('tiktok'))
    num_items = data['item'].num_nodes
    assert data.modalities == ['audio', 'image'] and num_items == 6710
    out = ItemKNNGraph(k=10)(data)
    store = out[ITEM_ITEM]
    assert store.knn_weights == pytest.approx([0.5, 0.5])
    assert store.edge_index.size(1) <= 2 * num_items * 10
    assert torch.isfinite(store.edge_weight).all()
    assert (store.edge_weight > 0).all()
    # binary + 'sym' with k neighbours per row: every item aggregates weight 1
    row_sum = torch.zeros(num_items).index_add_(0, store.edge_index[1],
                                                store.edge_weight)
    torch.testing.assert_close(row_sum, torch.ones(num_items))
    # Each modality's neighbour lists are a valid top-10 of a direct float64
    # computation: TikTok's features are float16-derived, so ties and float32
    # near-ties (~4e-7) at the 10th place occur and either side may be picked.
    fused = []
    for modality, w in zip(store.knn_modalities, store.knn_weights):
        x = data['item'][modality]
        ei, ew = knn_adjacency([x], 10, normalize=None)
        assert torch.equal(degree(ei[1], num_items),
                           torch.full((num_items, ), 10.0))
        sample = torch.randperm(num_items)[:500]
        x = torch.nn.functional.normalize(x.double())
        sim = x[sample] @ x.t()
        sim[torch.arange(500), sample] = 1.0
        chosen = torch.zeros(num_items, num_items, dtype=torch.bool)
        chosen[ei[1], ei[0]] = True
        chosen = chosen[sample]
        worst_chosen = sim.masked_fill(~chosen, 2.0).min(dim=1).values
        best_other = sim.masked_fill(chosen, -2.0).max(dim=1).values
        assert (worst_chosen >= best_other - 1e-6).all()
        fused.append((ei, ew * w / 10))  # binary 'sym': entries 1/k
    # the fused graph is the weighted sum of the per-modality graphs
    ei, ew = coalesce(torch.cat([e for e, _ in fused], dim=1),
                      torch.cat([v for _, v in fused]), num_nodes=num_items)
    assert torch.equal(ei, store.edge_index)
    torch.testing.assert_close(ew, store.edge_weight)
