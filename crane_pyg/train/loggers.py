r"""Per-epoch experiment logging (``train.logger``).

The :class:`~crane_pyg.train.Trainer` hands every epoch's history record
(loss, its parts, seconds, validation metrics when evaluated) to an
:class:`EpochLogger`:

* ``'csv'`` (default): ``metrics.csv`` in the run directory, one row per
  epoch, columns ``epoch, loss, loss/<part>..., valid/<metric>...,
  train_seconds, eval_seconds``; rewritten atomically from the whole history
  after every epoch, so it always matches ``history.jsonl`` (also after a
  resume).
* ``'tensorboard'``: event files in ``<run>/tensorboard/`` with the scalars
  ``loss/total``, ``loss/<part>``, ``valid/<metric>`` and ``time/...`` per
  epoch (``tensorboard --logdir <run>/tensorboard``). Needs the
  ``tensorboard`` package (``pip install crane_pyg[tensorboard]``).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError
from .utils import atomic_write_text

__all__ = ['LOGGERS', 'METRICS_CSV', 'TENSORBOARD_DIR', 'EpochLogger', 'CSVLogger',
           'TensorBoardLogger', 'check_logger', 'open_logger', 'epoch_scalars']

#: the values of ``train.logger``
LOGGERS = ('csv', 'tensorboard')
METRICS_CSV = 'metrics.csv'
TENSORBOARD_DIR = 'tensorboard'


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    r"""The scalars of one history record, flat: ``loss``, ``loss/<part>``,
    ``valid/<metric>`` (when evaluated), ``train_seconds``, ``eval_seconds``."""
    out: dict[str, float] = {'loss': float(record['loss'])}
    for name, value in record.get('loss_parts', {}).items():
        out[f'loss/{name}'] = float(value)
    for name, value in (record.get('valid') or {}).items():
        out[f'valid/{name}'] = float(value)
    for name in ('train_seconds', 'eval_seconds'):
        if name in record:
            out[name] = float(record[name])
    return out


class EpochLogger:
    r"""Receives every finished epoch; :meth:`close` at the end of the run."""

    def log_epoch(self, record: Mapping[str, Any],
                  history: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CSVLogger(EpochLogger):
    r"""``metrics.csv``: one row per epoch (see the module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / METRICS_CSV

    def log_epoch(self, record: Mapping[str, Any],
                  history: Sequence[Mapping[str, Any]]) -> None:
        rows = [{'epoch': r['epoch'], **epoch_scalars(r)} for r in history]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval='', lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())


class TensorBoardLogger(EpochLogger):
    r"""TensorBoard scalars per epoch in ``<run>/tensorboard/``. Events of
    epochs at or after :obj:`first_epoch` left by an interrupted run are
    purged, so a resumed run shows each epoch once."""

    def __init__(self, output_dir: str | Path, first_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError: check_logger
        self.writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR),
                                    purge_step=first_epoch if first_epoch > 0 else None)

    def log_epoch(self, record: Mapping[str, Any],
                  history: Sequence[Mapping[str, Any]]) -> None:
        epoch = int(record['epoch'])
        for name, value in epoch_scalars(record).items():
            if math.isfinite(value):
                tag = name if '/' in name else ('loss/total' if name == 'loss'
                                                else f'time/{name}')
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_logger(kind: str) -> None:
    r"""Raises :class:`ConfigError` when logger :obj:`kind` cannot be used here
    (unknown, or ``'tensorboard'`` without the package)."""
    if kind not in LOGGERS:
        raise ConfigError(f'must be one of {list(LOGGERS)}, got {kind!r}', key='train.logger')
    if kind == 'tensorboard':
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"'tensorboard' needs the tensorboard package, which is not "
                              f"installed ({exc}); pip install 'crane_pyg[tensorboard]' or "
                              f"use the default logger 'csv'", key='train.logger') from None


def open_logger(kind: str, output_dir: str | Path, first_epoch: int = 0) -> EpochLogger:
    r"""The :class:`EpochLogger` of ``train.logger`` :obj:`kind` for a run in
    :obj:`output_dir` whose next epoch is :obj:`first_epoch`."""
    check_logger(kind)
    if kind == 'tensorboard':
        return TensorBoardLogger(output_dir, first_epoch)
    return CSVLogger(output_dir)
