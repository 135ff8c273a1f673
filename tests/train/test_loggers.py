"""train.logger: metrics.csv (default) and TensorBoard scalars per epoch."""
from __future__ import annotations

import builtins
import csv
import json

import pytest
import torch

from crane_pyg.models import LightGCN
from crane_pyg.train import ConfigError, TrainConfig, Trainer


def config(**kwargs) -> TrainConfig:
    base = dict(epochs=3, batch_size=1024, eval_batch_size=300, seed=3, device='cpu',
                num_threads=1)
    return TrainConfig(**{**base, **kwargs})


def trainer(data, out, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = LightGCN.from_data(data, embedding_dim=8, num_layers=1)
    return Trainer(model, data, config(**kwargs), out, quiet=True, plot=False)


def test_csv_is_the_default_and_matches_the_history_after_a_resume(synthetic_data, tmp_path):
    assert TrainConfig().logger == 'csv'
    out = tmp_path / 'run'
    trainer(synthetic_data, out, epochs=2).fit()
    t = trainer(synthetic_data, out, epochs=3)
    t.resume = True
    t.fit()
    history = [json.loads(line) for line in (out / 'history.jsonl').read_text().splitlines()]
    rows = list(csv.DictReader((out / 'metrics.csv').open()))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    for row, record in zip(rows, history):
        assert float(row['loss']) == pytest.approx(record['loss'], rel=1e-12)
        for part, value in record['loss_parts'].items():
            assert float(row[f'loss/{part}']) == pytest.approx(value, rel=1e-12)
        for metric, value in record['valid'].items():
            assert float(row[f'valid/{metric}']) == pytest.approx(value, rel=1e-12)
    assert 'valid/recall@20' in rows[0] and 'loss/bpr' in rows[0]
    assert not (out / 'tensorboard').exists()


def test_tensorboard_scalars(synthetic_data, tmp_path):
    pytest.importorskip('tensorboard', reason='the optional tensorboard extra is not installed')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'run'
    t = trainer(synthetic_data, out, logger='tensorboard')
    t.fit()
    events = EventAccumulator(str(out / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'loss/total', 'loss/bpr', 'valid/recall@20', 'valid/ndcg@10'} <= tags
    recall = events.Scalars('valid/recall@20')
    assert [e.step for e in recall] == [0, 1, 2]
    assert [e.value for e in recall] == pytest.approx(
        [r['valid']['recall@20'] for r in t.history], abs=1e-6)


def test_tensorboard_missing_is_a_clear_error_before_training(synthetic_data, tmp_path,
                                                              monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == 'tensorboard' or name.startswith('tensorboard.'):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    with pytest.raises(ConfigError, match=r"key 'train.logger'.*pip install 'crane_pyg\[tensorboard\]'"):
        trainer(synthetic_data, tmp_path / 'run', logger='tensorboard')
    assert not (tmp_path / 'run').exists()


def test_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match='train.logger'):
        TrainConfig(logger='wandb')
