r"""Atomic training checkpoints.

A checkpoint is a ``dict`` saved with :func:`torch.save` that loads with
``torch.load(..., weights_only=True)`` (only tensors and plain Python values):

=================  ==========================================================
``format``         :data:`CHECKPOINT_FORMAT` (refuses to load other versions)
``epoch``          the last *completed* epoch (0-based; ``-1``: none yet)
``model``          ``model.state_dict()`` (parameters and persistent buffers,
                   e.g. a rebuilt item-item graph)
``optimizer``      ``optimizer.state_dict()``
``early_stop``     ``{'best_epoch', 'best_score', 'bad_evals', 'valid', 'test'}``
``history``        the per-epoch records written to ``history.jsonl``
``timing``         training and validation seconds of every epoch so far
``rng``            :func:`crane_pyg.train.utils.get_rng_state` (Python, NumPy,
                   torch, CUDA) taken at the end of ``epoch``
``sampler_seed``   the :class:`~crane_pyg.data.BPRSampler` seed (the sampler is
                   stateless: epoch ``e`` is a function of ``(seed, e)``)
``config``         the full experiment configuration (plain data)
=================  ==========================================================

``last.pt`` is rewritten after every epoch and ``best.pt`` at every new best
validation score, each through a temporary file in the same directory and
:func:`os.replace`, so an interruption never leaves a truncated checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .utils import atomic_write

__all__ = ['CHECKPOINT_FORMAT', 'LAST', 'BEST', 'save_checkpoint', 'load_checkpoint',
           'CheckpointError', 'CheckpointWriteError']

#: version of the checkpoint layout
CHECKPOINT_FORMAT = 1
#: file name of the checkpoint written after every epoch
LAST = 'last.pt'
#: file name of the checkpoint of the best validation epoch
BEST = 'best.pt'


class CheckpointError(RuntimeError):
    r"""A checkpoint is missing, unreadable or of another format/experiment."""


class CheckpointWriteError(CheckpointError):
    r"""A checkpoint could not be written (full disk, I/O error); the
    previous file at the path is left as it was."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    r"""Saves ``state`` (plus the ``format`` key) to ``path`` atomically.

    Raises:
        CheckpointWriteError: the write failed; the message names the path
            and the operating system's reason (e.g. ``No space left on
            device``), which :func:`torch.save` may only hold in a chained
            exception.
    """
    state = {'format': CHECKPOINT_FORMAT, **state}
    try:
        with atomic_write(path, 'wb') as f:
            torch.save(state, f)
    except Exception as exc:  # noqa: BLE001 - torch wraps I/O errors in RuntimeError
        raise CheckpointWriteError(f'cannot write checkpoint {path}: '
                                   f'{_write_failure(exc)}') from exc


def _write_failure(exc: BaseException) -> str:
    r"""The operating system's reason among ``exc`` and the exceptions chained
    to it, else ``exc`` itself."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return f'{error.strerror} (errno {error.errno})'
        todo += [error.__cause__, error.__context__]
    return _reason(exc)


def _reason(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {detail[0]}' if detail else type(exc).__name__


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = 'cpu') -> dict[str, Any]:
    r"""Loads a checkpoint written by :func:`save_checkpoint` (``weights_only``).

    Raises:
        CheckpointError: the file does not exist, cannot be read, or has another
            format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.stat().st_size == 0:
        raise CheckpointError(f'cannot read checkpoint {path}: the file is empty (0 bytes)')
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure
        raise CheckpointError(f'cannot read checkpoint {path}: {_reason(exc)} (a truncated '
                              f'or foreign file?)') from exc
    if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f'{path} is not a crane_pyg checkpoint of format '
                              f'{CHECKPOINT_FORMAT} (found {found!r})')
    return state
