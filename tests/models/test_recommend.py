"""Recommender.recommend against a brute-force ranking."""
import math

import numpy as np
import pytest
import torch

from crane_pyg.data import USER_ITEM
from crane_pyg.models import LightGCN


@pytest.fixture(scope='module')
def model(synthetic_data):
    torch.manual_seed(3)
    model = LightGCN.from_data(synthetic_data, embedding_dim=16, num_layers=2)
    for p in model.parameters():  # random, untied scores
        torch.nn.init.normal_(p)
    return model


def brute_force(model, users, k, exclude):
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
        scores = (user_emb[users] @ item_emb.t()).numpy().astype(np.float64)
    banned = set(map(tuple, exclude.t().tolist())) if exclude is not None else set()
    out = []
    for row, u in enumerate(users.tolist()):
        ranked = [i for i in np.argsort(-scores[row], kind='stable') if (u, i) not in banned]
        out.append(ranked[:k])
    return out


@pytest.mark.parametrize('batch_size', [7, 1024])
def test_top_k_equals_brute_force_and_excludes_training_items(model, synthetic_data,
                                                              batch_size):
    train = synthetic_data[USER_ITEM].edge_index
    users = torch.tensor([0, 5, 17, 5, 299, 123])
    scores, items = model.recommend(users, 10, exclude=train, batch_size=batch_size)
    assert scores.shape == items.shape == (6, 10)
    assert items.tolist() == brute_force(model, users, 10, train)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    seen = set(map(tuple, train.t().tolist()))
    assert not any((u, i) in seen for u, row in zip(users.tolist(), items.tolist())
                   for i in row)
    # the scores are those of score_all_items
    with torch.no_grad():
        full = model.score_all_items(users)
    assert torch.allclose(scores, full.gather(1, items), atol=1e-5)


def test_without_exclusion_training_items_come_back(model, synthetic_data):
    users = torch.arange(300)
    _, items = model.recommend(users, 30)
    assert items.tolist() == brute_force(model, users, 30, None)
    train = set(map(tuple, synthetic_data[USER_ITEM].edge_index.t().tolist()))
    assert any((u, i) in train for u, row in enumerate(items.tolist()) for i in row)


def test_user_with_too_few_items_left_is_padded(model):
    num_items = model.num_items
    # user 1 has every item but 3 excluded
    exclude = torch.stack([torch.full((num_items - 3,), 1), torch.arange(3, num_items)])
    scores, items = model.recommend(torch.tensor([1, 2]), 5, exclude=exclude)
    assert sorted(items[0, :3].tolist()) == [0, 1, 2]
    assert items[0, 3:].tolist() == [-1, -1]
    assert scores[0, 3:].tolist() == [-math.inf, -math.inf]
    assert (items[1] >= 0).all()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match='larger than the catalogue'):
        model.recommend(torch.tensor([0]), model.num_items + 1)
    with pytest.raises(ValueError, match='user id 300 is outside'):
        model.recommend(torch.tensor([0, 300]), 5)
    with pytest.raises(ValueError, match='positive int'):
        model.recommend(torch.tensor([0]), 0)
    model.train()
    model.recommend(torch.tensor([0]), 3)
    assert model.training
