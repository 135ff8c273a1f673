"""The four models behind the common Recommender interface."""
import copy
import inspect
import math
import typing

import pytest
import torch
from torch_geometric.utils import to_dense_adj

from crane_pyg.data import ITEM, ITEM_ITEM, USER, USER_ITEM
from crane_pyg.models import CRANE, FREEDOM, MGCN, MODELS, VBPR, LGMRec, LightGCN, Recommender
from crane_pyg.models.base import degree_sensitive_edge_sample, epoch_generator
from crane_pyg.transforms import ItemKNNGraph

ALLOWED_TYPES = (int, float, bool, str)


@pytest.fixture(scope='module')
def knn_data(synthetic_data):
    """The synthetic data with the default item-item kNN graph (a copy)."""
    return ItemKNNGraph(k=10)(copy.copy(synthetic_data))


def _batch(data, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = data[USER_ITEM].edge_index
    pick = torch.randperm(edge_index.size(1), generator=g)[:size]
    neg = torch.randint(0, data[ITEM].num_nodes, (size, ), generator=g)
    return edge_index[0, pick], edge_index[1, pick], neg


def _dense_lightgcn(edge_index, num_users, num_items, x_user, x_item, num_layers):
    """Dense reference: mean over layers of (D^-1/2 A D^-1/2)^l E0 on U+I nodes."""
    n = num_users + num_items
    a = torch.zeros(n, n, dtype=torch.float64)
    a[edge_index[0], num_users + edge_index[1]] = 1.0
    a[num_users + edge_index[1], edge_index[0]] = 1.0
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    norm = inv[:, None] * a * inv[None, :]
    x = torch.cat([x_user, x_item]).double()
    out, cur = x.clone(), x
    for _ in range(num_layers):
        cur = norm @ cur
        out = out + cur
    out = out / (num_layers + 1)
    return out[:num_users], out[num_users:]


def _knn_matrix(data):
    """The dense item-item matrix S (S[i, j]: i aggregates j) as documented by
    ItemKNNGraph: to_dense_adj(edge_index, edge_attr=edge_weight)[0].t()."""
    store = data[ITEM_ITEM]
    n = data[ITEM].num_nodes
    return to_dense_adj(store.edge_index, edge_attr=store.edge_weight,
                        max_num_nodes=n)[0].t().double()


# ---------------------------------------------------------------------------
# interface contracts
# ---------------------------------------------------------------------------

def test_registry():
    assert MODELS == {'crane': CRANE, 'lightgcn': LightGCN, 'vbpr': VBPR, 'freedom': FREEDOM,
                      'mgcn': MGCN, 'lgmrec': LGMRec}
    for cls in MODELS.values():
        assert issubclass(cls, Recommender)


def _allowed(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation in ALLOWED_TYPES
    if origin is typing.Literal:
        return all(isinstance(a, ALLOWED_TYPES) for a in typing.get_args(annotation))
    if origin is typing.Union:  # Optional[X]
        return all(a is type(None) or _allowed(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return all(a is Ellipsis or _allowed(a) for a in typing.get_args(annotation))
    return False


@pytest.mark.parametrize('name', sorted(MODELS))
def test_options_are_typed_defaulted_and_documented(name):
    cls = MODELS[name]
    params = inspect.signature(cls.__init__).parameters.values()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), \
        f'{name}: no **kwargs catch-all allowed'
    hints = typing.get_type_hints(cls.__init__)  # resolvable by the config loader
    options = cls.options()
    assert options, name
    doc = inspect.getdoc(cls)
    for option, p in options.items():
        assert p.default is not inspect.Parameter.empty, (name, option)
        assert _allowed(hints[option]), (name, option, hints[option])
        assert f'\n{option} (' in '\n' + doc.replace('\n    ', '\n'), \
            f'{name}: option {option!r} missing from the docstring Args'
        # the default satisfies its own annotation
        if p.default is not None:
            base = typing.get_origin(hints[option]) or hints[option]
            if base in ALLOWED_TYPES:
                assert isinstance(p.default, base), (name, option)


def test_unknown_option_is_an_error(knn_data):
    with pytest.raises(TypeError, match='embeding_dim'):
        LightGCN.from_data(knn_data, embeding_dim=8)


@pytest.mark.parametrize('cls', [VBPR, FREEDOM, CRANE, MGCN, LGMRec])
def test_model_without_modalities_is_a_clear_error(synthetic_data, cls):
    data = copy.copy(synthetic_data)
    data.modalities = []
    with pytest.raises(ValueError, match='no modality|needs at least one item modality'):
        cls.from_data(data)


def test_bad_option_values_are_clear_errors(knn_data):
    with pytest.raises(ValueError, match="'embedding_dim' must be even"):
        VBPR.from_data(knn_data, embedding_dim=7)
    with pytest.raises(ValueError, match="'dropout'"):
        FREEDOM.from_data(knn_data, dropout=1.0)
    with pytest.raises(ValueError, match="'user_semantic' must be one of"):
        CRANE.from_data(knn_data, user_semantic='user')
    with pytest.raises(ValueError, match='row 1 .item ids. must lie in'):
        LightGCN(3, 2, torch.tensor([[0, 1], [0, 2]]))


# ---------------------------------------------------------------------------
# shapes, gradients, a few optimisation steps, for every model
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(MODELS))
def test_embeddings_and_scores(knn_data, name):
    torch.manual_seed(0)
    model = MODELS[name].from_data(knn_data, embedding_dim=16).eval()
    num_users, num_items = knn_data[USER].num_nodes, knn_data[ITEM].num_nodes
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
        dim = 32 if (name == 'crane' and model.fusion == 'concat') else 16
        assert user_emb.shape == (num_users, dim) and item_emb.shape == (num_items, dim)
        assert user_emb.dtype == item_emb.dtype == torch.float32
        users = torch.tensor([0, 5, 7, 7])
        scores = model.score_all_items(users)
        assert scores.shape == (4, num_items) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, user_emb[users] @ item_emb.t())
        torch.testing.assert_close(model.score_all_items(users, (user_emb, item_emb)), scores)
        assert torch.isfinite(scores).all()


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_parameter_gets_a_gradient(knn_data, name):
    torch.manual_seed(0)
    model = MODELS[name].from_data(knn_data, embedding_dim=16).train()
    model.on_epoch_start(0)
    loss, parts = model.loss(*_batch(knn_data))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) for v in parts.values())
    assert math.isclose(loss.item(), sum(parts.values()), rel_tol=1e-5)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f'{name}: {pname} has no gradient'
        assert param.grad.abs().sum() > 0, f'{name}: {pname} has a zero gradient'


