"""The run lock of an output directory (crane_pyg.train.rundir)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crane_pyg.train.rundir import LOCK, OutputDirError, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='fcntl locks')


def hold_lock_in_a_child(directory: Path) -> subprocess.Popen:
    """A process that takes the lock of ``directory`` and waits."""
    code = ('import sys, time; from crane_pyg.train.rundir import RunLock; '
            'RunLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(120)')
    child = subprocess.Popen([sys.executable, '-c', code, str(directory)],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert child.stdout.readline().strip() == 'locked'
    return child


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / 'run'
    child = hold_lock_in_a_child(run)
    try:
        holder = json.loads((run / LOCK).read_text())
        assert holder['pid'] == child.pid
        with pytest.raises(RunLockedError, match=f'in use by another run \\(pid {child.pid}, '
                                                 f'started .*-c'):
            RunLock(run).acquire()
    finally:
        child.send_signal(signal.SIGKILL)  # dies without releasing: its lock file stays
        child.wait()
    assert json.loads((run / LOCK).read_text())['pid'] == child.pid
    with pytest.warns(UserWarning, match=f'taking over the lock .*pid {child.pid}'):
        with RunLock(run):
            assert json.loads((run / LOCK).read_text())['pid'] == os.getpid()
    assert not (run / LOCK).exists()  # removed on release


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    outer = RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # the experiment runner inside the CLI, the trainer inside it
        pass
    assert (tmp_path / LOCK).exists()  # still held by the outer one
    outer.release()
    assert not (tmp_path / LOCK).exists()


def test_taking_the_lock_removes_temporaries_of_killed_writes(tmp_path):
    stale = [tmp_path / '.last.pt.k3_x9abc.tmp', tmp_path / '.results.json.a1b2c3d4.tmp']
    kept = [tmp_path / '.last.pt.tmp', tmp_path / 'notes.tmp', tmp_path / 'last.pt']
    for path in stale + kept:
        path.write_bytes(b'x')
    with RunLock(tmp_path):
        assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_unusable_directories(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(OutputDirError, match='exists and is not a directory'):
        RunLock(tmp_path / 'file').acquire()
    with pytest.raises(OutputDirError, match='cannot create the output directory'):
        RunLock(tmp_path / 'file' / 'below').acquire()
