import math

import pytest
import torch
from conftest import require_dataset
from torch_geometric.data import HeteroData
from torch_geometric.metrics import (LinkPredHitRatio, LinkPredMAP,
                                     LinkPredNDCG, LinkPredPrecision,
                                     LinkPredRecall)

from crane_pyg.data import load_mmrec
from crane_pyg.metrics import (METRIC_NAMES, FullRankingEvaluator,
                               ranking_metrics)

USER_ITEM = ('user', 'interacts', 'item')


def _edges(pairs):
    return torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)


# ---------------------------------------------------------------------------
# A hand-made example: 5 users, 8 items.
#   user 0: train {0}, valid {1, 5}, test {3}
#   user 1: train {6, 7}, valid {0, 1, 2, 3, 4} (more relevant items than k)
#   user 2: train {3}, valid {7} (no hit in the valid top-4), test {0}
#   user 3: no train, valid {2}, test {4} (must be excluded)
#   user 4: train {1}, nothing held out (not evaluated)
# ---------------------------------------------------------------------------
SCORES = torch.tensor([
    [9., 8., 1., 7., 2., 6., 3., 4.],
    [1., 2., 3., 4., 5., 6., 7., 8.],
    [8., 7., 6., 9., 5., 4., 3., 2.],
    [0., 1., 2., 3., 4., 5., 6., 7.],
    [7., 6., 5., 4., 3., 2., 1., 0.],
])


def hand_data() -> HeteroData:
    data = HeteroData()
    data['user'].num_nodes = 5
    data['item'].num_nodes = 8
    store = data[USER_ITEM]
    store.edge_index = _edges([(0, 0), (1, 6), (1, 7), (2, 3), (4, 1)])
    store.val_edge_index = _edges([(0, 1), (0, 5), (1, 0), (1, 1), (1, 2),
                                   (1, 3), (1, 4), (2, 7), (3, 2)])
    store.test_edge_index = _edges([(0, 3), (2, 0), (3, 4)])
    data['user'].has_train = torch.tensor([True, True, True, False, True])
    return data


def table_score_fn(table):
    return lambda users: table[users]


def test_ranking_metrics_hand_computed():
    # Valid top-4 after masking training items (see hand_data):
    #   user 0: [1, 3, 5, 7] -> hits [1, 0, 1, 0], 2 relevant
    #   user 1: [5, 4, 3, 2] -> hits [0, 1, 1, 1], 5 relevant
    #   user 2: [0, 1, 2, 4] -> no hit,            1 relevant
    hits = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]).bool()
    out = ranking_metrics(hits, torch.tensor([2, 5, 1]), ks=(2, 4))
    assert list(out) == [f'{m}@{k}' for m in METRIC_NAMES for k in (2, 4)]
    expected = {
        'recall@2': [0.5, 0.2, 0.0],
        'recall@4': [1.0, 0.6, 0.0],
        'precision@2': [0.5, 0.5, 0.0],
        'precision@4': [0.5, 0.75, 0.0],
        'hit@2': [1.0, 1.0, 0.0],
        'hit@4': [1.0, 1.0, 0.0],
        # DCG 1, IDCG 1 + 1/log2(3); DCG 1/log2(3), same IDCG
        'ndcg@2': [0.6131472, 0.3868528, 0.0],
        # DCG 1 + 1/2; DCG 1/log2(3) + 1/2 + 1/log2(5), IDCG over 4 positions
        'ndcg@4': [0.9197208, 0.6096200, 0.0],
        # (1/1) / min(2, 2); (1/2) / min(5, 2)
        'map@2': [0.5, 0.25, 0.0],
        # (1 + 2/3) / 2; (1/2 + 2/3 + 3/4) / min(5, 4)
        'map@4': [0.8333333, 0.4791667, 0.0],
    }
    for name, value in expected.items():
        torch.testing.assert_close(out[name], torch.tensor(value), atol=1e-6,
                                   rtol=0, msg=name)


