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
           'CheckpointError']

#: version of the checkpoint layout
CHECKPOINT_FORMAT = 1
#: file name of the checkpoint written after every epoch
LAST = 'last.pt'
#: file name of the checkpoint of the best validation epoch
BEST = 'best.pt'


class CheckpointError(RuntimeError):
    r"""A checkpoint is missing, unreadable or of another format/experiment."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    r"""Saves ``state`` (plus the ``format`` key) to ``path`` atomically."""
    state = {'format': CHECKPOINT_FORMAT, **state}
    with atomic_write(path, 'wb') as f:
        torch.save(state, f)


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure
        raise CheckpointError(f'cannot read checkpoint {path}: {exc}') from exc
    if not isinstance(state, dict) or state.get('format') != CHECKPOINT_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f'{path} is not a crane_pyg checkpoint of format '
                              f'{CHECKPOINT_FORMAT} (found {found!r})')
    return state
