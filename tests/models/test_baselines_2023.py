"""MGCN and LGMRec: dense references of their equations, hand-checked pieces,
option errors, determinism and a short training that beats popularity.

The interface contracts (shapes, gradients to every parameter, loss decrease,
device moves, bitwise-reproducible training) run for them in test_models.py,
which covers every registered model."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from crane_pyg.data import BPRSampler, ITEM, USER, USER_ITEM, load_synthetic
from crane_pyg.metrics import FullRankingEvaluator
from crane_pyg.models import MGCN, LGMRec
from crane_pyg.models.base import bipartite_block_matrix, interaction_matrix
from crane_pyg.models.lgmrec import hyperedge_dependencies


def _batch(data, size=64, seed=0):
    """The first ``size`` (user, positive, negative) triples of BPRSampler's epoch 0."""
    return next(BPRSampler.from_data(data, seed=seed).batches(0, size))


def _dense_graphs(data):
    """Binary R, D_U^-1 R, D_U^-1/2 R D_I^-1/2 and the (U+I) normalised A, float64."""
    num_users, num_items = data[USER].num_nodes, data[ITEM].num_nodes
    edge_index = data[USER_ITEM].edge_index
    r = torch.zeros(num_users, num_items, dtype=torch.float64)
    r[edge_index[0], edge_index[1]] = 1.0
    du, di = r.sum(1), r.sum(0)
    inv_u = torch.where(du > 0, du.pow(-0.5), torch.zeros_like(du))
    inv_i = torch.where(di > 0, di.pow(-0.5), torch.zeros_like(di))
    r_sym = inv_u[:, None] * r * inv_i[None, :]
    r_mean = torch.where(du[:, None] > 0, r / du.clamp(min=1)[:, None], torch.zeros_like(r))
    n = num_users + num_items
    a = torch.zeros(n, n, dtype=torch.float64)
    a[:num_users, num_users:] = r_sym
    a[num_users:, :num_users] = r_sym.t()
    return r, r_mean, r_sym, a


def _dense_lightgcn(a, x, num_layers):
    out, cur = x.clone(), x
    for _ in range(num_layers):
        cur = a @ cur
        out = out + cur
    return out / (num_layers + 1)


def _dense_cosine_knn(x, k):
    """MGCN's graph: cosine top-k (self included), cosine-valued, D^-1/2 S D^-1/2."""
    x = F.normalize(x.double(), dim=1)
    sim = x @ x.t()
    value, index = sim.topk(k, dim=1)
    s = torch.zeros_like(sim).scatter_(1, index, value.clamp(min=0))
    deg = s.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    return inv[:, None] * s * inv[None, :]


# ---------------------------------------------------------------------------
# shared helpers of models/base.py
# ---------------------------------------------------------------------------

def test_interaction_matrix_by_hand():
    # user 0: items 0, 1 (item 1 twice); user 1: item 1; user 2: nothing
    edge_index = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]])
    index, value = interaction_matrix(edge_index, 3, 2, None)
    assert index.tolist() == [[0, 0, 1], [0, 1, 1]] and value.tolist() == [1, 1, 1]
    _, mean = interaction_matrix(edge_index, 3, 2, 'row')
    assert mean.tolist() == [0.5, 0.5, 1.0]
    _, sym = interaction_matrix(edge_index, 3, 2, 'sym')
    torch.testing.assert_close(sym, torch.tensor([1 / math.sqrt(2), 1 / 2, 1 / math.sqrt(2)]))
    block, block_value = bipartite_block_matrix(index, sym, 3)
    assert block.tolist() == [[0, 0, 1, 3, 4, 4], [3, 4, 4, 0, 0, 1]]
    assert torch.equal(block_value, torch.cat([sym, sym]))
    with pytest.raises(ValueError, match='normalize must be one of'):
        interaction_matrix(edge_index, 3, 2, 'col')


@pytest.mark.parametrize('cls', [MGCN, LGMRec])
def test_graphs_stay_out_of_the_state_dict(synthetic_data, cls):
    model = cls.from_data(synthetic_data, embedding_dim=8)
    keys = set(model.state_dict())
    assert not any(k.endswith(('_index', '_value')) or re.fullmatch(r'(raw_)?feature_\d+', k)
                   for k in keys), keys
    buffers = dict(model.named_buffers())
    assert 'adj_index' in buffers and 'ui_value' in buffers


