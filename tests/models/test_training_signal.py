"""A short CRANE training on the default synthetic dataset learns something a
popularity ranking and the untrained model do not (validation Recall@20)."""
import pytest
import torch

from crane_pyg.data import BPRSampler, ITEM, USER_ITEM, load_synthetic
from crane_pyg.metrics import FullRankingEvaluator
from crane_pyg.models import CRANE

EPOCHS = 10


def _recall(model, evaluator):
    model.eval()
    with torch.no_grad():
        embeddings = model.embeddings()
        return evaluator.evaluate(lambda u: model.score_all_items(u, embeddings))['recall@20']


@pytest.mark.slow
def test_crane_beats_popularity_and_untrained(tmp_path_factory):
    torch.manual_seed(0)
    data = load_synthetic(tmp_path_factory.mktemp('signal'))  # 2000 users, 1000 items
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20, ))
    degree = torch.bincount(data[USER_ITEM].edge_index[1],
                            minlength=data[ITEM].num_nodes).float()
    popularity = evaluator.evaluate(lambda u: degree.expand(u.numel(), -1))['recall@20']

    # The defaults (lambda_cl=0.01): on this dataset item popularity (absent
    # from the content) drives the interactions, and a strong pull of the ID
    # view towards the content view (lambda_cl=0.1) costs recall.
    model = CRANE.from_data(data)
    assert model.lambda_cl == 0.01
    untrained = _recall(model, evaluator)
    sampler = BPRSampler.from_data(data, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = last = None
    for epoch in range(EPOCHS):
        model.train()
        model.on_epoch_start(epoch)
        total = 0.0
        for users, pos, neg in sampler.batches(epoch, 2048):
            optimizer.zero_grad()
            loss, _ = model.loss(users, pos, neg)
            loss.backward()
            optimizer.step()
            total += loss.item()
        first = total if first is None else first
        last = total
    trained = _recall(model, evaluator)

    assert last < 0.7 * first
    assert trained > untrained + 0.05, (trained, untrained)
    assert trained > popularity + 0.01, (trained, popularity)


@pytest.mark.slow
def test_content_view_changes_rankings_of_trained_crane(tmp_path_factory):
    """On a trained CRANE with the default options the content view is
    visible in the ranking: removing it (ID view only) changes the top-20 of
    most users and the validation recall, and the content view alone ranks
    far better than chance. Fails if a default makes the content view
    negligible (e.g. a tiny fixed norm) or disconnects it from the score."""
    torch.manual_seed(0)
    data = load_synthetic(tmp_path_factory.mktemp('views'))
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20, ))
    model = CRANE.from_data(data)
    sampler = BPRSampler.from_data(data, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for epoch in range(EPOCHS):
        model.train()
        model.on_epoch_start(epoch)
        for users, pos, neg in sampler.batches(epoch, 2048):
            optimizer.zero_grad()
            model.loss(users, pos, neg)[0].backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        views = {view: model.view_embeddings(view)
                 for view in ('full', 'behavioural', 'semantic')}
        recall = {view: evaluator.evaluate(lambda u, e=emb: model.score_all_items(u, e))
                  ['recall@20'] for view, emb in views.items()}
        full = evaluator.recommend(lambda u: model.score_all_items(u, views['full']),
                                   evaluator.users, 20)
        ids = evaluator.recommend(lambda u: model.score_all_items(u, views['behavioural']),
                                  evaluator.users, 20)
    overlap = (full.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).float().mean(-1)
    chance = 20 / data[ITEM].num_nodes
    assert recall['semantic'] > 5 * chance, recall
    assert (overlap < 1).float().mean() > 0.5, overlap.mean()
    assert overlap.mean() < 0.97, overlap.mean()  # 0.92 measured with the defaults
    assert abs(recall['full'] - recall['behavioural']) > 1e-3, recall