@pytest.mark.parametrize('name', sorted(MODELS))
def test_adam_steps_decrease_the_loss_without_nan(knn_data, name):
    torch.manual_seed(0)
    model = MODELS[name].from_data(knn_data, embedding_dim=16).train()
    model.on_epoch_start(0)
    batch = _batch(knn_data, size=256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = model.loss(*batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    for param in model.parameters():
        assert torch.isfinite(param).all()
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert all(torch.isfinite(e).all() for e in model.eval().embeddings())


@pytest.mark.parametrize('name', sorted(MODELS))
def test_device_move_and_call_equals_loss(knn_data, name):
    torch.manual_seed(0)
    model = MODELS[name].from_data(knn_data, embedding_dim=8).eval()
    batch = _batch(knn_data)
    with torch.no_grad():
        before = [e.clone() for e in model.embeddings()]
        model = model.to(torch.float64)  # buffers and caches follow (float64: a real change)
        after = model.embeddings()
        assert after[0].dtype == torch.float64
        torch.testing.assert_close(after[0].float(), before[0], atol=1e-5, rtol=1e-4)
        loss, _ = model.loss(*batch)
        call, _ = model(*batch)
    assert loss.item() == call.item()


def test_state_dict_excludes_data_tensors(knn_data):
    model = FREEDOM.from_data(knn_data, embedding_dim=8)
    keys = set(model.state_dict())
    assert not any(k.startswith(('edge_index', 'train_edge_index', 'item_adj', 'feature_'))
                   for k in keys), keys
    assert {'user_embedding.weight', 'item_embedding.weight'} <= keys


# ---------------------------------------------------------------------------
# exact references
# ---------------------------------------------------------------------------

def test_lightgcn_matches_dense_reference(knn_data):
    model = LightGCN.from_data(knn_data, embedding_dim=8, num_layers=3).eval()
    edge_index = knn_data[USER_ITEM].edge_index
    ref_u, ref_i = _dense_lightgcn(edge_index, model.num_users, model.num_items,
                                   model.user_embedding.weight.detach(),
                                   model.item_embedding.weight.detach(), 3)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    torch.testing.assert_close(user_emb.double(), ref_u, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(item_emb.double(), ref_i, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('reg_form', ['mmrec', 'squared'])
def test_lightgcn_loss_by_hand(knn_data, reg_form):
    model = LightGCN.from_data(knn_data, embedding_dim=8, reg_weight=0.5,
                               reg_form=reg_form).eval()
    users, pos, neg = _batch(knn_data, size=16)
    with torch.no_grad():
        u, i = model.embeddings()
        x = (u[users] * i[pos]).sum(-1) - (u[users] * i[neg]).sum(-1)
        bpr = torch.nn.functional.softplus(-x).mean()
        ego = [model.user_embedding.weight[users], model.item_embedding.weight[pos],
               model.item_embedding.weight[neg]]
        loss, parts = model.loss(users, pos, neg)
    assert parts['bpr'] == pytest.approx(bpr.item(), rel=1e-5)
    if reg_form == 'mmrec':  # MMRec's EmbLoss: unsquared Frobenius norms / B
        expected = 0.5 * sum(e.pow(2).sum().sqrt().item() for e in ego) / 16
    else:
        expected = 0.5 * 0.5 * sum(e.pow(2).sum().item() for e in ego) / 16
    assert parts['reg'] == pytest.approx(expected, rel=1e-5)
    assert LightGCN.option_defaults()['reg_form'] == 'mmrec'


def test_vbpr_matches_its_definition(knn_data):
    model = VBPR.from_data(knn_data, embedding_dim=8).eval()
    feats = torch.cat([knn_data[ITEM][m] for m in knn_data.modalities], dim=-1)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
        content = model.item_linear(feats)
    assert user_emb.shape[1] == item_emb.shape[1] == 8
    torch.testing.assert_close(item_emb[:, :4], model.item_embedding.weight)
    torch.testing.assert_close(item_emb[:, 4:], content, atol=1e-5, rtol=1e-4)


def test_freedom_matches_dense_reference(knn_data):
    model = FREEDOM.from_data(knn_data, embedding_dim=8, num_mm_layers=2).eval()
    edge_index = knn_data[USER_ITEM].edge_index
    ref_u, ref_i = _dense_lightgcn(edge_index, model.num_users, model.num_items,
                                   model.user_embedding.weight.detach(),
                                   model.item_embedding.weight.detach(), 2)
    s = _knn_matrix(knn_data)
    ref_h = s @ (s @ model.item_embedding.weight.detach().double())
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    torch.testing.assert_close(user_emb.double(), ref_u, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(item_emb.double(), ref_i + ref_h, atol=1e-6, rtol=1e-5)


def test_from_data_builds_the_same_item_graph(synthetic_data, knn_data):
    a = FREEDOM.from_data(synthetic_data, embedding_dim=8)  # builds it itself
    b = FREEDOM.from_data(knn_data, embedding_dim=8)        # uses the transform's
    assert torch.equal(a.item_adj_index, b.item_adj_index)
    torch.testing.assert_close(a.item_adj_weight, b.item_adj_weight)
    assert ITEM_ITEM not in synthetic_data.edge_types  # data left unchanged
    # a graph built with another k is not reused
    c = FREEDOM.from_data(knn_data, embedding_dim=8, knn_k=5)
    assert c.item_adj_index.size(1) < b.item_adj_index.size(1)


# ---------------------------------------------------------------------------
# degree-sensitive edge dropout (FREEDOM; CRANE uses the same sampler)
# ---------------------------------------------------------------------------

def test_edge_sampler_matches_sequential_weighted_sampling():
    # 3 users, 2 items: degrees give distinct weights 1/sqrt(d_u d_i)
    edge_index = torch.tensor([[0, 0, 1, 2], [0, 1, 0, 0]])
    w = torch.tensor([1 / math.sqrt(2 * 3), 1 / math.sqrt(2 * 1),
                      1 / math.sqrt(1 * 3), 1 / math.sqrt(1 * 3)], dtype=torch.float64)
    exact = {}
    for a in range(4):
        for b in range(4):
            if a != b:
                key = tuple(sorted((a, b)))
                exact[key] = exact.get(key, 0.0) + (w[a] / w.sum() * w[b] / (w.sum() - w[a])).item()
    counts = {key: 0 for key in exact}
    g = torch.Generator().manual_seed(0)
    draws = 4000
    for _ in range(draws):
        keep = degree_sensitive_edge_sample(edge_index, 3, 2, 0.5, g)
        assert keep.numel() == 2 and bool((keep[1:] > keep[:-1]).all())
        counts[tuple(keep.tolist())] += 1
    for key, p in exact.items():
        assert abs(counts[key] / draws - p) < 0.025, (key, counts[key] / draws, p)


def test_freedom_edge_dropout_per_epoch(knn_data):
    model = FREEDOM.from_data(knn_data, embedding_dim=8, dropout=0.8, seed=3)
    num_edges = knn_data[USER_ITEM].edge_index.size(1)
    full = set(map(tuple, knn_data[USER_ITEM].edge_index.t().tolist()))
    model.on_epoch_start(1)
    e1 = model.train_edge_index.clone()
    assert e1.size(1) == int(num_edges * 0.2)
    assert set(map(tuple, e1.t().tolist())) <= full
    assert len(set(map(tuple, e1.t().tolist()))) == e1.size(1)  # no duplicates
    model.on_epoch_start(2)
    assert not torch.equal(model.train_edge_index, e1)
    other = FREEDOM.from_data(knn_data, embedding_dim=8, dropout=0.8, seed=3)
    other.on_epoch_start(1)
    assert torch.equal(other.train_edge_index, e1)  # a resumed run replays the epoch
    keep = degree_sensitive_edge_sample(knn_data[USER_ITEM].edge_index, model.num_users,
                                        model.num_items, 0.8, epoch_generator(3, 1))
    assert torch.equal(knn_data[USER_ITEM].edge_index[:, keep], e1)
    # training uses the pruned graph, evaluation the full one
    batch = _batch(knn_data)
    with torch.no_grad():
        train_loss = model.train().loss(*batch)[0]
        eval_loss = model.eval().loss(*batch)[0]
        u, i = model.embeddings()
        x = (u[batch[0]] * i[batch[1]]).sum(-1) - (u[batch[0]] * i[batch[2]]).sum(-1)
    assert not torch.isclose(train_loss, eval_loss)
    modal = model.eval().loss(*batch)[1]['modal_bpr']
    assert eval_loss.item() == pytest.approx(
        torch.nn.functional.softplus(-x).mean().item() + modal, rel=1e-5)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_training_is_bitwise_reproducible(knn_data, name):
    """Same seeds, same numbers: a resumed run must replay exactly (gathers
    use index_select: the backward of x[idx] accumulates repeated indices in
    a thread-dependent order on CPU)."""
    options = {'embedding_dim': 64}  # large enough for multi-threaded kernels
    if name in ('crane', 'freedom'):
        options['seed'] = 1
    if name == 'crane':
        options.update(edge_dropout=0.2, rca_dropout=0.1, graph_rebuild_every=1)

    def run():
        torch.manual_seed(0)
        model = MODELS[name].from_data(knn_data, **options).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(4):
            model.on_epoch_start(step)
            optimizer.zero_grad()
            model.loss(*_batch(knn_data, size=3000, seed=step))[0].backward()
            optimizer.step()
        return model.state_dict()

    a, b = run(), run()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_from_data_rebuilds_a_graph_with_other_weights(knn_data):
    default = FREEDOM.from_data(knn_data, embedding_dim=8)
    same = FREEDOM.from_data(knn_data, embedding_dim=8, modality_weights=(1.0, 9.0))
    torch.testing.assert_close(same.item_adj_weight, default.item_adj_weight)
    assert knn_data.modalities == ['image', 'text']
    other = FREEDOM.from_data(knn_data, embedding_dim=8, modality_weights=(0.5, 0.5))
    assert not (other.item_adj_index.shape == default.item_adj_index.shape
                and torch.allclose(other.item_adj_weight, default.item_adj_weight))
    skewed = ItemKNNGraph(k=10, modality_weights={'image': 0.5, 'text': 0.5})(
        copy.copy(knn_data))
    # the model's default weights differ from those the graph was built with
    rebuilt = FREEDOM.from_data(skewed, embedding_dim=8)
    torch.testing.assert_close(rebuilt.item_adj_weight, default.item_adj_weight)