@pytest.mark.parametrize('cls', [MGCN, LGMRec])
def test_propagate_equals_torch_sparse_mm_bitwise(synthetic_data, cls):
    """``propagate`` (an Adjacency whose backward reuses a cached A^T) gives
    torch.sparse.mm's product and its autograd gradient to the last bit, on
    the square LightGCN matrix and on the rectangular user-item one, so the
    speed-up changes no trained figure."""
    model = cls.from_data(synthetic_data, embedding_dim=8)
    gen = torch.Generator().manual_seed(0)
    for name in ('adj', 'ui'):
        rows, cols = model.matrix(name).shape
        x = torch.randn(cols, 8, generator=gen)
        upstream = torch.randn(rows, 8, generator=gen)
        grads = []
        for product in (lambda v: torch.sparse.mm(model.matrix(name), v),
                        lambda v: model.propagate(name, v)):
            v = x.clone().requires_grad_()
            out = product(v)
            out.backward(upstream)
            grads.append((out.detach(), v.grad))
        assert torch.equal(grads[0][0], grads[1][0]), name
        assert torch.equal(grads[0][1], grads[1][1]), name
    # the adjacency is built once, and dropped by reset_cache
    adj = model.adjacency('adj')
    assert model.adjacency('adj') is adj
    model.reset_cache()
    assert model.adjacency('adj') is not adj


# ---------------------------------------------------------------------------
# MGCN
# ---------------------------------------------------------------------------

def test_mgcn_purification_gate_by_hand(synthetic_data):
    model = MGCN.from_data(synthetic_data, embedding_dim=8).eval()
    x = synthetic_data[ITEM][model.modalities[1]]
    proj, gate = model.feature_proj[1], model.purifier[1]
    with torch.no_grad():
        projected = x @ proj.weight.t() + proj.bias
        expected = model.item_embedding.weight / (1 + torch.exp(-(projected @ gate.weight.t()
                                                                 + gate.bias)))
        torch.testing.assert_close(model.purified(1), expected, atol=1e-6, rtol=1e-5)
        # the gate lies in (0, 1): a purified entry never exceeds the ID entry
        assert (model.purified(0).abs() <= model.item_embedding.weight.abs() + 1e-7).all()


def _mgcn_dense(model, data):
    _, _, r_sym, a = _dense_graphs(data)
    num_users = model.num_users
    weights = {k: v.detach().double() for k, v in model.state_dict().items()}
    ego = torch.cat([weights['user_embedding.weight'], weights['item_embedding.weight']])
    behaviour = _dense_lightgcn(a, ego, model.num_ui_layers)
    views = []
    for m, name in enumerate(model.modalities):
        if model.modality_input == 'ids':
            h = weights['item_embedding.weight']
        else:
            x = weights[f'features.{m}'] if model.tune_features else data[ITEM][name].double()
            h = x @ weights[f'feature_proj.{m}.weight'].t() + weights[f'feature_proj.{m}.bias']
        if model.modality_input == 'purified':
            h = weights['item_embedding.weight'] * torch.sigmoid(
                h @ weights[f'purifier.{m}.weight'].t() + weights[f'purifier.{m}.bias'])
        s = _dense_cosine_knn(data[ITEM][name], model.knn_k)
        for _ in range(model.num_mm_layers):
            h = s @ h
        views.append(torch.cat([r_sym @ h, h]))
    if model.fuser == 'mean':
        side = sum(views) / len(views)
        final = behaviour + side
        return final[:num_users], final[num_users:], behaviour, side
    scores = [torch.tanh(v @ weights['attention.0.weight'].t() + weights['attention.0.bias'])
              @ weights['attention.2.weight'].t() for v in views]
    alpha = torch.softmax(torch.cat(scores, dim=1), dim=1)
    common = sum(alpha[:, m:m + 1] * v for m, v in enumerate(views))
    side = common.clone()
    for m, v in enumerate(views):
        prefer = torch.sigmoid(behaviour @ weights[f'preference.{m}.weight'].t()
                               + weights[f'preference.{m}.bias'])
        side = side + prefer * (v - common)
    side = side / (len(views) + 1)
    final = behaviour + side
    return final[:num_users], final[num_users:], behaviour, side


