"""train.precision: bf16 autocast of the dense parts with float32 sparse
propagation, float32 weights / Adam state / ranking scores, the hardware
check's fallback, the config key and checkpoint resume."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import bpr_batch, small_crane

from crane_pyg.models import MODELS
from crane_pyg.nn.backend import Adjacency
from crane_pyg.train import ConfigError, TrainConfig, Trainer, load_config, load_checkpoint
from crane_pyg.train import precision as prec
from crane_pyg.train.trainer import run_name

CPU = torch.device('cpu')
BF16_OK = prec.bf16_support(CPU)[0]
needs_bf16 = pytest.mark.skipif(not BF16_OK, reason='this CPU has no native bfloat16')

# Tolerances of bfloat16 (8-bit mantissa, unit roundoff 2**-8 = 0.0039) against
# float32 on the small synthetic cases below: relative to the largest
# magnitude of the compared tensor.
EMB_RTOL = 3e-2
SCORE_RTOL = 3e-2
LOSS_RTOL = 2e-2


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------
# the config key
# ---------------------------------------------------------------------------
def test_config_key_round_trips_and_rejects_unknown_values():
    assert TrainConfig().precision == 'fp32'
    config = load_config('crane', overrides=['train.precision=bf16'])
    assert config.train.precision == 'bf16'
    again = load_config('crane', config_file={'train': {'precision': config.train.precision}})
    assert again.train.precision == 'bf16'
    with pytest.raises(ConfigError) as info:
        load_config('crane', overrides=['train.precision=fp16'])
    message = str(info.value)
    assert "train.precision" in message and "'fp16'" in message and '\n' not in message


def test_the_default_precision_keeps_old_run_names():
    old = {'train': {'lr': 1e-3, 'seed': 1}, 'model': {'name': 'crane'}}
    new = {'train': {'lr': 1e-3, 'seed': 1, 'precision': 'fp32'}, 'model': {'name': 'crane'}}
    bf16 = {'train': {'lr': 1e-3, 'seed': 1, 'precision': 'bf16'}, 'model': {'name': 'crane'}}
    assert run_name('d', 'crane', 1, old) == run_name('d', 'crane', 1, new)
    assert run_name('d', 'crane', 1, bf16) != run_name('d', 'crane', 1, new)


# ---------------------------------------------------------------------------
# the hardware check
# ---------------------------------------------------------------------------
def test_resolve_precision_falls_back_with_one_warning(monkeypatch):
    assert prec.resolve_precision('fp32', CPU) == 'fp32'
    with pytest.warns(prec.PrecisionFallbackWarning, match='tf32.*float32 instead'):
        assert prec.resolve_precision('tf32', CPU) == 'fp32'
    monkeypatch.setattr(prec, 'bf16_support', lambda device: (False, 'no bfloat16 here'))
    with pytest.warns(prec.PrecisionFallbackWarning, match='no bfloat16 here'):
        assert prec.resolve_precision('bf16', CPU) == 'fp32'
    with pytest.raises(ValueError, match='train.precision'):
        prec.resolve_precision('fp16', CPU)


def test_trainer_falls_back_when_the_cpu_lacks_bf16(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(prec, 'bf16_support', lambda device: (False, 'no bfloat16 here'))
    model = MODELS['lightgcn'].from_data(synthetic_data, embedding_dim=8)
    config = TrainConfig(epochs=1, batch_size=1024, device='cpu', precision='bf16')
    with pytest.warns(prec.PrecisionFallbackWarning):
        trainer = Trainer(model, synthetic_data, config, tmp_path, quiet=True, plot=False)
    assert trainer.precision == 'fp32'
    assert trainer.fit()['precision'] == 'fp32'


# ---------------------------------------------------------------------------
# sparse products stay float32
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('backend', ['torch_csr', 'scatter'])
def test_sparse_products_run_in_float32_under_autocast(backend):
    torch.manual_seed(0)
    index = torch.randint(0, 30, (2, 200))
    adj = Adjacency.from_edge_index(index, torch.rand(200), size=(30, 30), backend=backend)
    x = torch.randn(30, 8, requires_grad=True)
    ref = adj.matmul(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = adj.matmul(x)
        out_low = adj.matmul(x.to(torch.bfloat16))  # a bfloat16 input is upcast
    assert out.dtype == out_low.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert _rel(out_low, ref) < 1e-2
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


# ---------------------------------------------------------------------------
# CRANE: bf16 against fp32 on the same weights
# ---------------------------------------------------------------------------
@needs_bf16
def test_crane_bf16_embeddings_and_scores_within_tolerance(synthetic_knn_data):
    model = small_crane(synthetic_knn_data).eval()
    with torch.no_grad():
        user, item = model.embeddings()
        with prec.autocast('bf16', CPU):
            user16, item16 = (e.float() for e in model.embeddings())
        users = torch.arange(50)
        scores = model.score_all_items(users, (user, item))
        scores16 = model.score_all_items(users, (user16, item16))
    assert scores16.dtype == torch.float32
    assert _rel(user16, user) < EMB_RTOL and _rel(item16, item) < EMB_RTOL
    assert _rel(scores16, scores) < SCORE_RTOL
    # the top-20 lists mostly agree
    top, top16 = scores.topk(20).indices, scores16.topk(20).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, top16))
    assert overlap / top.numel() > 0.8


@needs_bf16
def test_crane_bf16_loss_within_tolerance_and_gradients_float32(synthetic_knn_data):
    model = small_crane(synthetic_knn_data, rca_dropout=0.0).train()
    users, pos, neg = bpr_batch(synthetic_knn_data, 128)
    torch.manual_seed(1)
    loss, _ = model.loss(users, pos, neg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with prec.autocast('bf16', CPU):
        loss16, _ = model.loss(users, pos, neg)
    assert loss16.dtype == torch.float32
    assert abs(float(loss16) - float(loss)) <= LOSS_RTOL * abs(float(loss))
    loss16.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == set(grads)  # gradients reach the same parameters
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads[name].flatten(),
                                                    dim=0)
        if grads[name].abs().max() > 0:
            assert cos > 0.95, (name, float(cos))


# ---------------------------------------------------------------------------
# the Trainer
# ---------------------------------------------------------------------------
def _trainer(data, out, precision, **kwargs):
    model = small_crane(data)
    config = TrainConfig(epochs=kwargs.pop('epochs', 2), batch_size=1024, eval_batch_size=128,
                         seed=3, device='cpu', precision=precision)
    return Trainer(model, data, config, out, quiet=True, plot=False, log=lambda line: None,
                   **kwargs)


@needs_bf16
def test_trainer_bf16_keeps_weights_and_adam_state_float32(synthetic_knn_data, tmp_path):
    trainer = _trainer(synthetic_knn_data, tmp_path / 'bf16', 'bf16')
    with warnings.catch_warnings():
        warnings.simplefilter('error', prec.PrecisionFallbackWarning)
        results = trainer.fit()
    assert results['precision'] == 'bf16'
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for state in trainer.optimizer.state.values():
        for key in ('exp_avg', 'exp_avg_sq'):
            assert state[key].dtype == torch.float32
    reference = _trainer(synthetic_knn_data, tmp_path / 'fp32', 'fp32').fit()
    assert reference['precision'] == 'fp32'
    for k in ('recall@20', 'ndcg@20'):
        assert abs(results['valid'][k] - reference['valid'][k]) < 0.05


@needs_bf16
def test_evaluation_scores_float32_under_bf16(synthetic_knn_data, tmp_path):
    trainer = _trainer(synthetic_knn_data, tmp_path / 'a', 'bf16')
    seen = []
    original = trainer.model.score_all_items

    def spy(users, embeddings):
        seen.append(tuple(e.dtype for e in embeddings))
        return original(users, embeddings)

    trainer.model.score_all_items = spy
    metrics = trainer.evaluate('valid')
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    trainer.precision = 'fp32'
    exact = trainer.evaluate('valid')
    assert abs(metrics['recall@20'] - exact['recall@20']) < 0.03


@needs_bf16
def test_bf16_resume_is_exact(synthetic_knn_data, tmp_path):
    a = _trainer(synthetic_knn_data, tmp_path / 'a', 'bf16', epochs=3).fit()
    _trainer(synthetic_knn_data, tmp_path / 'b', 'bf16', epochs=3, max_epochs_this_run=2).fit()
    state = load_checkpoint(tmp_path / 'b' / 'last.pt')
    assert state['config']['train']['precision'] == 'bf16'
    b = _trainer(synthetic_knn_data, tmp_path / 'b', 'bf16', epochs=3, resume=True).fit()
    assert a['valid'] == b['valid'] and a['best_epoch'] == b['best_epoch']
    # a checkpoint of another precision is another configuration
    from crane_pyg.train import CheckpointError
    with pytest.raises(CheckpointError, match='precision'):
        _trainer(synthetic_knn_data, tmp_path / 'b', 'fp32', epochs=4, resume=True).fit()


def test_an_old_checkpoint_without_the_key_resumes_as_fp32(synthetic_data, tmp_path):
    def trainer(**kwargs):
        torch.manual_seed(0)
        model = MODELS['lightgcn'].from_data(synthetic_data, embedding_dim=8)
        config = TrainConfig(epochs=2, batch_size=1024, device='cpu', seed=3)
        return Trainer(model, synthetic_data, config, tmp_path, quiet=True, plot=False,
                       log=lambda line: None, **kwargs)

    trainer(max_epochs_this_run=1).fit()
    path = tmp_path / 'last.pt'
    state = torch.load(path, weights_only=False)
    del state['config']['train']['precision']  # as written before the key existed
    torch.save(state, path)
    assert trainer(resume=True).fit()['epochs_run'] == 2
