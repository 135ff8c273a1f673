"""CRANE: equivariance, ablation switches, graph rebuild, edge dropout and
exact references for its building blocks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

from crane_pyg.data import ITEM, ITEM_ITEM, USER, USER_ITEM
from crane_pyg.models import CRANE
from crane_pyg.models.base import degree_sensitive_edge_sample, epoch_generator
from crane_pyg.nn import InfoNCE
from crane_pyg.transforms import ItemKNNGraph, knn_adjacency
from torch_geometric.utils import to_dense_adj

DIM = 16


@pytest.fixture(scope='module')
def knn_data(synthetic_data):
    return ItemKNNGraph(k=10)(copy.copy(synthetic_data))


def _batch(data, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = data[USER_ITEM].edge_index
    pick = torch.randperm(edge_index.size(1), generator=g)[:size]
    neg = torch.randint(0, data[ITEM].num_nodes, (size, ), generator=g)
    return edge_index[0, pick], edge_index[1, pick], neg


def _dense(index, weight, n):
    """Dense matrix (rows receive) of a graph stored source -> target, as PyG does."""
    return to_dense_adj(index, edge_attr=weight, max_num_nodes=n)[0].t().double()


def _mean_matrix(data):
    """[U, I] row-normalised interaction matrix (mean over a user's items)."""
    edge_index = data[USER_ITEM].edge_index
    r = torch.zeros(data[USER].num_nodes, data[ITEM].num_nodes, dtype=torch.float64)
    r[edge_index[0], edge_index[1]] = 1.0
    return r / r.sum(1, keepdim=True).clamp_min(1.0), r


def _model(data, **options):
    torch.manual_seed(0)
    return CRANE.from_data(data, embedding_dim=DIM, **options)


def _relabel(data, perm_user=None, perm_item=None):
    """A copy of ``data`` whose user (item) ``i`` is renamed ``perm[i]``."""
    num_users, num_items = data[USER].num_nodes, data[ITEM].num_nodes
    pu = torch.arange(num_users) if perm_user is None else perm_user
    pi = torch.arange(num_items) if perm_item is None else perm_item
    inv_i = torch.empty_like(pi)
    inv_i[pi] = torch.arange(num_items)
    out = HeteroData()
    out.name = data.name
    out.modalities = list(data.modalities)
    out[USER].num_nodes = num_users
    out[ITEM].num_nodes = num_items
    for m in data.modalities:
        out[ITEM][m] = data[ITEM][m][inv_i]  # new row pi[i] = old row i
    edge_index = data[USER_ITEM].edge_index
    out[USER_ITEM].edge_index = torch.stack([pu[edge_index[0]], pi[edge_index[1]]])
    out[ITEM_ITEM].edge_index = pi[data[ITEM_ITEM].edge_index]
    out[ITEM_ITEM].edge_weight = data[ITEM_ITEM].edge_weight.clone()
    return out


# ---------------------------------------------------------------------------
# equivariance
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('side', ['user', 'item'])
def test_permutation_equivariance(knn_data, side):
    g = torch.Generator().manual_seed(1)
    num_users, num_items = knn_data[USER].num_nodes, knn_data[ITEM].num_nodes
    pu = torch.randperm(num_users, generator=g) if side == 'user' else None
    pi = torch.randperm(num_items, generator=g) if side == 'item' else None
    model = _model(knn_data).eval()
    permuted = _model(_relabel(knn_data, pu, pi)).eval()
    state = model.state_dict()
    if pu is not None:
        state['user_embedding.weight'] = torch.empty_like(state['user_embedding.weight'])
        state['user_embedding.weight'][pu] = model.user_embedding.weight.detach()
    if pi is not None:
        state['item_embedding.weight'] = torch.empty_like(state['item_embedding.weight'])
        state['item_embedding.weight'][pi] = model.item_embedding.weight.detach()
    permuted.load_state_dict(state)
    users = torch.arange(num_users)
    with torch.no_grad():
        scores = model.score_all_items(users)
        scores_p = permuted.score_all_items(users)
    if pu is not None:
        torch.testing.assert_close(scores_p[pu], scores, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(scores_p[:, pi], scores, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# building blocks against dense references
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['mean', 'sym'])
@pytest.mark.parametrize('precompute', [True, False])
def test_profiles_are_aggregated_encoded_features(knn_data, norm, precompute):
    model = _model(knn_data, profile_norm=norm, precompute_profiles=precompute).eval()
    mean, r = _mean_matrix(knn_data)
    if norm == 'mean':
        a = mean
    else:
        du, di = r.sum(1, keepdim=True), r.sum(0, keepdim=True)
        a = r / (du.clamp_min(1).sqrt() * di.clamp_min(1).sqrt())
    with torch.no_grad():
        x_item = model.encode_items()  # [I, M, d]
        ref = torch.einsum('ui,imd->umd', a, x_item.double())
        out = model.profiles(x_item, None, model.encoders)
        sub = model.profiles(x_item, torch.tensor([3, 1, 3]), model.encoders)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub, out[[3, 1, 3]])
    for m, encoder in enumerate(model.encoders):
        torch.testing.assert_close(x_item[:, m], encoder(knn_data[ITEM][knn_data.modalities[m]]))


def test_users_without_items_get_zero_profiles(knn_data):
    data = copy.copy(knn_data)
    edge_index = knn_data[USER_ITEM].edge_index
    data[USER_ITEM].edge_index = edge_index[:, edge_index[0] != 0]  # user 0 loses its items
    for precompute in (True, False):
        model = _model(data, precompute_profiles=precompute).eval()
        with torch.no_grad():
            p = model.profiles(model.encode_items(), torch.tensor([0, 1]), model.encoders)
            assert torch.all(p[0] == 0) and p[1].abs().sum() > 0
            assert torch.isfinite(model.embeddings()[0]).all()


def _reference_parts(model, data, mode):
    """Dense float64 pieces of the semantic view: the users' mean matrix, the
    item graph S and the RCA codes of all items and (unless ``mode ==
    'items'``) all users' profiles."""
    mean, _ = _mean_matrix(data)
    s = _dense(model.item_adj_index, model.item_adj_weight, model.num_items)
    with torch.no_grad():
        x_item = model.encode_items()
        z_item = model.rca(x_item).double()
        z_user = (None if mode == 'items'
                  else model.rca(model.profiles(x_item, None, model.encoders)).double())
    return mean, s, z_item, z_user


@pytest.mark.parametrize('mode', ['profile', 'items', 'both'])
@pytest.mark.parametrize('scale', [None, 0.5])
def test_semantic_view(knn_data, mode, scale):
    model = _model(knn_data, user_semantic=mode, num_ii_layers=2,
                   semantic_scale=scale).eval()
    mean, s, z_item, z_user = _reference_parts(model, knn_data, mode)
    with torch.no_grad():
        h_user, h_item = model.semantic()
        users = torch.tensor([5, 2, 9])
        h_user_sub, h_item_again = model.semantic(users)
    ref_item = s @ (s @ z_item)
    if mode == 'items':
        assert model.profiles is None  # profiles are not computed
        ref_user = mean @ ref_item
    else:
        ref_user = z_user if mode == 'profile' else 0.5 * (z_user + mean @ ref_item)
    if scale is not None:  # rows L2-normalised, then scaled
        ref_item = scale * ref_item / ref_item.norm(dim=-1, keepdim=True)
        ref_user = scale * ref_user / ref_user.norm(dim=-1, keepdim=True)
        assert torch.allclose(h_item.norm(dim=-1), torch.full_like(h_item[:, 0], scale))
    torch.testing.assert_close(h_item.double(), ref_item, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_user.double(), ref_user, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_user_sub, h_user[users], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_item_again, h_item)


@pytest.mark.parametrize('mode', ['profile', 'items', 'both'])
def test_semantic_gate_gates_the_id_embeddings_with_the_codes(knn_data, mode):
    model = _model(knn_data, user_semantic=mode, semantic_gate=True,
                   semantic_scale=None).eval()
    mean, s, z_item, z_user = _reference_parts(model, knn_data, mode)
    with torch.no_grad():
        e_item = model.item_embedding.weight.double()
        e_user = model.user_embedding.weight.double()
        h_user, h_item = model.semantic()
    ref_item = s @ (e_item * torch.sigmoid(z_item))
    ref_mean = mean @ ref_item
    if mode == 'items':
        ref_user = ref_mean
    else:
        ref_profile = e_user * torch.sigmoid(z_user)
        ref_user = ref_profile if mode == 'profile' else 0.5 * (ref_profile + ref_mean)
    torch.testing.assert_close(h_item.double(), ref_item, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_user.double(), ref_user, atol=1e-5, rtol=1e-5)
    # without the gate the view is a function of the content alone: the ID
    # embeddings get no gradient from it; with it they do
    for gate in (False, True):
        model = _model(knn_data, user_semantic=mode, semantic_gate=gate,
                       semantic_scale=None, id_item_graph=False)
        h_user, h_item = model.semantic()
        (h_user.sum() + h_item.sum()).backward()
        assert (model.item_embedding.weight.grad is not None) == gate
        assert (model.user_embedding.weight.grad is not None) == (gate and mode != 'items')


def test_item_graph_is_the_transforms_matrix(knn_data):
    model = _model(knn_data)
    store = knn_data[ITEM_ITEM]
    s_doc = to_dense_adj(store.edge_index, edge_attr=store.edge_weight,
                         max_num_nodes=model.num_items)[0].t().double()
    s_model = _dense(model.item_adj_index, model.item_adj_weight, model.num_items)
    torch.testing.assert_close(s_model, s_doc)
    # row i (what item i aggregates) holds i's own top-k cosine neighbours
    for m in knn_data.modalities:
        x = F.normalize(knn_data[ITEM][m], dim=-1)
        top = (x @ x.t()).topk(10, dim=1).indices
        assert bool((s_model.gather(1, top) > 0).all()), m
    # binary kNN rows have k entries of 1/k per modality: rows sum to one
    torch.testing.assert_close(s_model.sum(1), torch.ones(model.num_items, dtype=torch.float64))


def _behavioural_pair(data, base, other):
    """Two CRANEs with the same weights, options ``base`` and ``base | other``:
    both models, both behavioural views and S^L_ii E_I (L_ii = 2, dense)."""
    plain = _model(data, num_ii_layers=2, **base)
    changed = _model(data, num_ii_layers=2, **{**base, **other})
    changed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        views = plain.behavioural(), changed.behavioural()
    s = _dense(plain.item_adj_index, plain.item_adj_weight, plain.num_items)
    return plain, changed, views, s @ (s @ plain.item_embedding.weight.double())


def test_id_item_graph_adds_the_smoothed_item_ids(knn_data):
    """``id_item_graph=True``: the behavioural item view gains S^L_ii E_I (the
    dense item matrix times the ID table); the user view is unchanged."""
    assert CRANE.option_defaults()['id_item_graph'] is True
    _, _, ((e_user, e_item), (s_user, s_item)), smoothed = _behavioural_pair(
        knn_data, dict(id_item_graph=False), dict(id_item_graph=True))
    expected = e_item.double() + smoothed
    torch.testing.assert_close(s_user, e_user)
    torch.testing.assert_close(s_item.double(), expected, atol=1e-6, rtol=1e-5)
    # without an item graph (the ablation) there is nothing to smooth over
    for options in (dict(use_item_graph=False), dict(num_ii_layers=0)):
        model = _model(knn_data, id_item_graph=True, **options)
        assert not model.id_item_graph


def test_id_item_graph_users_adds_r_hat_of_the_smoothed_item_ids(knn_data):
    """``id_item_graph_users=True``: the behavioural user view also gains
    D_U^-1/2 R D_I^-1/2 S^L_ii E_I (dense, by hand, full training graph); the
    item view is that of ``id_item_graph`` alone; the loss trains through it;
    mini-batch training refuses the option."""
    from crane_pyg.models import MiniBatchCRANE
    assert CRANE.option_defaults()['id_item_graph_users'] is False
    plain, users, ((e_user, e_item), (u_user, u_item)), smoothed = _behavioural_pair(
        knn_data, {}, dict(id_item_graph_users=True))
    r = torch.zeros(plain.num_users, plain.num_items, dtype=torch.float64)
    r[plain.edge_index[0], plain.edge_index[1]] = 1.0
    du, di = r.sum(1), r.sum(0)
    r_hat = (torch.where(du > 0, du.pow(-0.5), torch.zeros_like(du))[:, None] * r
             * torch.where(di > 0, di.pow(-0.5), torch.zeros_like(di))[None, :])
    torch.testing.assert_close(u_item, e_item)
    torch.testing.assert_close(u_user.double(), e_user.double() + r_hat @ smoothed,
                               atol=1e-6, rtol=1e-5)
    assert 'id_item_graph_users=True' in repr(users)
    users.train()
    loss, _ = users.loss(*_batch(knn_data))
    loss.backward()
    assert users.item_embedding.weight.grad.abs().sum() > 0
    # without the ID item graph the option has nothing to add
    assert not _model(knn_data, id_item_graph=False, id_item_graph_users=True).id_item_graph_users
    with pytest.raises(ValueError, match='id_item_graph_users=True is not supported by '
                                         'mini-batch'):
        MiniBatchCRANE(users, [2, 2])


def test_cl_pair_ui_ii_ties_the_two_graphs_id_views(knn_data):
    """``cl_pair='ui_ii'``: the contrastive term is InfoNCE between the
    user-item (LightGCN) view and the item-item view of the IDs, for the
    batch's unique users and unique positives; the rest of the loss is that
    of ``'id_semantic'``; the option needs the users' item-graph view."""
    options = dict(id_item_graph_users=True, lambda_cl=0.5, cl_max_nodes=None)
    graphs = _model(knn_data, cl_pair='ui_ii', **options).train()
    semantic = _model(knn_data, **options).train()
    semantic.load_state_dict(graphs.state_dict())
    users, pos, neg = _batch(knn_data)
    _, parts = graphs.loss(users, pos, neg)
    _, parts_semantic = semantic.loss(users, pos, neg)
    with torch.no_grad():
        ui_user, ui_item, g_user, g_item = graphs.behavioural_parts(train_graph=True)
        batch_users, batch_items = torch.unique(users), torch.unique(pos)
        nce = InfoNCE(temperature=graphs.info_nce.temperature)
        expected = 0.5 * (nce(ui_user[batch_users], g_user[batch_users])
                          + nce(ui_item[batch_items], g_item[batch_items]))
        torch.testing.assert_close(ui_user + g_user, graphs.behavioural(True)[0])
    assert parts['cl'] == pytest.approx(expected.item(), rel=1e-5)
    assert parts['cl'] != pytest.approx(parts_semantic['cl'], rel=1e-3)
    assert parts['bpr'] == pytest.approx(parts_semantic['bpr'], rel=1e-6)
    assert "cl_pair='ui_ii'" in repr(graphs)
    with pytest.raises(ValueError, match="cl_pair='ui_ii' needs the item-item view"):
        _model(knn_data, cl_pair='ui_ii')
    with pytest.raises(ValueError, match="'cl_pair' must be one of"):
        _model(knn_data, cl_pair='graphs')


@pytest.mark.parametrize('fusion', ['sum', 'concat'])
def test_fusion_and_loss_by_hand(knn_data, fusion):
    """The loss (which evaluates the user semantic view on the batch's users
    only) equals the one computed from the full-graph views."""
    model = _model(knn_data, fusion=fusion, lambda_cl=0.3, lambda_reg=0.01).eval()
    users, pos, neg = _batch(knn_data)
    with torch.no_grad():
        e_user, e_item = model.behavioural()
        h_user, h_item = model.semantic()
        u_emb, i_emb = model.embeddings()
        loss, parts = model.loss(users, pos, neg)
    if fusion == 'sum':
        torch.testing.assert_close(u_emb, e_user + h_user)
        torch.testing.assert_close(i_emb, e_item + h_item)
    else:
        scores = model.score_all_items(torch.arange(model.num_users), (u_emb, i_emb))
        torch.testing.assert_close(scores, e_user @ e_item.t() + h_user @ h_item.t(),
                                   atol=1e-5, rtol=1e-5)
    x = (u_emb[users] * i_emb[pos]).sum(-1) - (u_emb[users] * i_emb[neg]).sum(-1)
    bpr = F.softplus(-x).mean()
    uu, ui = users.unique(), pos.unique()
    nce = InfoNCE(0.2)
    cl = 0.3 * (nce(e_user[uu], h_user[uu]) + nce(e_item[ui], h_item[ui]))
    ego = (model.user_embedding.weight[users].pow(2).sum()
           + model.item_embedding.weight[pos].pow(2).sum()
           + model.item_embedding.weight[neg].pow(2).sum())
    reg = 0.01 * 0.5 * ego / users.numel()
    assert parts['bpr'] == pytest.approx(bpr.item(), rel=1e-5)
    assert parts['cl'] == pytest.approx(cl.item(), rel=1e-5)
    assert parts['reg'] == pytest.approx(reg.item(), rel=1e-5)
    assert loss.item() == pytest.approx((bpr + cl + reg).item(), rel=1e-5)


def test_cl_max_nodes_subsamples_the_contrastive_sets(knn_data):
    """With more unique nodes than ``cl_max_nodes`` each InfoNCE term runs on
    a uniform subset of that size, drawn from the global generator: the value
    is the by-hand InfoNCE of exactly the drawn rows, and reseeding repeats it."""
    model = _model(knn_data, lambda_cl=0.3, cl_max_nodes=8).eval()
    users, pos, neg = _batch(knn_data)
    uu, ui = users.unique(), pos.unique()
    assert uu.numel() > 8 and ui.numel() > 8
    torch.manual_seed(5)
    with torch.no_grad():
        _, parts = model.loss(users, pos, neg)
        e_user, e_item = model.behavioural()
        h_user, h_item = model.semantic()
    # the same draws, in the order the loss makes them: items first, then users
    torch.manual_seed(5)
    pick_items = ui[torch.randperm(ui.numel())[:8]]
    pick_users = uu[torch.randperm(uu.numel())[:8]]
    nce = InfoNCE(0.2)
    expected = 0.3 * (nce(e_user[pick_users], h_user[pick_users])
                      + nce(e_item[pick_items], h_item[pick_items]))
    assert parts['cl'] == pytest.approx(expected.item(), rel=1e-5)
    full = _model(knn_data, lambda_cl=0.3, cl_max_nodes=None).eval()
    with torch.no_grad():
        _, full_parts = full.loss(users, pos, neg)
    assert full_parts['cl'] != pytest.approx(parts['cl'], rel=1e-3)
    assert full_parts['bpr'] == pytest.approx(parts['bpr'], rel=1e-6)
    with pytest.raises(ValueError, match='cl_max_nodes'):
        _model(knn_data, cl_max_nodes=1)


def test_content_reg_is_l2_on_encoder_and_rca_weights(knn_data):
    plain = _model(knn_data, lambda_cl=0.0)
    reg = _model(knn_data, lambda_cl=0.0, content_reg=0.05)
    reg.load_state_dict(plain.state_dict())
    batch = _batch(knn_data)
    loss_plain, _ = plain.loss(*batch)
    loss_reg, parts = reg.loss(*batch)
    weights = [reg.encoders[m].weight for m in range(len(reg.encoders))]
    block = reg.rca.blocks[0]
    weights += [block.lin_j.weight, block.lin_q.weight, block.lin_k.weight,
                block.lin_v.weight, block.lin_o.weight, reg.rca.lin_z.weight]
    expected = 0.5 * 0.05 * sum(w.detach().pow(2).sum() for w in weights)
    assert parts['content_reg'] == pytest.approx(expected.item(), rel=1e-5)
    assert loss_reg.item() == pytest.approx(loss_plain.item() + expected.item(), rel=1e-5)
    loss_reg.backward()  # the penalty's gradient reaches the encoder weights
    assert reg.encoders[0].weight.grad is not None and reg.encoders[0].bias.grad is not None


def test_lambda_cl_zero_disables_the_contrastive_term(knn_data):
    model = _model(knn_data, lambda_cl=0.0)
    _, parts = model.loss(*_batch(knn_data))
    assert set(parts) == {'bpr', 'reg'}


def test_no_node_by_node_tensor(knn_data):
    """Linear cost: no tensor saved for backward is node x node (U, I or U+I
    in two dimensions)."""
    model = _model(knn_data).train()
    node_sizes = {model.num_users, model.num_items, model.num_users + model.num_items}
    shapes = []

    def pack(t):
        if t.layout == torch.strided and t.dim() >= 2:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(*_batch(knn_data, size=64))
        model.embeddings()
    assert shapes
    big = [s for s in shapes if sum(dim in node_sizes for dim in s) >= 2]
    assert not big, big


# ---------------------------------------------------------------------------
# ablation switches
# ---------------------------------------------------------------------------

def test_use_rca_false_is_zero_recursions(knn_data):
    a = _model(knn_data, use_rca=False, num_recursions=2).eval()
    b = _model(knn_data, num_recursions=0).eval()
    assert a.rca.num_recursions == 0 and len(a.rca.blocks) == 0
    b.load_state_dict(a.state_dict())  # same parameter set
    with torch.no_grad():
        for x, y in zip(a.embeddings(), b.embeddings()):
            torch.testing.assert_close(x, y)
        x_item = a.encode_items()
        torch.testing.assert_close(a.rca(x_item), a.rca.lin_z(x_item.flatten(1)))
        full = _model(knn_data, num_recursions=2).eval()
        full.load_state_dict(a.state_dict(), strict=False)
        assert not torch.allclose(full.embeddings()[1], a.embeddings()[1])


def test_precomputed_profiles_change_nothing(knn_data):
    a = _model(knn_data, precompute_profiles=True).eval()
    b = _model(knn_data, precompute_profiles=False).eval()
    b.load_state_dict(a.state_dict())
    batch = _batch(knn_data)
    with torch.no_grad():
        for x, y in zip(a.embeddings(), b.embeddings()):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    la, lb = a.loss(*batch)[0], b.loss(*batch)[0]
    assert la.item() == pytest.approx(lb.item(), rel=1e-5)
    la.backward()
    lb.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_use_profiles_false_learns_user_semantic_ids(knn_data):
    model = _model(knn_data, use_profiles=False, user_semantic='profile',
                   semantic_scale=None).eval()
    assert model.user_semantic_embedding is not None
    assert model.profiles is None
    with torch.no_grad():
        h_user, _ = model.semantic()
    torch.testing.assert_close(h_user, model.user_semantic_embedding.weight)
    # 'items' needs no user semantic embedding at all
    assert _model(knn_data, use_profiles=False, user_semantic='items').user_semantic_embedding is None


def test_use_item_graph_false(synthetic_data):
    model = _model(synthetic_data, use_item_graph=False,
                   semantic_scale=None).eval()  # no kNN graph built
    assert model.item_conv is None and not hasattr(model, 'item_adj_index')
    with torch.no_grad():
        _, h_item = model.semantic()
        torch.testing.assert_close(h_item, model.rca(model.encode_items()))
    with pytest.raises(ValueError, match='needs the item graph'):
        _model(synthetic_data, use_item_graph=False, graph_rebuild_every=2)


def test_semantic_item_graph_false_keeps_the_graph_for_the_ids_only(knn_data):
    """``semantic_item_graph=False``: h_i = z_i (the codes unsmoothed, so with
    ``user_semantic='items'`` h_u is the mean of z over the user's items),
    while the behavioural view still gains S^L_ii E_I from the same graph."""
    assert CRANE.option_defaults()['semantic_item_graph'] is True
    base = dict(user_semantic='items', semantic_scale=None)
    plain, changed, ((e_user, e_item), (c_user, c_item)), _ = _behavioural_pair(
        knn_data, base, dict(semantic_item_graph=False))
    assert plain.semantic_item_graph and not changed.semantic_item_graph
    torch.testing.assert_close(c_user, e_user)
    torch.testing.assert_close(c_item, e_item)  # the ID view keeps the graph
    assert changed.id_item_graph
    mean, _ = _mean_matrix(knn_data)
    with torch.no_grad():
        h_user, h_item = changed.eval().semantic()
        _, h_item_smoothed = plain.eval().semantic()
        z_item = changed.rca(changed.encode_items())
    torch.testing.assert_close(h_item, z_item)
    torch.testing.assert_close(h_user.double(), mean @ z_item.double(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h_item_smoothed, h_item, atol=1e-4)  # the option did something
    with pytest.raises(ValueError, match='leave the item graph unused'):
        _model(knn_data, semantic_item_graph=False, id_item_graph=False)
    # without the graph the option changes nothing and needs nothing
    assert not _model(knn_data, use_item_graph=False, id_item_graph=False,
                      semantic_item_graph=False).semantic_item_graph


@pytest.mark.parametrize('options', [
    dict(use_rca=False), dict(use_profiles=False), dict(use_item_graph=False),
    dict(semantic_item_graph=False),
    dict(user_semantic='items'), dict(user_semantic='profile'), dict(fusion='concat'),
    dict(edge_dropout=0.5), dict(profile_norm='sym', precompute_profiles=False),
    dict(rca_dropout=0.2, num_ii_layers=0),
], ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_ablations_train(knn_data, options):
    model = _model(knn_data, **options).train()
    model.on_epoch_start(1)
    loss, _ = model.loss(*_batch(knn_data))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rca_dropout_only_in_training(knn_data):
    model = _model(knn_data, rca_dropout=0.5)
    batch = _batch(knn_data)
    with torch.no_grad():
        model.eval()
        assert model.loss(*batch)[0].item() == model.loss(*batch)[0].item()
        model.train()
        assert model.loss(*batch)[0].item() != model.loss(*batch)[0].item()


# ---------------------------------------------------------------------------
# per-epoch state: edge dropout and item graph rebuild
# ---------------------------------------------------------------------------

def test_edge_dropout(knn_data):
    num_edges = knn_data[USER_ITEM].edge_index.size(1)
    model = _model(knn_data, edge_dropout=0.3, seed=7)
    model.on_epoch_start(4)
    e4 = model.train_edge_index.clone()
    assert e4.size(1) == int(num_edges * 0.7)
    keep = degree_sensitive_edge_sample(knn_data[USER_ITEM].edge_index, model.num_users,
                                        model.num_items, 0.3, epoch_generator(7, 4))
    assert torch.equal(e4, knn_data[USER_ITEM].edge_index[:, keep])
    model.on_epoch_start(5)
    assert model.train_edge_index.size(1) == e4.size(1)
    assert not torch.equal(model.train_edge_index, e4)
    fresh = _model(knn_data, edge_dropout=0.3, seed=7)
    fresh.on_epoch_start(4)
    assert torch.equal(fresh.train_edge_index, e4)
    # the pruned graph is used in training only
    with torch.no_grad():
        e_train = fresh.behavioural(train_graph=True)[0]
        e_full = fresh.behavioural(train_graph=False)[0]
        assert not torch.allclose(e_train, e_full)
        torch.testing.assert_close(fresh.eval().embeddings()[0],
                                   _model(knn_data).eval().embeddings()[0])
    assert 'train_edge_index' not in model.state_dict()


def test_graph_rebuild(knn_data):
    beta = 0.3
    model = _model(knn_data, graph_rebuild_every=2, rebuild_mix=beta).train()
    raw = _dense(model.item_adj_index, model.item_adj_weight, model.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def snapshot():
        return model.item_adj_index.clone(), model.item_adj_weight.clone()

    def train_step():
        optimizer.zero_grad()
        model.loss(*_batch(knn_data))[0].backward()
        optimizer.step()

    graphs = {}
    for epoch in range(5):
        before = snapshot()
        model.on_epoch_start(epoch)
        assert model.training
        after = snapshot()
        changed = not (torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]))
        assert changed == (epoch in (2, 4)), epoch
        if epoch in (2, 4):
            with torch.no_grad():
                z = model.eval().rca(model.encode_items())
            model.train()
            new_index, new_weight = knn_adjacency([z], 10)
            new = to_dense_adj(new_index, edge_attr=new_weight,
                               max_num_nodes=model.num_items)[0].t().double()
            torch.testing.assert_close(_dense(*after, model.num_items),
                                       beta * raw + (1 - beta) * new)
            graphs[epoch] = after
        train_step()
    assert graphs[2][0].size(1) != graphs[4][0].size(1) or not torch.equal(graphs[2][1],
                                                                            graphs[4][1])

    # the rebuilt graph is in the state_dict and loads into a fresh model,
    # whose buffers have another number of entries
    state = model.state_dict()
    assert torch.equal(state['item_adj_index'], model.item_adj_index)
    fresh = _model(knn_data, graph_rebuild_every=2, rebuild_mix=beta).eval()
    assert fresh.item_adj_index.size(1) != model.item_adj_index.size(1)
    with torch.no_grad():
        fresh.embeddings()  # fills the propagation caches with the raw graph
    fresh.load_state_dict(state)
    assert torch.equal(fresh.item_adj_index, model.item_adj_index)
    assert torch.equal(fresh.item_adj_weight, model.item_adj_weight)
    model.eval()
    with torch.no_grad():
        for x, y in zip(model.embeddings(), fresh.embeddings()):
            torch.testing.assert_close(x, y)
    # the raw graph stays the reference of later rebuilds
    torch.testing.assert_close(_dense(fresh.raw_item_adj_index, fresh.raw_item_adj_weight,
                                      fresh.num_items), raw)
    # a checkpoint of format 1 (before issue 13: the graph stored receiver
    # first, no version in its metadata) is turned source -> target
    old = type(state)((k, v.flip(0) if k == 'item_adj_index' else v) for k, v in state.items())
    old._metadata = {k: {n: v for n, v in meta.items() if n != 'version'}
                     for k, meta in state._metadata.items()}
    older = _model(knn_data, graph_rebuild_every=2, rebuild_mix=beta).eval()
    older.load_state_dict(old)
    assert torch.equal(older.item_adj_index, model.item_adj_index)


def test_graph_rebuild_ignores_rca_dropout(knn_data):
    a = _model(knn_data, graph_rebuild_every=1, rca_dropout=0.5).train()
    b = _model(knn_data, graph_rebuild_every=1, rca_dropout=0.5).train()
    a.on_epoch_start(1)
    b.on_epoch_start(1)
    assert torch.equal(a.item_adj_index, b.item_adj_index)
    assert torch.equal(a.item_adj_weight, b.item_adj_weight)


# ---------------------------------------------------------------------------
# torch.compile of RCA (train.compile)
# ---------------------------------------------------------------------------

def test_compiled_rca_gives_the_eager_loss_gradients_and_embeddings(knn_data):
    eager = _model(knn_data, lambda_cl=0.1)
    compiled = copy.deepcopy(eager)
    assert compiled.compile_modules() == ['rca']
    assert list(compiled.state_dict()) == list(eager.state_dict())
    # two batches with different numbers of unique users: one dynamic-shape graph
    for size, seed in ((64, 0), (40, 1)):
        users, pos, neg = _batch(knn_data, size=size, seed=seed)
        losses = []
        for model in (eager, compiled):
            model.train()
            model.zero_grad()
            torch.manual_seed(seed)  # the same contrastive subsets
            loss, _ = model.loss(users, pos, neg)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        grads = dict(eager.named_parameters())
        for name, p in compiled.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f'{name}: {m}')
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        for a, b in zip(compiled.embeddings(), eager.embeddings()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_modules_without_recursions_compiles_nothing(knn_data):
    model = _model(knn_data, num_recursions=0)
    assert model.compile_modules() == []
    assert model.rca._compiled_call_impl is None


@pytest.mark.parametrize('fusion', ['sum', 'concat'])
def test_view_embeddings_split_the_fused_score(knn_data, fusion):
    model = _model(knn_data, fusion=fusion).eval()
    with torch.no_grad():
        full = model.view_embeddings('full')
        e = model.view_embeddings('behavioural')
        h = model.view_embeddings('semantic')
        embeddings = model.embeddings()
    for a, b in zip(full, embeddings):
        torch.testing.assert_close(a, b)
    for fused, cf, sem in zip(full, e, h):
        torch.testing.assert_close(fused, cf + sem if fusion == 'sum'
                                   else torch.cat([cf, sem], dim=-1))
    if fusion == 'concat':  # the score is the ID score plus the content score
        scores = full[0] @ full[1].t()
        torch.testing.assert_close(scores, e[0] @ e[1].t() + h[0] @ h[1].t())
    assert torch.allclose(h[1].norm(dim=-1), torch.full_like(h[1][:, 0], 0.2))
    with pytest.raises(ValueError, match='view'):
        model.view_embeddings('content')


def test_learned_semantic_scale(knn_data):
    model = _model(knn_data, learn_semantic_scale=True, semantic_scale=0.5)
    torch.testing.assert_close(model.log_semantic_scale.detach().exp(),
                               torch.tensor([0.5, 0.5]))
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    model.loss(users, pos, neg)[0].backward()
    assert model.log_semantic_scale.grad.abs().min() > 0  # both scales are trained
    with torch.no_grad():
        model.log_semantic_scale.copy_(torch.log(torch.tensor([2.0, 3.0])))
        h_user, h_item = model.semantic()
    assert torch.allclose(h_user.norm(dim=-1), torch.full_like(h_user[:, 0], 2.0))
    assert torch.allclose(h_item.norm(dim=-1), torch.full_like(h_item[:, 0], 3.0))
    assert 'log_semantic_scale' in model.state_dict()
    with pytest.raises(ValueError, match='learn_semantic_scale'):
        _model(knn_data, learn_semantic_scale=True, semantic_scale=None)


@pytest.mark.parametrize('reg_form', ['squared', 'mmrec'])
def test_crane_reg_form(knn_data, reg_form):
    model = _model(knn_data, reg_form=reg_form, lambda_cl=0.0, lambda_reg=0.5).eval()
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    ego = [model.user_embedding.weight[users], model.item_embedding.weight[pos],
           model.item_embedding.weight[neg]]
    with torch.no_grad():
        _, parts = model.loss(users, pos, neg)
    if reg_form == 'mmrec':
        expected = 0.5 * sum(e.norm().item() for e in ego) / 3
    else:
        expected = 0.5 * 0.5 * sum(e.pow(2).sum().item() for e in ego) / 3
    assert parts['reg'] == pytest.approx(expected, rel=1e-5)


def test_view_bpr_scores_each_view_alone(knn_data):
    model = _model(knn_data, view_bpr=0.5, lambda_cl=0.0).eval()
    users, pos, neg = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3]), \
        torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        _, parts = model.loss(users, pos, neg)
        plain = _model(knn_data, lambda_cl=0.0).eval().loss(users, pos, neg)[1]
        expected = 0.0
        for view in ('behavioural', 'semantic'):
            u, i = model.view_embeddings(view)
            x = (u[users] * i[pos]).sum(-1) - (u[users] * i[neg]).sum(-1)
            expected += F.softplus(-x).mean().item()
    assert parts['view_bpr'] == pytest.approx(0.5 * expected, rel=1e-5)
    assert parts['bpr'] == pytest.approx(plain['bpr'], rel=1e-6)  # the fused term is unchanged
    assert 'view_bpr' not in plain


def test_cl_target_semantic_leaves_the_id_view_to_the_ranking_loss(knn_data):
    users, pos, neg = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3]), \
        torch.tensor([3, 4, 5, 6])
    grads = {}
    for name, options in {'off': dict(lambda_cl=0.0),
                          'semantic': dict(lambda_cl=1.0, cl_target='semantic'),
                          'both': dict(lambda_cl=1.0, cl_target='both')}.items():
        model = _model(knn_data, **options).eval()
        loss, parts = model.loss(users, pos, neg)
        loss.backward()
        grads[name] = (model.user_embedding.weight.grad.clone(),
                       model.encoders[0].weight.grad.clone())
    # the contrastive term changes no ID gradient with cl_target='semantic' ...
    torch.testing.assert_close(grads['semantic'][0], grads['off'][0])
    # ... but still trains the content side, and moves the ID view with 'both'
    assert not torch.allclose(grads['semantic'][1], grads['off'][1])
    assert not torch.allclose(grads['both'][0], grads['off'][0])
