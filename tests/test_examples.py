"""The examples run as a user runs them."""
import os
import re
import subprocess
import sys
from pathlib import Path

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
