"""Trainer: results, history, curves, atomic files, early stopping, exact resume, Ctrl-C."""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crane_pyg.models import MODELS
from crane_pyg.models.base import Recommender
from crane_pyg.train import (BEST, LAST, CheckpointError, TrainConfig, Trainer,
                             load_checkpoint, save_checkpoint)
from crane_pyg.train.utils import atomic_write, atomic_write_json, get_rng_state, set_rng_state

METRIC_KEYS = {f'{m}@{k}' for m in ('recall', 'ndcg', 'precision', 'map', 'hit')
               for k in (10, 20, 50)}


class TinyMF(Recommender):
    """Matrix factorisation with embedding dropout (so training consumes the
    global torch RNG, which an exact resume must restore)."""

    def __init__(self, num_users: int, num_items: int, edge_index=None, *,
                 embedding_dim: int = 8, dropout: float = 0.2,
                 reg_weight: float = 1e-4) -> None:
        super().__init__(num_users, num_items)
        self.user = nn.Embedding(num_users, embedding_dim)
        self.item = nn.Embedding(num_items, embedding_dim)
        self.dropout = dropout
        self.reg_weight = reg_weight
        self.epochs_started: list[int] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_started.append(epoch)

    def embeddings(self):
        return self.user.weight, self.item.weight

    def loss(self, users, pos_items, neg_items):
        u = F.dropout(self.user(users), self.dropout, self.training)
        p, n = self.item(pos_items), self.item(neg_items)
        bpr = -F.logsigmoid((u * p).sum(-1) - (u * n).sum(-1)).mean()
        reg = self.reg_weight * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(users)
        return bpr + reg, {'bpr': bpr.item(), 'reg': reg.item()}


def tiny_config(**kwargs) -> TrainConfig:
    base = dict(epochs=4, batch_size=512, lr=0.01, eval_batch_size=128, seed=3, device='cpu',
                patience=20)
    base.update(kwargs)
    return TrainConfig(**base)


def make_trainer(data, out, model=None, config=None, **kwargs) -> Trainer:
    torch.manual_seed(123)
    model = model if model is not None else TinyMF.from_data(data)
    kwargs.setdefault('plot', False)  # matplotlib is slow; two tests check the curves
    return Trainer(model, data, config or tiny_config(), out, quiet=True,
                   log=lambda line: None, **kwargs)


def read_history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / 'history.jsonl').read_text().splitlines()]


def strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith('_seconds')} for r in history]


