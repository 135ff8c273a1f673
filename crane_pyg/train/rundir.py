r"""One run per output directory.

A run holds an exclusive lock on its output directory for its whole life:
the file ``run.lock`` in the directory, locked with :func:`fcntl.flock` and
holding the owner's pid, host, start time and command line. A second run
into the same directory fails at once with :class:`RunLockedError`, which
names the first; nothing of the first run's files is touched. The kernel
releases the lock when its process ends, however it ends, so a lock left by
a killed run (``kill -9``) is taken over by the next run, with a warning
naming the dead process. The lock file is removed when the run ends.

Taking the lock also removes the temporary files of atomic writes
(``.<name>.<random>.tmp``, :func:`~crane_pyg.train.utils.atomic_write`) that
a run killed mid-write left in the directory.

A process may take the lock of a directory it already holds (the CLI, the
experiment runner and the :class:`~crane_pyg.train.Trainer` all take it);
only the outermost release gives it up. In a data-parallel run rank 0 holds
the lock and the other ranks learn its outcome (:func:`locked_output_dir`).

On a system without :mod:`fcntl` (Windows) the directory is not locked.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .utils import remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ['LOCK', 'OutputDirError', 'RunLockedError', 'RunLock', 'locked_output_dir']

#: name of the lock file in a run's output directory
LOCK = 'run.lock'

# realpath of a lock file held by this process -> [file descriptor, depth]
_HELD: dict[str, list[int]] = {}


class OutputDirError(ValueError):
    r"""The output directory cannot be used: it is a file, cannot be created
    or written, is in use by another run, or holds a run that would be
    overwritten. A usage error (exit code 2 on the command line)."""


class RunLockedError(OutputDirError):
    r"""Another live process holds the lock of the output directory.

    Attributes:
        holder (dict): what its lock file says (``pid``, ``host``,
            ``started``, ``command``; empty when unreadable).
    """
    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        self.holder = holder
        who = _describe(holder) if holder else 'its lock file names no process yet'
        super().__init__(f'{directory} is in use by another run ({who}); wait for it to '
                         f'end or choose another output directory (--output)')


def _describe(holder: dict[str, Any]) -> str:
    text = f"pid {holder.get('pid')}"
    if holder.get('host') and holder['host'] != socket.gethostname():
        text += f" on {holder['host']}"
    if holder.get('started'):
        text += f", started {holder['started']}"
    if holder.get('command'):
        text += f": {holder['command']}"
    return text


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        content = json.loads(os.read(fd, 65536).decode('utf-8'))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _make_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(f'{directory} exists and is not a directory')
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f'cannot create the output directory {directory}: '
                             f'{exc.strerror or exc}') from None


def _lock_file(path: Path) -> tuple[int, dict[str, Any]]:
    r"""Opens and locks ``path``; returns the descriptor and the previous
    holder's record (empty when the file was new)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(f'cannot write to the output directory {path.parent}: '
                                 f'{exc.strerror or exc}') from None
        if fcntl is None:  # pragma: no cover - Windows: no lock
            return fd, {}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(path.parent, holder) from None
        except OSError as exc:  # e.g. a file system without locks
            os.close(fd)
            raise OutputDirError(f'cannot lock {path}: {exc.strerror or exc}') from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)  # its holder removed the file meanwhile: lock the new one


class RunLock:
    r"""The lock of one output directory (see the module docstring); a
    context manager. :meth:`acquire` creates the directory.

    Raises (on :meth:`acquire`):
        OutputDirError: the directory is a file, or cannot be created or
            written.
        RunLockedError: another process holds the lock.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self._key: str | None = None

    def acquire(self) -> 'RunLock':
        if self._key is not None:
            return self
        _make_directory(self.directory)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        fd, previous = _lock_file(self.path)
        record = {'pid': os.getpid(), 'host': socket.gethostname(),
                  'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                  'command': ' '.join([os.path.basename(sys.executable)] + sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + '\n').encode('utf-8'))
        except OSError as exc:
            os.close(fd)
            raise OutputDirError(f'cannot write to the output directory {self.directory}: '
                                 f'{exc.strerror or exc}') from None
        _HELD[key] = [fd, 1]
        self._key = key
        if previous:
            warnings.warn(f'{self.directory}: taking over the lock left by a run that ended '
                          f'without releasing it ({_describe(previous)})', UserWarning,
                          stacklevel=2)
        remove_stale_temporaries(self.directory)
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(key)  # while still locked: a waiting opener retries
            os.close(entry[0])

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked_output_dir(directory: str | os.PathLike, distributed: Any = None,
                      check: Callable[[Path], None] | None = None) -> Iterator[None]:
    r"""Holds the :class:`RunLock` of ``directory`` for the block; ``check``
    (e.g. a refusal to overwrite a finished run) runs under the lock and may
    raise :class:`OutputDirError`. In a data-parallel run
    (``distributed``, a :class:`~crane_pyg.train.distributed.DistributedContext`)
    rank 0 takes the lock and the other ranks raise the same error when it
    fails (every rank must call this)."""
    lock, error = RunLock(directory), None
    if distributed is None or distributed.is_main:
        try:
            lock.acquire()
            if check is not None:
                check(Path(directory))
        except OutputDirError as exc:
            lock.release()
            error = exc
    if distributed is not None and distributed.world_size > 1:
        from .distributed import broadcast_object
        message = broadcast_object(None if error is None else str(error), distributed)
        if message is not None and error is None:
            error = OutputDirError(message)
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()
