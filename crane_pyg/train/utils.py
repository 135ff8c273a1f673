"""Small helpers of the training loop: reproducibility, atomic file writes,
peak memory and the library versions recorded with every result."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, IO, Iterator

import numpy as np
import torch

__all__ = [
    'atomic_write', 'atomic_write_text', 'atomic_write_json', 'remove_stale_temporaries',
    'configure_reproducibility', 'seed_everything', 'get_rng_state', 'set_rng_state',
    'resolve_device', 'available_cpus', 'sigterm_as_interrupt', 'interrupts_deferred',
    'reset_peak_memory', 'peak_memory_mb', 'library_versions', 'to_jsonable',
]

TMP_SUFFIX = '.tmp'
#: the name of a temporary file of :func:`atomic_write` (``mkstemp`` adds 8
#: random characters): ``.<name>.<random>.tmp``
_TMP_NAME = re.compile(r'\.(?P<name>.+)\.[A-Za-z0-9_]{8}' + re.escape(TMP_SUFFIX))


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    The temporary file lives in the same directory (``.<name>.<random>.tmp``) so
    that :func:`os.replace` is an atomic rename: a reader sees either the old
    file or the complete new one, never a half-written file. On an exception
    (including :class:`KeyboardInterrupt`) the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=TMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(directory: str | os.PathLike,
                             name: str | None = None) -> list[Path]:
    """Deletes the temporary files that :func:`atomic_write` left in
    ``directory`` when its process was killed mid-write (of ``name`` only,
    when given); returns them. Only call it while no other process writes
    there (e.g. holding the run lock of :mod:`crane_pyg.train.rundir`)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _TMP_NAME.fullmatch(entry.name)
            if match and (name is None or match.group('name') == name) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, 'w') as f:
        f.write(text)


def to_jsonable(obj: Any) -> Any:
    """Turn tuples, paths, numpy and 0-d torch scalars into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.generic, torch.Tensor)) and getattr(obj, 'ndim', 0) == 0:
        return obj.item()
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=True) + '\n')


# ---------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's :mod:`random`, NumPy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_reproducibility(seed: int, deterministic: bool = False,
                              num_threads: int | None = None,
                              flush_denormal: bool | None = None) -> None:
    """Seed every generator and, optionally, switch torch to deterministic kernels.

    Args:
        seed: seed for Python, NumPy and torch.
        deterministic: call ``torch.use_deterministic_algorithms(True, warn_only=True)``,
            disable cuDNN autotuning, set ``CUBLAS_WORKSPACE_CONFIG`` for CUDA and
            fix the number of CPU threads (``num_threads``, 1 when not given), so a
            run is bit-for-bit repeatable on the same machine.
        num_threads: number of intra-op CPU threads (``torch.set_num_threads``);
            ``None`` leaves torch's default unless ``deterministic`` is set.
        flush_denormal: ``torch.set_flush_denormal`` (CPU: denormal floats
            become zero, avoiding very slow arithmetic on them); ``None``
            leaves the setting as it is.
    """
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        if num_threads is None:
            num_threads = 1
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if flush_denormal is not None:
        torch.set_flush_denormal(bool(flush_denormal))  # False where unsupported
    seed_everything(seed)


def get_rng_state() -> dict[str, Any]:
    """Snapshot of every global generator, as plain tensors/lists.

    The result only holds tensors, lists, ints, floats and strings, so a checkpoint
    holding it loads with ``torch.load(..., weights_only=True)``.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        'python': [py_version, list(py_internal), py_gauss],
        'numpy': [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`get_rng_state`."""
    py_version, py_internal, py_gauss = state['python']
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state['numpy']
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss,
                         np_gauss))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def resolve_device(device: str) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU.

    Raises:
        RuntimeError: the device does not exist here: ``'cuda'`` without a
            GPU, ``'cuda:<n>'`` beyond the GPUs present, ``'mps'`` on a build
            or machine without it.
    """
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available "
                           f"(torch {torch.__version__}); use device 'cpu' or 'auto'")
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f'device {device!r} requested but this machine has '
                           f'{torch.cuda.device_count()} CUDA device(s)')
    mps = getattr(torch.backends, 'mps', None)
    if dev.type == 'mps' and not (mps is not None and mps.is_available()):
        raise RuntimeError(f"device {device!r} requested but MPS is not available (torch "
                           f"{torch.__version__} on {platform.system()}); use device 'cpu' "
                           f"or 'auto'")
    return dev


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system
    has one, else :func:`os.cpu_count`)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (what ``kill`` and cluster schedulers send)
    raises :class:`KeyboardInterrupt` like Ctrl-C, so that it is handled the
    same way. Does nothing outside the main thread (where Python cannot set
    signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are held back and delivered (to
    the handlers in place before) once it ends, so that the block completes:
    e.g. a checkpoint and the record of the epoch it holds, which a Ctrl-C
    between the two would make disagree. Does nothing outside the main
    thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


# ---------------------------------------------------------------------------
# memory and versions
# ---------------------------------------------------------------------------
def compile_support_problem(device: torch.device) -> str | None:
    r"""Why :func:`torch.compile` (its default Inductor backend) cannot
    generate code for :obj:`device`, or :obj:`None` when it can (or when this
    torch does not say): CPU code needs a C++ compiler, CUDA code needs
    Triton. Checked before training so that ``train.compile`` fails at once
    with a clear message instead of in the first step."""
    if device.type == 'cuda':
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return None
        return None if has_triton() else 'torch.compile on CUDA needs Triton, which is not installed'
    if device.type == 'cpu':
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:
            return None
        try:
            get_cpp_compiler()
        except Exception as exc:  # InvalidCxxCompiler and friends
            return f'torch.compile on CPU needs a C++ compiler ({type(exc).__name__}: {exc})'
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter (the CPU peak cannot be reset)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak_memory`
    (tensors only, not the caching allocator's reserve). CPU: the process' peak
    resident set size, ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on
    macOS); it is a high-water mark over the whole process, so in a process that
    runs several experiments it includes the earlier ones.
    """
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20, 'cuda_max_memory_allocated'
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == 'darwin' else 1024.0
    return rss * scale / 2**20, 'ru_maxrss'


def _version(module: str, dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), '__version__', 'unknown')
    except Exception:  # noqa: BLE001 - a broken optional extension is reported as absent
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of the interpreter and the libraries a result depends on (``None``: absent)."""
    import crane_pyg
    return {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'torch_geometric': _version('torch_geometric', 'torch-geometric'),
        'torch_sparse': _version('torch_sparse', 'torch-sparse'),
        'torch_scatter': _version('torch_scatter', 'torch-scatter'),
        'numpy': np.__version__,
        'crane_pyg': crane_pyg.__version__,
        'cuda': torch.version.cuda if torch.cuda.is_available() else None,
    }

