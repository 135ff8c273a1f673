"""examples/train_amazon.py and benchmarks/compare_models.py end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crane_pyg.train import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'examples' / 'train_amazon.py'


def load_compare_models():
    spec = importlib.util.spec_from_file_location('compare_models',
                                                  REPO / 'benchmarks' / 'compare_models.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(synthetic_root):
    """CLI arguments selecting the small synthetic set of conftest."""
    return ['--data-root', str(synthetic_root.parent), '--dataset', synthetic_root.name]


FAST = ['--set', 'train.batch_size=1024', '--set', 'train.eval_batch_size=300', '--quiet']


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_default_run_trains_crane_on_the_embedded_dataset(tmp_path, monkeypatch, capsys,
                                                          keep_threads):
    monkeypatch.setenv('CRANE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.chdir(tmp_path)
    # the default run; one thread only because the test machine's cores are shared
    assert main(['--epochs', '2', '--set', 'train.num_threads=1']) == 0
    out = capsys.readouterr().out
    [run] = (tmp_path / 'runs').iterdir()  # runs/<dataset>-<model>-seed<seed>-<config hash>
    assert run.name.startswith('synthetic-crane-seed999-') and len(run.name) == 32
    assert f'results: {run.relative_to(tmp_path) / "results.json"}' in out
    results = json.loads((run / 'results.json').read_text())
    assert results['model'] == 'crane' and results['dataset'] == 'synthetic'
    assert results['epochs_run'] == 2 and results['config']['train']['epochs'] == 2
    assert results['data']['users'] == 2000 and results['data']['modalities'] == ['image', 'text']
    assert results['config_sources']['train.epochs'] == 'command line (train.epochs)'
    # the final table: valid and test rows, every metric at every cut-off
    header = next(line for line in out.splitlines() if line.startswith('split'))
    for name in ('Recall', 'NDCG', 'Prec', 'MAP', 'Hit'):
        for k in (10, 20, 50):
            assert f'{name}@{k}' in header
    valid_row = next(line for line in out.splitlines() if line.startswith('valid '))
    assert float(valid_row.split()[2]) == pytest.approx(results['valid']['recall@20'], abs=5e-5)
    assert 'epoch    1 |' in out  # the per-evaluation summary lines
    assert (run / 'curves.png').is_file() and (run / 'config.yaml').is_file()


def test_run_on_a_dataset_folder_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / 'run'
    args = tiny + ['--model', 'lightgcn', '--output', str(out), '--seed', '5'] + FAST
    assert main(args + ['--epochs', '2']) == 0
    assert 'Recall@20' in capsys.readouterr().out
    first = json.loads((out / 'results.json').read_text())
    assert first['config']['train']['seed'] == 5 and first['epochs_run'] == 2
    # continue the same run to 3 epochs
    assert main(args + ['--epochs', '3', '--resume']) == 0
    history = [json.loads(line) for line in (out / 'history.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in history] == [0, 1, 2]
    # the resolved config.yaml reproduces the run's configuration
    assert main(['--config', str(out / 'config.yaml'), '--output', str(tmp_path / 'again'),
                 '--epochs', '3', '--quiet']) == 0
    again = json.loads((tmp_path / 'again' / 'results.json').read_text())
    assert again['config'] == json.loads((out / 'results.json').read_text())['config']
    assert again['test'] == json.loads((out / 'results.json').read_text())['test']


def test_ctrl_c_exits_130_with_a_resume_command(tiny, tmp_path, monkeypatch, capsys):
    from crane_pyg.train import Trainer
    original = Trainer._run_epoch

    def interrupted(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(Trainer, '_run_epoch', interrupted)
    out = tmp_path / 'run'
    args = tiny + ['--model', 'lightgcn', '--output', str(out), '--epochs', '3'] + FAST
    assert main(args) == 130
    err = capsys.readouterr().err
    assert 'Traceback' not in err and 'holds the state after epoch 0' in err
    resume_line = next(line for line in err.splitlines() if line.startswith('to resume: '))
    assert resume_line.endswith(' --resume') and '--epochs 3' in resume_line
    assert not (out / 'results.json').exists()
    monkeypatch.setattr(Trainer, '_run_epoch', original)
    assert main(args + ['--resume']) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['epochs_run'] == 3 and results['status'] == 'completed'


def test_grid_from_a_config_file(tiny, tmp_path):
    config = tmp_path / 'grid.yaml'
    config.write_text('grid:\n  model.num_layers: [0, 1]\n')
    out = tmp_path / 'grid'
    assert main(tiny + ['--model', 'lightgcn', '--config', str(config), '--output', str(out),
                        '--epochs', '1'] + FAST) == 0
    summary = json.loads((out / 'grid_summary.json').read_text())
    assert [p['params'] for p in summary['points']] == [{'model.num_layers': 0},
                                                        {'model.num_layers': 1}]
    winner = summary['points'][summary['winner']]
    other = summary['points'][1 - summary['winner']]
    assert winner['valid']['recall@20'] >= other['valid']['recall@20']
    results = json.loads((out / 'results.json').read_text())
    assert results['config']['model']['num_layers'] == winner['params']['model.num_layers']
    assert (out / 'grid_summary.md').is_file()
    assert (out / 'grid' / '000' / 'results.json').is_file()


def test_modality_selection(tiny, tmp_path, capsys):
    out = tmp_path / 'vbpr'
    assert main(tiny + ['--model', 'vbpr', '--output', str(out), '--epochs', '1',
                        '--set', 'dataset.modalities=[text]'] + FAST) == 0
    assert json.loads((out / 'results.json').read_text())['data']['modalities'] == ['text']
    assert main(tiny + ['--model', 'vbpr', '--output', str(tmp_path / 'audio'), '--epochs',
                        '1', '--set', 'dataset.modalities=[audio]'] + FAST) == 2
    assert "has modalities ['image', 'text'], not ['audio']" in capsys.readouterr().err


@pytest.mark.parametrize('model', ['mgcn', 'lgmrec'])
def test_post_2023_baselines_train_end_to_end(tiny, tmp_path, model, keep_threads):
    out = tmp_path / model
    assert main(tiny + ['--model', model, '--output', str(out), '--epochs', '2',
                        '--set', 'train.num_threads=1'] + FAST) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['model'] == model and results['epochs_run'] == 2
    assert results['data']['modalities'] == ['image', 'text']
    assert 0.0 <= results['test']['recall@20'] <= 1.0
    # its packaged YAML was applied: e.g. LGMRec's hyperedges, MGCN's InfoNCE weight
    expected = {'mgcn': ('cl_weight', 0.01), 'lgmrec': ('num_hyperedges', 4)}[model]
    assert results['config']['model'][expected[0]] == expected[1]


# ---------------------------------------------------------------------------
# errors: exit code 2, a message, no traceback
# ---------------------------------------------------------------------------
def test_missing_dataset_explains_where_and_how(tmp_path, capsys):
    assert main(['--dataset', 'baby', '--data-root', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert str(tmp_path / 'baby' / 'baby.inter') in err
    assert 'https://github.com/enoche/MMRec' in err
    assert 'userID itemID rating timestamp x_label' in err
    assert 'image_feat.npy' in err and 'text_feat.npy' in err


def test_missing_dataset_default_root_is_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('CRANE_DATA_ROOT', str(tmp_path / 'elsewhere'))
    assert main(['--dataset', 'sports']) == 2
    assert str(tmp_path / 'elsewhere' / 'sports' / 'sports.inter') in capsys.readouterr().err


def test_missing_dataset_through_the_script(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), '--dataset', 'clothing',
                           '--data-root', str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=300)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    assert 'clothing.inter' in proc.stderr and 'x_label' in proc.stderr


@pytest.mark.parametrize('argv, expected', [
    (['--set', 'train.lr=abc'], "key 'train.lr': expected float"),
    (['--set', 'train.epoch=3'], "did you mean 'train.epochs'"),
    (['--set', 'model.lambda_c=0.1'], "did you mean 'model.lambda_cl'"),
    (['--set', 'train.lr'], 'expected KEY=VALUE'),
    (['--model', 'lightgcm'], "unknown model 'lightgcm'"),
    (['--config', 'does-not-exist.yaml'], 'config file not found'),
])
def test_bad_configuration_exits_with_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and 'Traceback' not in err


def test_bad_config_file_names_file_and_key(tmp_path, capsys):
    config = tmp_path / 'mine.yaml'
    config.write_text('train:\n  epochs: 1.5\n')
    assert main(['--config', str(config)]) == 2
    assert f"{config}: key 'train.epochs': expected int" in capsys.readouterr().err


def test_malformed_dataset_exits_with_2(tmp_path, capsys):
    folder = tmp_path / 'broken'
    folder.mkdir()
    (folder / 'broken.inter').write_text('user\titem\n0\t1\n')
    assert main(['--dataset', 'broken', '--data-root', str(tmp_path), '--model', 'lightgcn']) == 2
    err = capsys.readouterr().err
    assert 'invalid dataset' in err and 'broken.inter' in err


def test_model_that_cannot_use_the_dataset_exits_with_2(tmp_path, capsys):
    from crane_pyg.data import make_synthetic
    make_synthetic(tmp_path / 'idonly', num_users=60, num_items=40, num_interactions=400,
                   modalities={}, seed=1)
    assert main(['--dataset', 'idonly', '--data-root', str(tmp_path), '--model', 'vbpr',
                 '--epochs', '1', '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert "cannot build model 'vbpr' on dataset 'idonly'" in err


# ---------------------------------------------------------------------------
# output directories: one run each, never overwritten
# ---------------------------------------------------------------------------
def start_training(argv: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    """examples/train_amazon.py in a child process (one thread, an endless
    run); its stderr goes to tmp_path/stderr.txt."""
    stderr = open(tmp_path / 'stderr.txt', 'wb')  # a file: a pipe could fill up
    with stderr:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), *argv, '--epochs', '100000', '--set',
             'train.patience=100000', '--set', 'train.num_threads=1'],
            env={**os.environ, 'PYTHONPATH': str(REPO), **env},
            stdout=subprocess.DEVNULL, stderr=stderr)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (proc.returncode, proc.args)
        assert time.monotonic() < deadline, 'the training process did not get there in time'
        time.sleep(0.1)


def one_line(err: str) -> str:
    """The single line of ``err`` (and no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def test_a_second_run_into_a_busy_output_directory_is_refused(tiny, tmp_path, capsys):
    import yaml
    out = tmp_path / 'same'
    first = start_training(tiny + ['--model', 'lightgcn', '--output', str(out), '--set',
                                   'train.lr=0.001'] + FAST, tmp_path)
    try:
        wait_for(lambda: (out / 'last.pt').exists(), first)
        assert main(tiny + ['--model', 'lightgcn', '--output', str(out), '--epochs', '1',
                            '--set', 'train.lr=0.01'] + FAST) == 2
        line = one_line(capsys.readouterr().err)
        assert f'{out} is in use by another run (pid {first.pid}, started' in line
        assert 'train_amazon.py' in line  # the other run's command
        wait_for(lambda: (out / 'history.jsonl').read_text().count('\n') >= 2, first)
    finally:
        first.terminate()
        first.wait(timeout=60)
    # the first run's files are its own
    assert yaml.safe_load((out / 'config.yaml').read_text())['train']['lr'] == 0.001
    epochs = [json.loads(line)['epoch'] for line in (out / 'history.jsonl').read_text().splitlines()]
    assert epochs == list(range(len(epochs)))
    assert not (out / 'results.json').exists() and not (out / 'run.lock').exists()


def test_default_output_is_per_configuration_and_never_overwritten(tiny, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    base = tiny + ['--model', 'lightgcn'] + FAST
    assert main(base + ['--epochs', '2']) == 0
    [first] = (tmp_path / 'runs').iterdir()
    kept = {name: (first / name).read_bytes() for name in ('results.json', 'best.pt')}
    # other settings: another folder, the first run's results survive
    assert main(base + ['--epochs', '1', '--set', 'train.lr=0.01']) == 0
    assert len(list((tmp_path / 'runs').iterdir())) == 2
    assert all((first / name).read_bytes() == data for name, data in kept.items())
    capsys.readouterr()
    # the same settings (the number of epochs may change on resume) are the same folder
    assert main(base + ['--epochs', '1']) == 2
    line = one_line(capsys.readouterr().err)
    assert f'{first.relative_to(tmp_path)} holds a finished run (results.json)' in line
    assert '--overwrite' in line
    assert all((first / name).read_bytes() == data for name, data in kept.items())
    # --resume finds it and continues it; --overwrite replaces it
    assert main(base + ['--epochs', '3', '--resume']) == 0
    assert json.loads((first / 'results.json').read_text())['epochs_run'] == 3
    assert main(base + ['--epochs', '1', '--overwrite']) == 0
    assert json.loads((first / 'results.json').read_text())['epochs_run'] == 1
    (first / 'results.json').unlink()  # as after Ctrl-C: last.pt only
    capsys.readouterr()
    assert main(base + ['--epochs', '1']) == 2
    assert 'holds an unfinished run (last.pt; --resume continues it)' in one_line(
        capsys.readouterr().err)


# ---------------------------------------------------------------------------
# every error one line on stderr, exit code 2 (usage) or 1 (failed run)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('argv, expected', [
    (['--seed', str(2**70)], "command line (train.seed): key 'train.seed': must be at most "
                             "2**63 - 1"),
    (['--set', 'train.ks=[20, 100000]'], "key 'train.ks': cut-off 100000 is larger than the "
                                         "200 items of dataset 'synthetic-small'"),
    pytest.param(['--device', 'cuda'], "key 'train.device': device 'cuda' requested but CUDA "
                 "is not available", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                               reason='has CUDA')),
    pytest.param(['--set', 'train.device=mps'], "key 'train.device': device 'mps' requested but "
                 "MPS is not available", marks=pytest.mark.skipif(
                     torch.backends.mps.is_available(), reason='has MPS')),
])
def test_usage_errors_are_one_line_with_exit_code_2(tiny, tmp_path, capsys, argv, expected):
    assert main(tiny + argv + ['--output', str(tmp_path / 'out'), '--epochs', '1'] + FAST) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_binary_config_file(tmp_path, capsys):
    config = tmp_path / 'weights.bin'
    config.write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00')
    assert main(['--config', str(config)]) == 2
    assert (f'{config}: not a YAML text file: byte 0x89 at offset 0 is not UTF-8'
            in one_line(capsys.readouterr().err))