# ---------------------------------------------------------------------------
# results, history, curves, files
# ---------------------------------------------------------------------------
def test_results_json_history_and_curves(synthetic_data, tmp_path):
    out = tmp_path / 'run'
    trainer = make_trainer(synthetic_data, out, config=tiny_config(epochs=5, eval_every=2),
                           plot=True)
    results = trainer.fit()
    on_disk = json.loads((out / 'results.json').read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ('dataset', 'model', 'config', 'best_epoch', 'valid', 'test',
                'seconds_per_epoch', 'eval_seconds', 'peak_memory_mb', 'versions'):
        assert key in on_disk, key
    assert on_disk['dataset'] == synthetic_data.name and on_disk['model'] == 'tinymf'
    assert on_disk['status'] == 'completed' and on_disk['epochs_run'] == 5
    assert set(on_disk['valid']) == METRIC_KEYS and set(on_disk['test']) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in [*on_disk['valid'].values(), *on_disk['test'].values()])
    assert on_disk['best_epoch'] in (1, 3, 4)  # evaluated epochs: every 2nd and the last
    assert isinstance(on_disk['seconds_per_epoch'], float) and on_disk['seconds_per_epoch'] > 0
    assert isinstance(on_disk['eval_seconds'], float) and on_disk['eval_seconds'] > 0
    assert on_disk['peak_memory_mb'] > 0 and on_disk['peak_memory_source'] == 'ru_maxrss'
    versions = on_disk['versions']
    assert versions['torch'] == torch.__version__ and versions['numpy'] == np.__version__
    assert {'python', 'torch_geometric', 'torch_sparse', 'torch_scatter', 'crane_pyg'} <= set(versions)
    assert on_disk['config']['train']['seed'] == 3

    history = read_history(out)
    assert [r['epoch'] for r in history] == [0, 1, 2, 3, 4]
    assert [('valid' in r) for r in history] == [False, True, False, True, True]
    for record in history:
        assert set(record['loss_parts']) == {'bpr', 'reg'}
        assert math.isclose(record['loss'], sum(record['loss_parts'].values()), rel_tol=1e-5)
        assert record['train_seconds'] > 0
    best = max((r for r in history if 'valid' in r), key=lambda r: r['valid']['recall@20'])
    assert on_disk['best_epoch'] == best['epoch']
    assert on_disk['valid'] == best['valid']  # valid of results = the best evaluation's
    assert trainer.model.epochs_started == [0, 1, 2, 3, 4]

    png = (out / 'curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 1000
    assert not list(out.glob('*.tmp')) and not list(out.glob('.*'))  # no temporary files left
    assert {p.name for p in out.iterdir()} == {'results.json', 'history.jsonl', 'curves.png',
                                               'metrics.csv', LAST, BEST}


def test_test_metrics_come_from_the_best_validation_epoch(synthetic_data, tmp_path):
    out = tmp_path / 'run'
    results = make_trainer(synthetic_data, out).fit()
    # best.pt holds the weights of the best epoch: re-evaluating them gives the
    # reported valid and test metrics exactly
    model = TinyMF.from_data(synthetic_data)
    state = load_checkpoint(out / BEST)
    assert state['epoch'] == results['best_epoch']
    model.load_state_dict(state['model'])
    check = make_trainer(synthetic_data, tmp_path / 'check', model=model)
    assert check.evaluate('valid') == results['valid']
    assert check.evaluate('test') == results['test']


def test_results_keep_test_out_of_the_selection(synthetic_data, tmp_path):
    """Test metrics are computed only at new best validation epochs."""
    splits = []

    class Recording(Trainer):
        def evaluate(self, split='valid'):
            splits.append((self.epoch + 1, split))
            return super().evaluate(split)

    torch.manual_seed(0)
    trainer = Recording(TinyMF.from_data(synthetic_data), synthetic_data, tiny_config(),
                        tmp_path, quiet=True, log=lambda s: None, plot=False)
    trainer.fit()
    bests = [r['epoch'] for r in trainer.history if r.get('best')]
    assert [e for e, s in splits if s == 'test'] == bests
    assert [e for e, s in splits if s == 'valid'] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------
# early stopping with controlled metrics
# ---------------------------------------------------------------------------
class Scripted(Trainer):
    """Validation scores follow a script; test scores record their epoch."""
    script: list[float] = []

    def evaluate(self, split='valid'):
        epoch = self.epoch + 1  # the epoch being evaluated
        if split == 'valid':
            value = self.script[epoch]
            return {'recall@20': value, 'ndcg@20': value / 2}
        return {'recall@20': 1000.0 + epoch}


@pytest.mark.parametrize('script, patience, best_epoch, epochs_run', [
    ([0.1, 0.2, 0.15, 0.2, 0.19, 0.18, 0.5, 0.6], 3, 1, 5),   # equal is no improvement
    ([0.1, 0.2, 0.15, 0.25, 0.19, 0.18, 0.17, 0.3], 3, 3, 7),  # counter resets on improvement
    ([0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0], 1, 0, 2),
])
def test_early_stopping(synthetic_data, tmp_path, script, patience, best_epoch, epochs_run):
    Scripted.script = script
    torch.manual_seed(0)
    trainer = Scripted(TinyMF.from_data(synthetic_data), synthetic_data,
                       tiny_config(epochs=len(script), patience=patience), tmp_path,
                       quiet=True, log=lambda s: None, plot=False)
    results = trainer.fit()
    assert results['status'] == 'early_stopped'
    assert results['best_epoch'] == best_epoch and results['epochs_run'] == epochs_run
    assert results['valid']['recall@20'] == script[best_epoch]
    assert results['test'] == {'recall@20': 1000.0 + best_epoch}
    assert [r['bad_evals'] for r in trainer.history][-1] == patience
    assert len(read_history(tmp_path)) == epochs_run


def test_results_say_how_the_run_ended_and_warn_about_an_early_best(synthetic_data, tmp_path):
    """``ended_by`` tells early stopping from the epoch limit; a best epoch
    among the first evaluations with ``patience`` evaluations after it is
    warned about (a plateau right after a fast start); a later best is not."""
    def run(script, patience, out):
        Scripted.script = script
        torch.manual_seed(0)
        trainer = Scripted(TinyMF.from_data(synthetic_data), synthetic_data,
                           tiny_config(epochs=len(script), patience=patience), out,
                           quiet=True, log=lambda s: None, plot=False)
        return trainer.fit()

    with pytest.warns(UserWarning, match='best recall@20 came at epoch 1, evaluation 2 of 5'):
        early = run([0.1, 0.2, 0.15, 0.2, 0.19, 0.18], 3, tmp_path / 'early')
    assert early['ended_by'] == 'early_stopping' and len(early['warnings']) == 1
    on_disk = json.loads((tmp_path / 'early' / 'results.json').read_text())
    assert on_disk['ended_by'] == 'early_stopping' and on_disk['warnings'] == early['warnings']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        late = run([0.1, 0.2, 0.3, 0.4, 0.5, 0.45], 3, tmp_path / 'late')
    assert late['ended_by'] == 'epoch_limit' and 'warnings' not in late
    assert late['resumed_after_epochs'] == []


def test_a_cut_run_closed_by_resume_says_so(synthetic_data, tmp_path):
    def interrupt(trainer, record):
        if record['epoch'] == 1:
            raise KeyboardInterrupt

    out = tmp_path / 'cut'
    stopped = make_trainer(synthetic_data, out, config=tiny_config(epochs=4),
                           callbacks=[interrupt]).fit()
    assert stopped['ended_by'] == 'interrupted'
    # closed with --resume and an epoch cap at the point where it stopped
    closed = make_trainer(synthetic_data, out, config=tiny_config(epochs=2), resume=True).fit()
    assert closed['status'] == 'completed' and closed['ended_by'] == 'epoch_limit'
    assert closed['resumed_after_epochs'] == [1]
    assert json.loads((out / 'results.json').read_text())['resumed_after_epochs'] == [1]


def test_early_stopping_counts_evaluations_not_epochs(synthetic_data, tmp_path):
    Scripted.script = [0.0, 0.5, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.9]
    torch.manual_seed(0)
    trainer = Scripted(TinyMF.from_data(synthetic_data), synthetic_data,
                       tiny_config(epochs=10, patience=2, eval_every=2), tmp_path,
                       quiet=True, log=lambda s: None, plot=False)
    results = trainer.fit()
    # evaluations after epochs 1 (best), 3, 5 -> two without improvement -> stop
    assert results['best_epoch'] == 1 and results['epochs_run'] == 6


# ---------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------
def _assert_same_run(a: dict, b: dict, out_a: Path, out_b: Path) -> None:
    assert a['valid'] == b['valid'] and a['test'] == b['test']
    assert a['best_epoch'] == b['best_epoch'] and a['epochs_run'] == b['epochs_run']
    assert strip_times(read_history(out_a)) == strip_times(read_history(out_b))
    for name in (LAST, BEST):
        sa, sb = load_checkpoint(out_a / name), load_checkpoint(out_b / name)
        assert sa['epoch'] == sb['epoch']
        assert sa['model'].keys() == sb['model'].keys()
        for key in sa['model']:
            assert torch.equal(sa['model'][key], sb['model'][key]), (name, key)


@pytest.mark.parametrize('stop_after', [1, 3])
def test_resume_is_exact_mf(synthetic_data, tmp_path, stop_after):
    config = tiny_config(epochs=5)
    a = make_trainer(synthetic_data, tmp_path / 'a', config=config).fit()
    paused = make_trainer(synthetic_data, tmp_path / 'b', config=config,
                          max_epochs_this_run=stop_after).fit()
    assert paused['status'] == 'paused' and paused['epochs_run'] == stop_after
    assert not (tmp_path / 'b' / 'results.json').exists()
    # disturb every generator between the two halves
    torch.manual_seed(999), np.random.seed(5), random.seed(7)
    model = TinyMF.from_data(synthetic_data)  # fresh weights: the checkpoint must win
    resumed = make_trainer(synthetic_data, tmp_path / 'b', model=model, config=config,
                           resume=True)
    b = resumed.fit()
    assert b['status'] == 'completed'
    assert resumed.model.epochs_started == list(range(stop_after, 5))
    _assert_same_run(a, b, tmp_path / 'a', tmp_path / 'b')


@pytest.mark.parametrize('name, epochs, pause', [('lightgcn', 3, 2), ('crane', 4, 3)])
def test_resume_is_exact_real_models(synthetic_data, tmp_path, name, epochs, pause):
    # CRANE: edge dropout and RCA dropout use randomness; its item graph is
    # rebuilt at epoch 2, before the pause, so the resumed run needs the
    # rebuilt graph from the checkpoint
    config = tiny_config(epochs=epochs, batch_size=2048, lr=1e-3)
    options = {'embedding_dim': 16}
    if name == 'crane':
        options.update(edge_dropout=0.2, rca_dropout=0.1, graph_rebuild_every=2, seed=3)

    def build():
        torch.manual_seed(0)
        return MODELS[name].from_data(synthetic_data, **options)

    a = make_trainer(synthetic_data, tmp_path / 'a', model=build(), config=config).fit()
    make_trainer(synthetic_data, tmp_path / 'b', model=build(), config=config,
                 max_epochs_this_run=pause).fit()
    torch.manual_seed(42)
    b = make_trainer(synthetic_data, tmp_path / 'b', model=build(), config=config,
                     resume=True).fit()
    _assert_same_run(a, b, tmp_path / 'a', tmp_path / 'b')


def test_resume_of_a_finished_run_does_not_train(synthetic_data, tmp_path):
    first = make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=2)).fit()
    trainer = make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=2), resume=True)
    again = trainer.fit()
    assert trainer.model.epochs_started == []
    assert again['valid'] == first['valid'] and again['test'] == first['test']


