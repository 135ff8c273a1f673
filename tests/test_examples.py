"""The examples run as a user runs them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crane_pyg.nn import available_backends

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 120) -> str:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')])
    proc = subprocess.run([sys.executable, str(REPO_ROOT / 'examples' / script), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_reuse_layers(tmp_path):
    out = _run('reuse_layers.py', '--epochs', '2', '--root', str(tmp_path))
    untrained = float(re.search(r'untrained: valid recall@20 ([\d.]+)', out).group(1))
    epochs = re.findall(r'epoch (\d+): BPR loss ([\d.]+), valid recall@20 ([\d.]+)', out)
    assert [int(e) for e, _, _ in epochs] == [0, 1], out
    losses = [float(loss) for _, loss, _ in epochs]
    recalls = [float(r) for _, _, r in epochs]
    assert losses[1] < losses[0], out
    assert recalls[-1] > untrained + 0.02, out


def _hetero_example():
    import runpy
    return runpy.run_path(str(REPO_ROOT / 'examples' / 'hetero_layers.py'))


def test_hetero_layers_script(tmp_path):
    out = _run('hetero_layers.py', '--root', str(tmp_path))
    diffs = re.findall(r'(\w+): max \|HeteroConv - CRANE\| = ([\d.e+-]+)', out)
    assert [v for v, _ in diffs] == ['behavioural', 'semantic', 'full'], out
    assert all(float(d) <= 1e-5 for _, d in diffs), out


@pytest.mark.parametrize('backend', available_backends())
@pytest.mark.parametrize('options', [
    {}, dict(user_semantic='profile', precompute_profiles=False, profile_norm='sym'),
    dict(user_semantic='items', fusion='concat', num_ii_layers=2),
    dict(semantic_scale=None, id_item_graph=False, num_ui_layers=3),
])
def test_hetero_layers_match_the_model(tmp_path, backend, options):
    """UserItemConv, ItemItemConv, UserProfileAggregation and RCA in HeteroConv /
    to_hetero over load_mmrec's HeteroData give CRANE's own views, on every
    installed backend."""
    example = _hetero_example()
    model, data = example['build'](str(tmp_path), backend, **options)
    diff = example['check'](model, data, backend, atol=1e-5)
    assert set(diff) == {'behavioural', 'semantic', 'full'}
