"""train.semantic_cache: CRANE's loss with cached item codes equals the exact
loss right after a refresh, trains only the batch's rows through RCA, leaves
evaluation unchanged and resumes exactly."""
from __future__ import annotations


import pytest
import torch
from conftest import bpr_batch, small_crane

from crane_pyg.data import ITEM
from crane_pyg.models import MODELS
from crane_pyg.train import ConfigError, TrainConfig, Trainer, load_config
from crane_pyg.models.semantic_cache import CachedSemanticCRANE


@pytest.mark.parametrize('options', [{}, {'user_semantic': 'items'},
                                     {'user_semantic': 'profile', 'num_ii_layers': 2},
                                     {'semantic_gate': True, 'semantic_scale': None},
                                     {'id_item_graph_users': True, 'cl_pair': 'ui_ii',
                                      'lambda_cl': 0.5}])
def test_loss_after_a_refresh_equals_the_exact_loss(synthetic_knn_data, options):
    model = small_crane(synthetic_knn_data, **options).train()
    cached = CachedSemanticCRANE(model, refresh_every=5)
    users, pos, neg = bpr_batch(synthetic_knn_data)
    torch.manual_seed(1)
    exact, parts = model.loss(users, pos, neg)
    torch.manual_seed(1)
    value, cached_parts = cached(users, pos, neg)
    # float32 reordering only (tolerance 1e-5 relative)
    torch.testing.assert_close(value, exact, rtol=1e-5, atol=1e-6)
    assert cached_parts.keys() == parts.keys()
    assert cached.refreshes == 1
    assert cached.last_stats['fresh_items'] < synthetic_knn_data[ITEM].num_nodes
    # the gradient reaches every parameter the exact one reaches
    value.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    exact.backward()
    assert with_grad == {n for n, p in model.named_parameters() if p.grad is not None}


def test_refresh_schedule_and_epoch_start(synthetic_knn_data):
    model = small_crane(synthetic_knn_data).train()
    cached = CachedSemanticCRANE(model, refresh_every=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(7):
        loss, _ = cached(*bpr_batch(synthetic_knn_data, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cached.refreshes == 3  # steps 0, 3, 6
    stale = cached.cache.codes.clone()
    cached.on_epoch_start(1)
    cached(*bpr_batch(synthetic_knn_data, seed=9))
    assert cached.refreshes == 4 and not torch.equal(stale, cached.cache.codes)
    with torch.no_grad():
        model.eval()
        fresh = model.rca(model.encode_items())
    torch.testing.assert_close(cached.cache.codes, fresh)  # no optimizer step since


def test_rejects_other_models_and_unsupported_options(synthetic_knn_data, synthetic_data):
    with pytest.raises(TypeError, match='CRANE only'):
        CachedSemanticCRANE(MODELS['lightgcn'].from_data(synthetic_data))
    with pytest.raises(ValueError, match='precompute_profiles'):
        CachedSemanticCRANE(small_crane(synthetic_knn_data, precompute_profiles=False))
    with pytest.raises(ValueError, match='refresh_every'):
        CachedSemanticCRANE(small_crane(synthetic_knn_data), refresh_every=0)


def test_config_key():
    assert load_config('crane', overrides=['train.semantic_cache=10']).train.semantic_cache == 10
    with pytest.raises(ConfigError, match="train.semantic_cache"):
        load_config('crane', overrides=['train.semantic_cache=0'])
    # with num_neighbors the sampled-subgraph loss reads the cache
    assert TrainConfig(semantic_cache=2, num_neighbors=(5, 5)).semantic_cache == 2


def _trainer(data, out, **kwargs):
    model = small_crane(data)
    config = TrainConfig(epochs=kwargs.pop('epochs', 2), batch_size=1024, eval_batch_size=128,
                         seed=3, device='cpu', semantic_cache=kwargs.pop('semantic_cache', 2))
    return Trainer(model, data, config, out, quiet=True, plot=False, log=lambda line: None,
                   **kwargs)


def test_evaluation_with_the_cache_is_evaluation_without(synthetic_knn_data, tmp_path):
    trainer = _trainer(synthetic_knn_data, tmp_path / 'a')
    assert isinstance(trainer.train_model, CachedSemanticCRANE)
    trainer.fit()
    assert trainer.train_model.refreshes > 0
    with_cache = trainer.evaluate('valid')
    plain = Trainer(trainer.model, synthetic_knn_data, TrainConfig(device='cpu', eval_batch_size=128),
                    tmp_path / 'b', quiet=True, plot=False)
    assert plain.train_model is trainer.model
    assert plain.evaluate('valid') == with_cache


def test_trainer_combines_the_cache_with_minibatch_training(synthetic_knn_data, tmp_path):
    from crane_pyg.models import MiniBatchCRANE
    model = small_crane(synthetic_knn_data)
    config = TrainConfig(epochs=2, batch_size=1024, eval_batch_size=128, seed=3, device='cpu',
                         semantic_cache=2, num_neighbors=(-1,) * model.num_ui_layers)
    trainer = Trainer(model, synthetic_knn_data, config, tmp_path, quiet=True, plot=False,
                      log=lambda line: None)
    assert isinstance(trainer.train_model, MiniBatchCRANE)
    assert trainer.train_model.cache.refresh_every == 2
    result = trainer.fit()
    assert trainer.train_model.cache.refreshes >= 2  # one per epoch at least
    assert result['best_epoch'] >= 1


def test_resume_with_the_cache_is_exact(synthetic_knn_data, tmp_path):
    a = _trainer(synthetic_knn_data, tmp_path / 'a', epochs=3).fit()
    _trainer(synthetic_knn_data, tmp_path / 'b', epochs=3, max_epochs_this_run=2).fit()
    b = _trainer(synthetic_knn_data, tmp_path / 'b', epochs=3, resume=True).fit()
    assert a['valid'] == b['valid'] and a['best_epoch'] == b['best_epoch']