def test_evaluator_hand_computed_valid():
    evaluator = FullRankingEvaluator(hand_data(), split='valid', ks=(2, 4),
                                     batch_size=2)
    assert evaluator.users.tolist() == [0, 1, 2]  # user 3 has no train
    assert evaluator.num_users == 3
    assert evaluator.num_users_without_train == 1
    assert evaluator.num_relevant.tolist() == [2, 5, 1]
    out = evaluator.evaluate(table_score_fn(SCORES))
    expected = {
        'recall@2': 0.2333333, 'recall@4': 0.5333333,
        'ndcg@2': 0.3333333, 'ndcg@4': 0.5097802,
        'precision@2': 0.3333333, 'precision@4': 0.4166667,
        'map@2': 0.25, 'map@4': 0.4375,
        'hit@2': 0.6666667, 'hit@4': 0.6666667,
    }
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name] == pytest.approx(value, abs=1e-6), name
    top = evaluator.recommend(table_score_fn(SCORES), torch.tensor([0, 1, 2]))
    assert top.tolist() == [[1, 3, 5, 7], [5, 4, 3, 2], [0, 1, 2, 4]]


def test_test_split_masks_train_not_valid():
    data = hand_data()
    # user 0: train {0} masked; valid item 1 (score 8) stays in the ranking
    # and pushes test item 3 to rank 2; user 2: test item 0 ranks first.
    plain = FullRankingEvaluator(data, split='test', ks=(1, 2))
    assert plain.users.tolist() == [0, 2]
    assert plain.num_users_without_train == 1
    out = plain.evaluate(table_score_fn(SCORES))
    assert out['recall@1'] == pytest.approx(0.5)
    assert out['recall@2'] == pytest.approx(1.0)
    assert out['ndcg@2'] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert plain.recommend(table_score_fn(SCORES), [0]).tolist() == [[1, 3]]

    strict = FullRankingEvaluator(data, split='test', ks=(1, 2),
                                  mask_valid_in_test=True)
    out = strict.evaluate(table_score_fn(SCORES))
    assert out['recall@1'] == pytest.approx(1.0)
    assert out['ndcg@2'] == pytest.approx(1.0)
    assert strict.recommend(table_score_fn(SCORES), [0]).tolist() == [[3, 7]]


def random_data(num_users=60, num_items=40, seed=0, loo=False):
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(num_users, num_items, generator=g).argsort(dim=1)
    n_train = torch.randint(0, 6, (num_users, ), generator=g)
    n_val = torch.randint(0, 4, (num_users, ), generator=g)
    n_test = (torch.ones(num_users, dtype=torch.long) if loo else
              torch.randint(0, 25, (num_users, ), generator=g))
    pos = torch.arange(num_items).expand(num_users, -1)
    users = torch.arange(num_users).view(-1, 1).expand(-1, num_items)
    train = pos < n_train.view(-1, 1)
    val = (pos >= n_train.view(-1, 1)) & (pos < (n_train + n_val).view(-1, 1))
    test = (pos >= (n_train + n_val).view(-1, 1)) & (
        pos < (n_train + n_val + n_test).view(-1, 1))

    def pairs(mask):
        return torch.stack([users[mask], perm[mask]])

    data = HeteroData()
    data['user'].num_nodes = num_users
    data['item'].num_nodes = num_items
    data[USER_ITEM].edge_index = pairs(train)
    data[USER_ITEM].val_edge_index = pairs(val)
    data[USER_ITEM].test_edge_index = pairs(test)
    data['user'].has_train = n_train > 0
    return data