def test_resume_can_extend_epochs_but_not_change_the_protocol(synthetic_data, tmp_path):
    make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=2)).fit()
    longer = make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=3), resume=True)
    assert longer.fit()['epochs_run'] == 3 and longer.model.epochs_started == [2]
    with pytest.raises(CheckpointError, match=r'train\.lr: 0\.01 -> 0\.02'):
        make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=3, lr=0.02),
                     resume=True).fit()
    with pytest.raises(CheckpointError, match='seed 3'):
        make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=3, seed=4),
                     resume=True).fit()


def test_fresh_run_replaces_a_previous_one(synthetic_data, tmp_path):
    make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=3)).fit()
    trainer = make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=2))
    trainer.fit()
    assert [r['epoch'] for r in read_history(tmp_path)] == [0, 1]
    assert load_checkpoint(tmp_path / LAST)['epoch'] == 1


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------
def test_keyboard_interrupt_saves_and_resumes(synthetic_data, tmp_path, capsys):
    config = tiny_config(epochs=4)
    a = make_trainer(synthetic_data, tmp_path / 'a', config=config).fit()

    def interrupt(trainer, record):
        if record['epoch'] == 1:
            raise KeyboardInterrupt

    out = tmp_path / 'b'
    stopped = make_trainer(synthetic_data, out, config=config, callbacks=[interrupt],
                           plot=True).fit()
    assert stopped['status'] == 'interrupted' and stopped['epochs_run'] == 2
    assert load_checkpoint(out / LAST)['epoch'] == 1
    assert not (out / 'results.json').exists()
    assert (out / 'curves.png').is_file()
    err = capsys.readouterr().err
    assert 'interrupted' in err and '--resume' in err and str(out / LAST) in err
    b = make_trainer(synthetic_data, out, config=config, resume=True).fit()
    _assert_same_run(a, b, tmp_path / 'a', out)