def test_mgcn_matches_dense_reference(synthetic_data):
    torch.manual_seed(0)
    model = MGCN.from_data(synthetic_data, embedding_dim=8, num_mm_layers=2, knn_k=5).eval()
    ref_u, ref_i, _, _ = _mgcn_dense(model, synthetic_data)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    torch.testing.assert_close(user_emb.double(), ref_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item_emb.double(), ref_i, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('modality_input,fuser', [
    ('features', 'attention'), ('ids', 'attention'), ('purified', 'mean'), ('features', 'mean')])
def test_mgcn_dissection_options_match_dense_reference(synthetic_data, modality_input, fuser):
    torch.manual_seed(0)
    model = MGCN.from_data(synthetic_data, embedding_dim=8, knn_k=5,
                           modality_input=modality_input, fuser=fuser).eval()
    ref_u, ref_i, _, _ = _mgcn_dense(model, synthetic_data)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    torch.testing.assert_close(user_emb.double(), ref_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item_emb.double(), ref_i, atol=1e-5, rtol=1e-4)
    # only the parts in use are built, and every one of them is trained
    names = {name.split('.')[0] for name, _ in model.named_parameters()}
    assert ('purifier' in names) == (modality_input == 'purified')
    assert ('feature_proj' in names) == (modality_input != 'ids')
    assert ('attention' in names) == ('preference' in names) == (fuser == 'attention')
    model.train()
    loss, _ = model.loss(*_batch(synthetic_data))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the content reaches an 'ids' view only through the kNN graphs: scaled
    # features (same cosine graphs) give the same scores, other features do not
    if modality_input == 'ids':
        def rebuilt(transform):
            data = synthetic_data.clone()
            for name in model.modalities:
                data[ITEM][name] = transform(synthetic_data[ITEM][name])
            other = MGCN.from_data(data, embedding_dim=8, knn_k=5, modality_input='ids')
            other.load_state_dict(model.state_dict())
            with torch.no_grad():
                return other.eval().embeddings()[1]
        with torch.no_grad():
            reference = model.eval().embeddings()[1]
        torch.testing.assert_close(rebuilt(lambda x: 3.0 * x), reference)
        generator = torch.Generator().manual_seed(1)
        assert not torch.allclose(rebuilt(lambda x: torch.randn(x.shape, generator=generator)),
                                  reference)


def test_mgcn_dissection_option_errors(synthetic_data):
    with pytest.raises(ValueError, match="'modality_input' must be one of"):
        MGCN.from_data(synthetic_data, modality_input='raw')
    with pytest.raises(ValueError, match="'fuser' must be one of"):
        MGCN.from_data(synthetic_data, fuser='sum')
    with pytest.raises(ValueError, match="'num_recursions' > 0 needs the content"):
        MGCN.from_data(synthetic_data, modality_input='ids', num_recursions=2)
    with pytest.raises(ValueError, match="purified views need modality_input='purified'"):
        MGCN.from_data(synthetic_data, modality_input='features').purified(0)


def test_mgcn_with_rca_refines_the_projections_before_the_purifier(synthetic_data):
    torch.manual_seed(0)
    model = MGCN.from_data(synthetic_data, embedding_dim=8, num_recursions=2).eval()
    assert model.rca is not None and model.rca.num_recursions == 2
    with torch.no_grad():
        plain = [proj(model.features[m]) for m, proj in enumerate(model.feature_proj)]
        refined = model.rca.refine(torch.stack(plain, dim=1))
        for m in range(len(plain)):
            torch.testing.assert_close(model.projected()[m], refined[:, m])
            assert not torch.allclose(refined[:, m], plain[m])  # RCA changed them
            gate = model.purifier[m]
            expected = model.item_embedding.weight * torch.sigmoid(
                refined[:, m] @ gate.weight.t() + gate.bias)
            torch.testing.assert_close(model.purified(m), expected)
    model.train()
    loss, _ = model.loss(*_batch(synthetic_data))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.rca.parameters())
    assert MGCN.from_data(synthetic_data, embedding_dim=8).rca is None