def dense(edge_index, num_users, num_items):
    out = torch.zeros(num_users, num_items, dtype=torch.bool)
    out[edge_index[0], edge_index[1]] = True
    return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ranking_metrics_match_pyg(seed):
    g = torch.Generator().manual_seed(seed)
    batch, num_items, k_max = 50, 40, 20
    scores = torch.rand(batch, num_items, generator=g)
    relevant = torch.rand(batch, num_items, generator=g) < torch.rand(
        batch, 1, generator=g) * 0.8
    relevant[:, 0] = True  # everybody has >= 1 relevant item
    top = scores.topk(k_max, dim=1).indices
    hits = relevant.gather(1, top)
    ks = (1, 5, 10, 20)
    out = ranking_metrics(hits, relevant.sum(dim=1), ks)
    label_index = relevant.nonzero().t()
    for k in ks:
        for name, metric in (('recall', LinkPredRecall(k)),
                             ('ndcg', LinkPredNDCG(k)),
                             ('precision', LinkPredPrecision(k)),
                             ('map', LinkPredMAP(k)),
                             ('hit', LinkPredHitRatio(k))):
            metric.update(top, label_index)
            assert float(out[f'{name}@{k}'].mean()) == pytest.approx(
                float(metric.compute()), abs=1e-6), f'{name}@{k}'


@pytest.mark.parametrize('split', ['valid', 'test'])
def test_evaluator_matches_dense_reference_and_pyg(split):
    data = random_data(seed=3)
    U, I = data['user'].num_nodes, data['item'].num_nodes
    scores = torch.randn(U, I)
    ks = (1, 5, 10)
    evaluator = FullRankingEvaluator(data, split=split, ks=ks, batch_size=7)

    store = data[USER_ITEM]
    heldout = dense(store.val_edge_index if split == 'valid' else
                    store.test_edge_index, U, I)
    train = dense(store.edge_index, U, I)
    users = (heldout.any(1) & train.any(1)).nonzero().view(-1)
    assert evaluator.users.tolist() == users.tolist()
    masked = scores.masked_fill(train, float('-inf'))[users]
    top = masked.topk(max(ks), dim=1).indices
    label_index = heldout[users].nonzero().t()
    out = evaluator.evaluate(table_score_fn(scores))
    for k in ks:
        for name, cls in (('recall', LinkPredRecall), ('ndcg', LinkPredNDCG),
                          ('precision', LinkPredPrecision),
                          ('map', LinkPredMAP), ('hit', LinkPredHitRatio)):
            metric = cls(k)
            metric.update(top, label_index)
            assert out[f'{name}@{k}'] == pytest.approx(
                float(metric.compute()), abs=1e-6), f'{name}@{k}'


def test_evaluator_matches_ogb_leave_one_out():
    # ogb's Evaluator ranks each positive against a *fixed* set of negatives,
    # so it cannot score users with several held-out items the way a
    # full-ranking top-K does (other positives above a positive would not
    # count). With exactly one held-out item per user (leave-one-out) the
    # two protocols coincide: the MRR-style evaluator of ogbl-citation2
    # returns per-query hits@{1,3,10} and reciprocal ranks, and with all
    # non-training items as negatives (training items at -inf, never above
    # the positive) hits@K_list == our Hit@K == Recall@K, and
    # mrr_list * hits@10_list == our MAP@10.
    from ogb.linkproppred import Evaluator

    data = random_data(num_users=80, num_items=50, seed=4, loo=True)
    U, I = data['user'].num_nodes, data['item'].num_nodes
    scores = torch.randn(U, I)
    evaluator = FullRankingEvaluator(data, split='test', ks=(1, 3, 10),
                                     batch_size=16)
    ours = evaluator.evaluate_per_user(table_score_fn(scores))

    users = evaluator.users
    store = data[USER_ITEM]
    test = store.test_edge_index
    pos_item = torch.full((U, ), -1, dtype=torch.long)
    pos_item[test[0]] = test[1]
    pos_item = pos_item[users]
    train = dense(store.edge_index, U, I)[users]
    s = scores[users].masked_fill(train, float('-inf'))
    y_pos = s.gather(1, pos_item.view(-1, 1)).view(-1)
    not_pos = torch.ones_like(s, dtype=torch.bool)
    not_pos[torch.arange(users.numel()), pos_item] = False
    y_neg = s[not_pos].view(users.numel(), I - 1)
    ogb = Evaluator(name='ogbl-citation2').eval({'y_pred_pos': y_pos,
                                                 'y_pred_neg': y_neg})
    for k in (1, 3, 10):
        torch.testing.assert_close(ours[f'hit@{k}'], ogb[f'hits@{k}_list'])
        torch.testing.assert_close(ours[f'recall@{k}'],
                                   ogb[f'hits@{k}_list'])
    torch.testing.assert_close(ours['map@10'],
                               ogb['mrr_list'] * ogb['hits@10_list'])