def test_interrupt_in_the_first_epoch_leaves_a_resumable_checkpoint(synthetic_data, tmp_path):
    class Exploding(TinyMF):
        def on_epoch_start(self, epoch):
            raise KeyboardInterrupt

    torch.manual_seed(0)
    model = Exploding.from_data(synthetic_data)
    results = make_trainer(synthetic_data, tmp_path, model=model).fit()
    assert results['status'] == 'interrupted' and results['epochs_run'] == 0
    assert load_checkpoint(tmp_path / LAST)['epoch'] == -1


# ---------------------------------------------------------------------------
# failures and building blocks
# ---------------------------------------------------------------------------
def test_non_finite_loss_is_an_error(synthetic_data, tmp_path):
    class Diverging(TinyMF):
        def loss(self, users, pos, neg):
            loss, parts = super().loss(users, pos, neg)
            return loss * float('nan'), parts

    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match='epoch 0, batch 0'):
        make_trainer(synthetic_data, tmp_path, model=Diverging.from_data(synthetic_data)).fit()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'x.json'
    atomic_write_json(path, {'a': 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path, 'w') as f:
            f.write('{"half": ')
            raise RuntimeError('disk full')
    assert json.loads(path.read_text()) == {'a': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['x.json']


def test_checkpoint_roundtrip_and_errors(tmp_path):
    state = {'epoch': 3, 'tensor': torch.arange(4), 'rng': get_rng_state(), 'history': [{'a': 1.5}]}
    save_checkpoint(tmp_path / 'c.pt', state)
    loaded = load_checkpoint(tmp_path / 'c.pt')  # weights_only=True
    assert loaded['epoch'] == 3 and torch.equal(loaded['tensor'], torch.arange(4))
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint(tmp_path / 'missing.pt')
    torch.save({'format': 99}, tmp_path / 'old.pt')
    with pytest.raises(CheckpointError, match='format'):
        load_checkpoint(tmp_path / 'old.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot read'):
        load_checkpoint(tmp_path / 'junk.pt')


def test_rng_state_roundtrip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = get_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_bad_arguments(synthetic_data, tmp_path):
    model = TinyMF.from_data(synthetic_data)
    with pytest.raises(TypeError, match='TrainConfig'):
        Trainer(model, synthetic_data, {'lr': 0.1}, tmp_path)
    with pytest.raises(ValueError, match='max_epochs_this_run'):
        Trainer(model, synthetic_data, tiny_config(), tmp_path, max_epochs_this_run=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA is not available'):
            Trainer(model, synthetic_data, tiny_config(device='cuda'), tmp_path)


def test_deterministic_mode_fixes_kernels_threads_and_seeds():
    from crane_pyg.train.utils import configure_reproducibility
    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        configure_reproducibility(5, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.get_num_threads() == 1
        first = (torch.rand(2), np.random.rand(2), random.random())
        configure_reproducibility(5, deterministic=True, num_threads=2)
        assert torch.get_num_threads() == 2
        second = (torch.rand(2), np.random.rand(2), random.random())
        assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
        assert first[2] == second[2]
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.set_num_threads(threads)


def test_flush_denormal_option():
    """``train.flush_denormal`` (default on) makes CPU arithmetic flush denormal
    floats to zero; off keeps them."""
    from crane_pyg.train import TrainConfig
    from crane_pyg.train.utils import configure_reproducibility
    assert TrainConfig().flush_denormal is True
    try:
        configure_reproducibility(0, flush_denormal=False)
        tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
        assert (tiny * 1.0).item() != 0.0
        configure_reproducibility(0, flush_denormal=True)
        if torch.set_flush_denormal(True):  # supported on this CPU (x86 with SSE3)
            assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


class _CompilableMF(TinyMF):
    """Records the trainer's call of :meth:`compile_modules` (compiling nothing)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compile_calls = 0

    def compile_modules(self, **kwargs):
        self.compile_calls += 1
        return ['user_tower']


@pytest.mark.parametrize('model_cls,line', [
    (_CompilableMF, 'train.compile: compiled user_tower of _CompilableMF'),
    (TinyMF, 'train.compile: TinyMF has no module to compile; running eagerly'),
])
def test_compile_option_compiles_the_models_modules(synthetic_data, tmp_path, model_cls, line):
    assert TrainConfig().compile is False
    lines: list[str] = []
    torch.manual_seed(0)
    model = model_cls.from_data(synthetic_data)
    trainer = Trainer(model, synthetic_data, tiny_config(compile=True, epochs=1), tmp_path,
                      log=lines.append, plot=False)
    assert line in lines[0]
    if model_cls is _CompilableMF:
        assert model.compile_calls == 1
        off = _CompilableMF.from_data(synthetic_data)
        Trainer(off, synthetic_data, tiny_config(epochs=1), tmp_path / 'off', quiet=True,
                plot=False)
        assert off.compile_calls == 0
    assert trainer.fit()['status'] == 'completed'


def test_compile_without_a_cpp_compiler_fails_at_once(synthetic_data, tmp_path, monkeypatch):
    """``train.compile`` checks that Inductor can generate code for the device
    before training; without a C++ compiler (CPU) the trainer says so."""
    import torch._inductor.cpp_builder as cpp_builder
    from crane_pyg.train.utils import compile_support_problem
    assert compile_support_problem(torch.device('cpu')) is None  # this machine has one

    def no_compiler():
        raise RuntimeError('no working C++ compiler found')
    monkeypatch.setattr(cpp_builder, 'get_cpp_compiler', no_compiler)
    problem = compile_support_problem(torch.device('cpu'))
    assert 'needs a C++ compiler' in problem and 'no working C++ compiler' in problem
    model = _CompilableMF.from_data(synthetic_data)
    with pytest.raises(RuntimeError, match='train.compile: torch.compile on CPU needs a C'):
        Trainer(model, synthetic_data, tiny_config(compile=True), tmp_path, quiet=True)
    # nothing to compile: nothing to check
    Trainer(TinyMF.from_data(synthetic_data), synthetic_data, tiny_config(compile=True),
            tmp_path / 'mf', quiet=True)


# ---------------------------------------------------------------------------
# settings that do not fit the dataset or the machine; debris
# ---------------------------------------------------------------------------
def test_cut_offs_beyond_the_items_are_an_error(synthetic_data, tmp_path):
    from crane_pyg.train import ConfigError
    with pytest.raises(ConfigError, match=r"key 'train.ks': cut-off 100000 is larger than "
                                          r"the 200 items"):
        make_trainer(synthetic_data, tmp_path, config=tiny_config(ks=(20, 100000)))


def test_more_threads_than_cpus_is_warned_about(synthetic_data, tmp_path):
    from crane_pyg.train.utils import available_cpus
    with pytest.warns(UserWarning, match=f'train.num_threads = 1000 is more than the '
                                         f'{available_cpus()} CPUs'):
        make_trainer(synthetic_data, tmp_path, config=tiny_config(num_threads=1000))


def test_temporaries_of_killed_writes_go_after_the_next_checkpoint(synthetic_data, tmp_path):
    def killed_mid_write(trainer, record):  # as if a kill had cut a write of last.pt
        if record['epoch'] == 0:
            (tmp_path / '.last.pt.zz9_ab12.tmp').write_bytes(b'half')

    make_trainer(synthetic_data, tmp_path, config=tiny_config(epochs=2),
                 callbacks=[killed_mid_write]).fit()
    assert not list(tmp_path.glob('.*.tmp'))


def test_checkpoint_errors_say_why(tmp_path, monkeypatch):
    from crane_pyg.train import checkpoint
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'empty.pt: the file is empty \(0 bytes\)$'):
        load_checkpoint(tmp_path / 'empty.pt')
    (tmp_path / 'junk.pt').write_bytes(b'hello world')
    with pytest.raises(CheckpointError, match=r'junk.pt: KeyError: 101 \(a truncated or foreign'):
        load_checkpoint(tmp_path / 'junk.pt')
    # torch.save reports a full disk as a RuntimeError or OSError with ENOSPC in its chain
    save_checkpoint(tmp_path / LAST, {'epoch': 1})

    def full_disk(obj, f):
        try:
            raise OSError(28, 'No space left on device')
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos')

    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r'last.pt: No space left on device \(errno 28\)'):
        save_checkpoint(tmp_path / LAST, {'epoch': 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / LAST)['epoch'] == 1  # the previous one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty.pt', 'junk.pt', LAST]


def test_an_interrupt_during_the_checkpoint_waits_for_it(synthetic_data, tmp_path, monkeypatch,
                                                          capsys):
    """A Ctrl-C (or SIGTERM) right after last.pt is replaced but before the
    trainer notes its epoch used to make the message name the epoch before."""
    import signal
    from crane_pyg.train import trainer as trainer_module
    real = trainer_module.save_checkpoint

    def save_then_ctrl_c(path, state):
        real(path, state)
        if Path(path).name == LAST and state['epoch'] == 1:
            # raise_signal: delivered to this (the main) thread at once; os.kill
            # may land on a worker thread and reach Python only after fit()
            # has returned on a loaded machine
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module, 'save_checkpoint', save_then_ctrl_c)
    # Python's own Ctrl-C handler: a suite started in the background by a
    # shell inherits SIGINT ignored, and the signal was then swallowed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        results = make_trainer(synthetic_data, tmp_path).fit()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert results['status'] == 'interrupted' and results['epochs_run'] == 2
    assert load_checkpoint(tmp_path / LAST)['epoch'] == 1
    assert f'{tmp_path / LAST} holds the state after epoch 1' in capsys.readouterr().err


def test_mask_valid_in_test_reaches_the_test_evaluator(synthetic_data, tmp_path):
    plain = make_trainer(synthetic_data, tmp_path / 'a')
    strict = make_trainer(synthetic_data, tmp_path / 'b',
                          config=tiny_config(mask_valid_in_test=True))
    assert not plain.evaluator('test').mask_valid_in_test
    assert strict.evaluator('test').mask_valid_in_test
    assert strict.evaluator('valid').split == 'valid'