def test_mgcn_loss_by_hand(synthetic_data):
    torch.manual_seed(0)
    model = MGCN.from_data(synthetic_data, embedding_dim=8, cl_weight=0.5, reg_weight=0.1)
    users, pos, neg = _batch(synthetic_data, size=32)
    with torch.no_grad():
        ref_u, ref_i, behaviour, side = _mgcn_dense(model, synthetic_data)
        loss, parts = model.loss(users, pos, neg)
    u, p, n = ref_u[users], ref_i[pos], ref_i[neg]
    bpr = F.softplus(-((u * p).sum(1) - (u * n).sum(1))).mean()
    reg = 0.1 * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / 32

    def nce(a, b):  # one direction, in-batch negatives, tau 0.2
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t() / 0.2
        return -(logits.diagonal() - logits.logsumexp(dim=1)).mean()

    nodes = pos + model.num_users
    cl = 0.5 * (nce(side[nodes], behaviour[nodes]) + nce(side[users], behaviour[users]))
    assert parts['bpr'] == pytest.approx(bpr.item(), rel=1e-4)
    assert parts['reg'] == pytest.approx(reg.item(), rel=1e-4)
    assert parts['cl'] == pytest.approx(cl.item(), rel=1e-4)
    assert loss.item() == pytest.approx(bpr.item() + reg.item() + cl.item(), rel=1e-4)


def test_mgcn_frozen_features_and_reset(synthetic_data):
    frozen = MGCN.from_data(synthetic_data, embedding_dim=8, tune_features=False)
    assert not any(name.startswith('features') for name, _ in frozen.named_parameters())
    tuned = MGCN.from_data(synthetic_data, embedding_dim=8)
    with torch.no_grad():
        tuned.features[0].add_(1.0)
    tuned.reset_parameters()
    first = synthetic_data[ITEM][tuned.modalities[0]]
    assert torch.equal(tuned.features[0].detach(), first.float())


# ---------------------------------------------------------------------------
# LGMRec
# ---------------------------------------------------------------------------

def test_hyperedge_dependencies_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), 0.0]])
    # noise-free: softmax(logits / tau)
    torch.testing.assert_close(hyperedge_dependencies(logits, 1.0, training=False),
                               torch.tensor([[1 / 3, 2 / 3], [3 / 4, 1 / 4]]))
    torch.testing.assert_close(hyperedge_dependencies(logits, 0.5, training=False),
                               torch.tensor([[1 / 5, 4 / 5], [9 / 10, 1 / 10]]))
    # Gumbel-softmax: rows on the simplex, random, reproducible from the seed
    torch.manual_seed(1)
    a = hyperedge_dependencies(logits[:1].expand(500, 2), 1.0, training=True)
    torch.manual_seed(1)
    b = hyperedge_dependencies(logits[:1].expand(500, 2), 1.0, training=True)
    assert torch.equal(a, b) and (a >= 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(500))
    assert a[:, 0].std() > 0.1
    # argmax of logits + Gumbel noise is a draw from softmax(logits):
    # the relaxed sample picks hyperedge 1 of row [0, log 2] about 2/3 of the time
    torch.manual_seed(2)
    c = hyperedge_dependencies(logits[:1].expand(20000, 2), 0.05, training=True)
    assert (c[:, 1] > 0.5).float().mean().item() == pytest.approx(2 / 3, abs=0.02)