def test_masked_training_item_never_recommended():
    data = random_data(seed=5)
    U, I = data['user'].num_nodes, data['item'].num_nodes
    train = dense(data[USER_ITEM].edge_index, U, I)
    val = dense(data[USER_ITEM].val_edge_index, U, I)
    scores = torch.randn(U, I) + 100.0 * train + 50.0 * val  # top scores
    fn = table_score_fn(scores)
    users = torch.arange(U)
    for split, strict in (('valid', False), ('test', False), ('test', True)):
        ev = FullRankingEvaluator(data, split=split, ks=(10, ),
                                  mask_valid_in_test=strict)
        top = ev.recommend(fn, users)
        assert top.shape == (U, 10)
        in_train = train.gather(1, top)
        assert not in_train.any()
        in_val = val.gather(1, top)
        if split == 'test' and not strict:
            # validation items are not masked at test time (MMRec)
            assert in_val.sum(1).tolist() == val.sum(1).clamp(max=10).tolist()
        elif split == 'test':
            assert not in_val.any()


def test_result_independent_of_batch_size_and_per_user():
    data = random_data(seed=6)
    scores = torch.randn(data['user'].num_nodes, data['item'].num_nodes)
    fn = table_score_fn(scores)
    results = [FullRankingEvaluator(data, 'test', batch_size=bs, ks=(5, 10))
               .evaluate(fn) for bs in (1, 3, 1000)]
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in other:
            assert other[key] == pytest.approx(results[0][key], abs=1e-12)
    ev = FullRankingEvaluator(data, 'test', ks=(5, 10))
    per_user = ev.evaluate_per_user(fn)
    assert all(v.shape == (ev.num_users, ) for v in per_user.values())
    assert float(per_user['ndcg@10'].double().mean()) == pytest.approx(
        results[0]['ndcg@10'], abs=1e-12)


def test_catalogue_smaller_than_k_pads_with_misses():
    evaluator = FullRankingEvaluator(hand_data(), split='valid', ks=(4, 20))
    out = evaluator.evaluate(table_score_fn(SCORES))
    # user 0 finds both valid items, user 1 all 5, user 2 its one item
    assert out['recall@20'] == pytest.approx(1.0)
    assert out['precision@20'] == pytest.approx((2 + 5 + 1) / 20 / 3)
    # user 1's training items 6, 7 sit at -inf at the tail: never hits
    assert out['hit@20'] == pytest.approx(1.0)


def test_score_fn_output_not_modified():
    scores = SCORES.clone()
    FullRankingEvaluator(hand_data(), ks=(2, )).evaluate(
        table_score_fn(scores))
    # a view of the caller's tensor (evaluated users are 0, 1, 2)
    FullRankingEvaluator(hand_data(), ks=(2, )).evaluate(
        lambda u: scores[:3])
    assert torch.equal(scores, SCORES)