def test_unusable_output_directories(tiny, tmp_path, monkeypatch, capsys):
    from crane_pyg.train import rundir
    (tmp_path / 'a-file').write_text('x')
    assert main(tiny + ['--output', str(tmp_path / 'a-file')] + FAST) == 2
    assert f'{tmp_path / "a-file"} exists and is not a directory' in one_line(
        capsys.readouterr().err)
    assert (tmp_path / 'a-file').read_text() == 'x'
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only mount answers
        if str(path).endswith(rundir.LOCK):
            raise OSError(30, 'Read-only file system', str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(rundir.os, 'open', read_only)
    assert main(tiny + ['--output', str(tmp_path / 'ro')] + FAST) == 2
    assert (f'cannot write to the output directory {tmp_path / "ro"}: Read-only file system'
            in one_line(capsys.readouterr().err))


def test_full_disk_while_saving_a_checkpoint_exits_1(tiny, tmp_path, monkeypatch, capsys):
    import contextlib
    from crane_pyg.train import checkpoint
    if not Path('/dev/full').exists():
        pytest.skip('needs /dev/full')

    @contextlib.contextmanager
    def full_disk(path, mode):  # every write fails with ENOSPC, as torch.save meets it
        with open('/dev/full', mode) as f:
            yield f

    monkeypatch.setattr(checkpoint, 'atomic_write', full_disk)
    out = tmp_path / 'run'
    assert main(tiny + ['--model', 'lightgcn', '--output', str(out), '--epochs', '1'] + FAST) == 1
    line = one_line(capsys.readouterr().err)
    assert f'cannot write checkpoint {out / "last.pt"}: No space left on device (errno 28)' in line


def test_a_diverging_run_exits_1_and_debug_shows_the_traceback(tiny, tmp_path, capsys):
    argv = tiny + ['--model', 'crane', '--output', str(tmp_path / 'run'), '--epochs', '2',
                   '--set', 'train.lr=1e6'] + FAST
    assert main(argv) == 1
    assert 'error: the run diverged: the training loss is nan at epoch 0' in one_line(
        capsys.readouterr().err)
    assert main(['--seed', str(2**70), '--debug']) == 2
    err = capsys.readouterr().err
    assert 'Traceback' in err and err.strip().splitlines()[-1].endswith(
        f'must be at most 2**63 - 1 = {2**63 - 1}, got {2**70}')


def test_resume_from_an_empty_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'last.pt').write_bytes(b'')
    assert main(tiny + ['--model', 'lightgcn', '--output', str(out), '--resume'] + FAST) == 2
    assert (f'cannot read checkpoint {out / "last.pt"}: the file is empty (0 bytes)'
            in one_line(capsys.readouterr().err))