def _lgmrec_dense(model, data):
    """Eval mode (no Gumbel noise, no dropout), float64."""
    r, r_mean, _, a = _dense_graphs(data)
    num_users, tau = model.num_users, model.temperature
    weights = {k: v.detach().double() for k, v in model.state_dict().items()}
    ego = torch.cat([weights['user_embedding.weight'], weights['item_embedding.weight']])
    collaborative = _dense_lightgcn(a, ego, model.num_ui_layers)
    local = collaborative.clone()
    hyper = []
    for m, name in enumerate(model.modalities):
        x = data[ITEM][name].double()
        items = x @ weights[f'feature_proj.{m}.weight'].t()
        e = torch.cat([r_mean @ items, items])
        for _ in range(model.num_mm_layers):
            e = a @ e
        local = local + F.normalize(e, dim=1)
        lam = x @ weights[f'hyperedges.{m}.weight'].t()
        h_item, h_user = torch.softmax(lam / tau, 1), torch.softmax(r @ lam / tau, 1)
        g = collaborative[num_users:]
        for _ in range(model.num_hyper_layers):
            z = h_item.t() @ g
            g = h_item @ z
        hyper.append((h_user @ z, g))
    glob = torch.cat([sum(h[0] for h in hyper), sum(h[1] for h in hyper)])
    final = local + model.alpha * F.normalize(glob, dim=1)
    return final[:num_users], final[num_users:], hyper