def test_errors():
    data = hand_data()
    with pytest.raises(ValueError, match="'split'"):
        FullRankingEvaluator(data, split='train')
    with pytest.raises(ValueError, match='positive int'):
        FullRankingEvaluator(data, ks=(0, 5))
    ev = FullRankingEvaluator(data, ks=(2, ))
    with pytest.raises(ValueError, match=r'shape \[3, 8\]'):
        ev.evaluate(lambda u: SCORES)
    with pytest.raises(ValueError, match='NaN'):
        ev.evaluate(lambda u: torch.full((u.numel(), 8), float('nan')))
    bad = hand_data()
    bad[USER_ITEM].test_edge_index = _edges([(0, 8)])
    with pytest.raises(ValueError, match=r'test_edge_index\[:, 0\] has item '
                       r'id 8'):
        FullRankingEvaluator(bad, split='test')
    empty = hand_data()
    empty[USER_ITEM].test_edge_index = _edges([(3, 1)])  # user 3: no train
    with pytest.raises(ValueError, match='nothing to evaluate'):
        FullRankingEvaluator(empty, split='test')

    hits = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match='max\\(ks\\) = 5'):
        ranking_metrics(hits, torch.tensor([1, 1]), ks=(5, ))
    with pytest.raises(ValueError, match='bool'):
        ranking_metrics(hits.long(), torch.tensor([1, 1]), ks=(2, ))
    with pytest.raises(ValueError, match=r'row 1 .* 2 hits'):
        ranking_metrics(torch.tensor([[1, 0, 0], [1, 1, 0]]).bool(),
                        torch.tensor([1, 1]), ks=(2, ))


def test_users_without_relevant_items_score_zero():
    out = ranking_metrics(torch.zeros(2, 3, dtype=torch.bool),
                          torch.tensor([0, 2]), ks=(3, ))
    for value in out.values():
        assert torch.isfinite(value).all() and (value == 0).all()


# ---------------------------------------------------------------------------
# Integration with crane_pyg.data.load_mmrec
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('split', ['valid', 'test'])
def test_synthetic_data_matches_pyg(synthetic_data, split):
    data = synthetic_data
    U, I = data['user'].num_nodes, data['item'].num_nodes
    store = data[USER_ITEM]
    heldout = dense(store.val_edge_index if split == 'valid' else
                    store.test_edge_index, U, I)
    train = dense(store.edge_index, U, I)
    users = (heldout.any(1) & data['user'].has_train).nonzero().view(-1)

    evaluator = FullRankingEvaluator(data, split=split, batch_size=64)
    assert evaluator.users.tolist() == users.tolist()
    scores = torch.randn(U, I)
    out = evaluator.evaluate(table_score_fn(scores))
    top = scores.masked_fill(train, float('-inf'))[users].topk(50).indices
    label_index = heldout[users].nonzero().t()
    for k in (10, 20, 50):
        for name, cls in (('recall', LinkPredRecall), ('ndcg', LinkPredNDCG),
                          ('precision', LinkPredPrecision),
                          ('map', LinkPredMAP), ('hit', LinkPredHitRatio)):
            metric = cls(k)
            metric.update(top, label_index)
            assert out[f'{name}@{k}'] == pytest.approx(
                float(metric.compute()), abs=1e-6), f'{name}@{k}'


@pytest.mark.realdata
def test_tiktok_users_and_popularity_baseline():
    data = load_mmrec(require_dataset('tiktok'))
    store = data[USER_ITEM]
    popularity = torch.bincount(store.edge_index[1],
                                minlength=data['item'].num_nodes).float()
    results = {}
    for split, attr, num_heldout_users in (('valid', 'val_edge_index', 3051),
                                           ('test', 'test_edge_index', 6130)):
        evaluator = FullRankingEvaluator(data, split=split, batch_size=2048)
        users_with_heldout = int(store[attr][0].unique().numel())
        assert users_with_heldout == num_heldout_users
        # the README's 10 cold users: excluded and counted, never evaluated
        assert evaluator.num_users + evaluator.num_users_without_train == \
            num_heldout_users
        assert 0 < evaluator.num_users_without_train <= 10
        assert bool(data['user'].has_train[evaluator.users].all())
        out = evaluator.evaluate(
            lambda u: popularity.expand(u.numel(), -1))
        for name, value in out.items():
            assert 0.0 <= value <= 1.0, name
        assert out['recall@10'] <= out['recall@20'] <= out['recall@50']
        assert out['recall@50'] <= out['hit@50']
        assert out['recall@20'] > 0  # popularity is far from useless
        results[split] = out
    # TikTok has one held-out item per user in both splits: Recall == Hit
    assert results['test']['recall@20'] == pytest.approx(
        results['test']['hit@20'])