def test_a_missing_modality_is_warned_about(tmp_path, capsys):
    from crane_pyg.data import make_synthetic
    make_synthetic(tmp_path / 'textonly', num_users=60, num_items=50, num_interactions=500,
                   modalities={'text': 8}, seed=1)
    argv = ['--data-root', str(tmp_path), '--dataset', 'textonly', '--model', 'vbpr',
            '--epochs', '1'] + FAST
    assert main(argv + ['--output', str(tmp_path / 'a')]) == 0
    line = one_line(capsys.readouterr().err)
    assert (f"warning: dataset 'textonly' has a single modality, 'text': no other "
            f"<modality>_feat.npy in {tmp_path / 'textonly'}, so vbpr trains on text alone"
            in line) and 'dataset.modalities=[text]' in line
    # confirmed: no warning; a model without content features: no warning
    assert main(argv + ['--output', str(tmp_path / 'b'), '--set', 'dataset.modalities=[text]']) == 0
    assert main(argv + ['--output', str(tmp_path / 'c'), '--model', 'lightgcn']) == 0
    assert capsys.readouterr().err == ''


def test_stale_temporaries_are_removed(tiny, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.last.pt.q8x_2mzk.tmp').write_bytes(b'half a checkpoint')  # a kill mid-write
    assert main(tiny + ['--model', 'lightgcn', '--output', str(out), '--epochs', '1'] + FAST) == 0
    assert not list(out.glob('.*.tmp'))


@pytest.mark.skipif(not hasattr(os, 'killpg'), reason='POSIX signals')
def test_sigterm_saves_says_how_to_resume_and_leaves_no_temporary_files(tiny, tmp_path):
    import signal
    from crane_pyg.train import load_checkpoint
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    out = tmp_path / 'run'
    proc = start_training(tiny + ['--model', 'crane', '--output', str(out)] + FAST, tmp_path,
                          TMPDIR=str(tmp))
    try:
        wait_for(lambda: (out / 'history.jsonl').exists()
                 and (out / 'history.jsonl').read_text().count('\n') >= 1, proc)
        # the trainer appends the epoch to history.jsonl before it writes
        # best.pt and last.pt: a signal in between leaves last.pt at epoch -1
        # (correct, but not what this test checks), so wait for last.pt too
        wait_for(lambda: load_checkpoint(out / 'last.pt')['epoch'] >= 0, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130  # as for Ctrl-C
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / 'stderr.txt').read_text()
    assert 'Traceback' not in err
    epoch = load_checkpoint(out / 'last.pt')['epoch']
    assert epoch >= 0 and f'holds the state after epoch {epoch}' in err
    resume = next(line for line in err.splitlines() if line.startswith('to resume: '))
    assert resume.endswith('--resume') and f'--output {out}' in resume
    assert [p.name for p in tmp.iterdir() if not p.name.startswith('torchinductor_')] == []
    assert not (out / 'run.lock').exists()


# ---------------------------------------------------------------------------
# benchmarks/compare_models.py
# ---------------------------------------------------------------------------
def test_compare_models_in_process(tiny, tmp_path):
    compare_models = load_compare_models()
    out = tmp_path / 'cmp'
    argv = tiny + ['--models', 'lightgcn,vbpr', '--seeds', '1,2', '--epochs', '1',
                   '--output', str(out), '--in-process'] + FAST
    assert compare_models.main(argv) == 0
    summary = json.loads((out / 'comparison.json').read_text())
    assert [row['model'] for row in summary['rows']] == ['lightgcn', 'vbpr']
    assert len(summary['runs']) == 4
    for row in summary['rows']:
        runs = [r for r in summary['runs'] if r['model'] == row['model']]
        values = [r['test']['recall@20'] for r in runs]
        stat = row['test']['recall@20']
        assert stat['values'] == values
        assert stat['mean'] == pytest.approx(sum(values) / 2)
        assert stat['std'] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        for run in runs:
            on_disk = json.loads((Path(run['output_dir']) / 'results.json').read_text())
            assert on_disk['test'] == run['test'] and on_disk['config']['train']['seed'] == run['seed']
    markdown = (out / 'comparison.md').read_text()
    assert '| lightgcn | 2 |' in markdown and '±' in markdown and 'NDCG@20' in markdown
    assert not list(out.glob('.*.tmp'))
    # --resume reuses the finished runs (no training: same numbers)
    assert compare_models.main(argv + ['--resume']) == 0
    assert json.loads((out / 'comparison.json').read_text())['rows'] == summary['rows']


def test_compare_models_subprocess_and_errors(tiny, tmp_path, capsys):
    compare_models = load_compare_models()
    out = tmp_path / 'cmp'
    assert compare_models.main(tiny + ['--models', 'lightgcn', '--seeds', '7', '--epochs', '1',
                                       '--output', str(out)] + FAST) == 0
    summary = json.loads((out / 'comparison.json').read_text())
    assert summary['runs'][0]['seed'] == 7 and summary['rows'][0]['test']['recall@20']['std'] is None
    assert '| lightgcn | 1 |' in (out / 'comparison.md').read_text()
    capsys.readouterr()
    assert compare_models.main(tiny + ['--models', 'lightgcn,foo']) == 2
    assert "unknown model 'foo'" in capsys.readouterr().err
    assert compare_models.main(['--dataset', 'baby', '--data-root', str(tmp_path)]) == 2
    assert 'baby.inter' in capsys.readouterr().err
    assert compare_models.main(tiny + ['--seeds', '1,x']) == 2


def test_compare_models_variants_train_each_with_its_overrides(tiny, tmp_path, capsys):
    """``LABEL=MODEL:KEY=VALUE`` entries (ablations): each variant trains its
    model with its own overrides into ``<LABEL>-seed<seed>``, is a row of its
    own and is tested against the target per user."""
    compare_models = load_compare_models()
    out = tmp_path / 'cmp'
    argv = tiny + ['--models', 'lightgcn,one-layer=lightgcn:model.num_layers=1:train.lr=0.01',
                   '--seeds', '1', '--epochs', '1', '--output', str(out), '--in-process',
                   '--target', 'lightgcn'] + FAST
    assert compare_models.main(argv) == 0
    summary = json.loads((out / 'comparison.json').read_text())
    assert summary['models'] == ['lightgcn', 'one-layer']
    assert summary['variants'] == {'one-layer': {
        'model': 'lightgcn', 'overrides': ['model.num_layers=1', 'train.lr=0.01']}}
    config = json.loads((out / 'one-layer-seed1' / 'results.json').read_text())['config']
    assert config['model']['name'] == 'lightgcn' and config['model']['num_layers'] == 1
    assert config['train']['lr'] == 0.01
    plain = json.loads((out / 'lightgcn-seed1' / 'results.json').read_text())['config']
    assert plain['model']['num_layers'] != 1 and plain['train']['lr'] != 0.01
    assert set(summary['significance']['against']) == {'one-layer'}
    markdown = (out / 'comparison.md').read_text()
    assert '| one-layer | 1 |' in markdown and '`model.num_layers=1`' in markdown
    # a list value keeps its commas: one variant, not three entries
    variants = compare_models.parse_models(
        'crane,mb=crane:train.num_neighbors=[10,10]:train.semantic_cache=10')
    assert [v.label for v in variants] == ['crane', 'mb']
    assert variants[1].overrides == ('train.num_neighbors=[10,10]', 'train.semantic_cache=10')
    capsys.readouterr()
    for bad in ('x=lightgcn', 'lightgcn:model.num_layers=1', 'a/b=lightgcn:model.num_layers=1',
                'x=lightgcn:num_layers', 'lightgcn,lightgcn', 'x=lightgcn:model.nope=1'):
        assert compare_models.main(tiny + ['--models', bad, '--output', str(out)]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith('compare_models.py: error:') and 'Traceback' not in err, err


def _processes_mentioning(text: str) -> list[int]:
    """PIDs (Linux /proc) whose command line contains ``text``."""
    pids = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path('/proc/self/cmdline').exists(), reason='needs Linux /proc')
@pytest.mark.parametrize('background', [False, True], ids=['foreground', 'sigint-ignored'])
def test_compare_models_sigterm_stops_the_training_subprocess(tiny, tmp_path, background):
    """``kill <compare_models>`` ends its training subprocess, which saves a
    checkpoint and prints how to resume, instead of leaving it running; also
    when the job was started in the background by a shell (SIGINT ignored
    by it and by its children, so only SIGTERM reaches the trainer)."""
    import signal
    import time
    out = tmp_path / 'cmp'
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    log = tmp_path / 'stderr.txt'

    def ignore_sigint():  # what `command &` does to a job in a non-interactive shell
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with open(log, 'wb') as stderr:  # a file: a pipe would wait for the child's end too
        parent = subprocess.Popen(
            [sys.executable, str(REPO / 'benchmarks' / 'compare_models.py'), *tiny,
             '--models', 'lightgcn', '--seeds', '3', '--epochs', '100000', '--output', str(out),
             *FAST, '--set', 'train.num_threads=1', '--set', 'train.patience=100000'],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            preexec_fn=ignore_sigint if background else None)
    run_dir = str(out / 'lightgcn-seed3')
    children = []
    try:
        deadline = time.monotonic() + 120
        while not (out / 'lightgcn-seed3' / 'last.pt').exists():  # the child is training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        children = [pid for pid in _processes_mentioning(run_dir) if pid != parent.pid]
        assert children, 'no training subprocess found'
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 130
        left = [pid for pid in children if pid in _processes_mentioning(run_dir)]
        assert not left, f'training subprocess {left} still running'
        text = log.read_text()
        assert 'interrupted' in text
        # the trainer itself stopped (a killed child prints nothing)
        assert 'to resume: ' in text and '--resume' in text
    finally:  # never leave a process behind, whatever failed
        for pid in [parent.pid] + children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_compare_models_tune_selects_on_validation_and_tests_per_user(tiny, tmp_path):
    """--tune: each model searches its declared space (same number of points)
    with the first seed, the winner is the best *validation* point, the first
    seed's run is that point, and the per-user paired test averages the
    users' values over seeds (its means equal the table's)."""
    compare_models = load_compare_models()
    out = tmp_path / 'cmp'
    argv = tiny + ['--models', 'lightgcn,vbpr', '--seeds', '1,2', '--epochs', '1',
                   '--output', str(out), '--in-process', '--tune'] + FAST
    assert compare_models.main(argv) == 0
    summary = json.loads((out / 'comparison.json').read_text())
    for model in ('lightgcn', 'vbpr'):
        tuning = summary['tuning'][model]
        assert tuning['trials'] == 4 and tuning['epochs'] == 4
        grid = json.loads((out / f'{model}-tune' / 'grid_summary.json').read_text())
        best = max(grid['points'], key=lambda p: p['valid']['recall@20'])
        assert tuning['params'] == best['params'] == grid['params']
        seed1 = next(r for r in summary['runs'] if r['model'] == model and r['seed'] == 1)
        assert seed1['output_dir'] == best['output_dir']
        seed2 = json.loads((out / f'{model}-seed2' / 'results.json').read_text())
        for key, value in best['params'].items():  # the winner is trained for seed 2
            section, name = key.split('.')
            assert seed2['config'][section][name] == value
    sig = summary['significance']
    assert sig['target'] == 'lightgcn' and sig['best_baseline'] == 'vbpr'
    test = sig['against']['vbpr']['recall@20']
    rows = {row['model']: row for row in summary['rows']}
    assert test['mean_a'] == pytest.approx(rows['lightgcn']['test']['recall@20']['mean'], rel=1e-5)
    assert test['mean_b'] == pytest.approx(rows['vbpr']['test']['recall@20']['mean'], rel=1e-5)
    assert 0 <= test['p_value'] <= 1
    markdown = (out / 'comparison.md').read_text()
    assert 'Tuning (seed 1' in markdown and '| vbpr | recall@20 |' in markdown