def test_lgmrec_matches_dense_reference(synthetic_data):
    torch.manual_seed(0)
    model = LGMRec.from_data(synthetic_data, embedding_dim=8, num_hyper_layers=2,
                             num_hyperedges=5, num_mm_layers=1).eval()
    ref_u, ref_i, _ = _lgmrec_dense(model, synthetic_data)
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
        again = model.embeddings()
    torch.testing.assert_close(user_emb.double(), ref_u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(item_emb.double(), ref_i, atol=1e-5, rtol=1e-4)
    # evaluation is deterministic (no Gumbel noise)
    assert torch.equal(again[0], user_emb) and torch.equal(again[1], item_emb)


def test_lgmrec_loss_by_hand(synthetic_data):
    torch.manual_seed(0)
    model = LGMRec.from_data(synthetic_data, embedding_dim=8, cl_weight=0.01,
                             reg_weight=0.1).eval()
    users, pos, neg = _batch(synthetic_data, size=32)
    with torch.no_grad():
        ref_u, ref_i, hyper = _lgmrec_dense(model, synthetic_data)
        loss, parts = model.loss(users, pos, neg)
    u, p, n = ref_u[users], ref_i[pos], ref_i[neg]
    bpr = F.softplus(-((u * p).sum(1) - (u * n).sum(1))).mean()
    reg = 0.1 * (u.norm() + p.norm() + n.norm()) / 32

    def contrast(view_a, view_b, index):  # summed over the batch, all nodes as negatives
        sim = F.normalize(view_a[index], dim=1) @ F.normalize(view_b, dim=1).t() / 0.2
        positive = sim[torch.arange(index.numel()), index]
        return -(torch.exp(positive) / torch.exp(sim).sum(1)).log().sum()

    hcl = 0.01 * (contrast(hyper[0][0], hyper[1][0], users)
                  + contrast(hyper[0][1], hyper[1][1], pos))
    assert parts['bpr'] == pytest.approx(bpr.item(), rel=1e-4)
    assert parts['reg'] == pytest.approx(reg.item(), rel=1e-4)
    assert parts['hcl'] == pytest.approx(hcl.item(), rel=1e-4)
    assert loss.item() == pytest.approx(bpr.item() + reg.item() + hcl.item(), rel=1e-4)


def test_lgmrec_training_mode_is_random_but_seeded(synthetic_data):
    model = LGMRec.from_data(synthetic_data, embedding_dim=8).train()
    batch = _batch(synthetic_data)
    torch.manual_seed(3)
    a = model.loss(*batch)[0]
    b = model.loss(*batch)[0]
    torch.manual_seed(3)
    c = model.loss(*batch)[0]
    assert a.item() != b.item() and a.item() == c.item()
    # keep_rate 1 and eval: no dropout, no noise
    model = LGMRec.from_data(synthetic_data, embedding_dim=8, keep_rate=1.0).eval()
    assert model.loss(*batch)[0].item() == model.loss(*batch)[0].item()


@pytest.mark.parametrize('cls, options, error, match', [
    (MGCN, {'knn_k': 200}, ValueError, "'knn_k' must be smaller than the number of items"),
    (MGCN, {'temperature': 0.0}, ValueError, "'temperature'"),
    (MGCN, {'cl_weight': -1.0}, ValueError, "'cl_weight'"),
    (MGCN, {'num_ui_layers': -1}, ValueError, "'num_ui_layers'"),
    (MGCN, {'cl_loss': 0.1}, TypeError, 'unknown option'),        # MMRec's name
    (LGMRec, {'keep_rate': 0.0}, ValueError, r"'keep_rate' must be in \(0, 1\]"),
    (LGMRec, {'keep_rate': 1.5}, ValueError, "'keep_rate'"),
    (LGMRec, {'num_hyper_layers': 0}, ValueError, "'num_hyper_layers' must be an int >= 1"),
    (LGMRec, {'num_hyperedges': 0}, ValueError, "'num_hyperedges' must be an int >= 1"),
    (LGMRec, {'temperature': -0.2}, ValueError, "'temperature'"),
    (LGMRec, {'alpha': -1.0}, ValueError, "'alpha'"),
    (LGMRec, {'hyper_num': 4}, TypeError, 'unknown option'),
])
def test_option_errors(synthetic_data, cls, options, error, match):
    assert synthetic_data[ITEM].num_nodes == 200
    with pytest.raises(error, match=match):
        cls.from_data(synthetic_data, **options)


# ---------------------------------------------------------------------------
# any number of modalities
# ---------------------------------------------------------------------------

def _with_modalities(data, names):
    data = copy.copy(data)
    base = data[ITEM][data.modalities[0]]
    for k, name in enumerate(names):
        if name not in data.modalities:
            data[ITEM][name] = base[:, k::2] + 0.1 * torch.randn_like(base[:, k::2])
    data.modalities = list(names)
    return data


@pytest.mark.parametrize('names', [['text'], ['image', 'text', 'extra']])
def test_one_or_three_modalities(synthetic_data, names):
    data = _with_modalities(synthetic_data, names)
    batch = _batch(data)
    mgcn = MGCN.from_data(data, embedding_dim=8)
    assert len(mgcn.feature_proj) == len(names)
    mgcn.loss(*batch)[0].backward()
    lgmrec = LGMRec.from_data(data, embedding_dim=8)
    loss, parts = lgmrec.loss(*batch)
    loss.backward()
    assert ('hcl' in parts) == (len(names) > 1)
    with torch.no_grad():
        assert all(torch.isfinite(e).all() for e in mgcn.eval().embeddings())
        assert all(torch.isfinite(e).all() for e in lgmrec.eval().embeddings())


# ---------------------------------------------------------------------------
# a short training learns: beats the popularity ranking on validation
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def embedded(tmp_path_factory):
    """The embedded synthetic set (2000 users, 1000 items), its validation
    evaluator and the Recall@20 of ranking every user's items by popularity."""
    data = load_synthetic(tmp_path_factory.mktemp('embedded'))
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20, ))
    counts = torch.zeros(data[ITEM].num_nodes).index_add_(
        0, data[USER_ITEM].edge_index[1], torch.ones(data[USER_ITEM].edge_index.size(1)))
    floor = evaluator.evaluate(lambda u: counts.repeat(u.numel(), 1))['recall@20']
    return data, evaluator, floor


@pytest.mark.slow
@pytest.mark.parametrize('cls, lr, epochs', [(MGCN, 5e-3, 8), (LGMRec, 2e-2, 4)])
def test_short_training_beats_popularity(embedded, cls, lr, epochs):
    data, evaluator, popularity = embedded
    torch.manual_seed(0)

    def recall(model):
        model.eval()
        with torch.no_grad():
            embeddings = model.embeddings()
            return evaluator.evaluate(
                lambda u: model.score_all_items(u, embeddings))['recall@20']

    model = cls.from_data(data)
    untrained = recall(model)
    sampler = BPRSampler.from_data(data, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch, batch in ((e, b) for e in range(epochs) for b in sampler.batches(e, 2048)):
        model.on_epoch_start(epoch)  # a no-op for both models
        optimizer.zero_grad()
        model.loss(*batch)[0].backward()
        optimizer.step()
    trained = recall(model)
    assert trained > popularity + 0.03, (trained, popularity)
    assert trained > untrained + 0.05, (trained, untrained)
