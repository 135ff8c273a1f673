r"""A trained model back from its run directory or checkpoint (``crane-pyg
evaluate`` / ``recommend``).

A run directory (the trainer's ``--output``) holds ``config.yaml`` (the
resolved configuration) and ``best.pt`` / ``last.pt``; a checkpoint file
carries its configuration too. :func:`load_trained` reads the configuration,
loads the dataset it names (``dataset.root`` may be redirected), builds the
model with ``from_data`` and loads the checkpoint's weights into it,
checking that checkpoint and dataset belong together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import BEST, LAST, CheckpointError, load_checkpoint
from .config import ConfigError, ExperimentConfig, load_config
from .runs import load_trained_run
from .trainer import CONFIG_COPY, load_dataset, locate_dataset
from .utils import resolve_device

__all__ = ['TrainedModel', 'load_trained', 'CHECKPOINTS']

#: ``--checkpoint`` choices -> file name in a run directory
CHECKPOINTS = {'best': BEST, 'last': LAST}


@dataclass
class TrainedModel:
    r"""A model with trained weights and the dataset it was trained on.

    Attributes:
        model (Recommender): in eval mode, on the requested device.
        data (HeteroData): the dataset (training, validation, test splits).
        config (ExperimentConfig): the run's configuration.
        checkpoint (Path): the checkpoint file the weights came from.
        folder (Path or None): the dataset folder (``None`` for the embedded
            synthetic dataset).
        epoch (int): the checkpoint's last completed epoch.
    """
    model: torch.nn.Module
    data: Any
    config: ExperimentConfig
    checkpoint: Path
    folder: Path | None
    epoch: int


def load_trained(path: str | os.PathLike, *, checkpoint: str = 'best',
                 data_root: str | os.PathLike | None = None,
                 device: str = 'cpu') -> TrainedModel:
    r"""Loads the trained model of a run directory or checkpoint file.

    Args:
        path: a run directory (``config.yaml`` + checkpoints) or a ``.pt``
            checkpoint written by the trainer.
        checkpoint (str): in a run directory, ``'best'`` (``best.pt``, the
            best validation epoch) or ``'last'`` (``last.pt``).
        data_root (path, optional): where the dataset folder is now (replaces
            the run's ``dataset.root``).
        device (str): ``'cpu'``, ``'cuda'``, ``'auto'``.

    Raises:
        CheckpointError: no checkpoint there, an unreadable one, or one whose
            weights do not fit the dataset (another dataset, or the folder
            changed since training). Only sizes can be compared: a folder with
            the same numbers of users and items (and feature sizes) but other
            content is not detected.
        ConfigError, DatasetNotFoundError, DataFormatError: the configuration
            or the dataset cannot be used.
    """
    from crane_pyg.models import MODELS

    path = Path(path)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {list(CHECKPOINTS)}, got {checkpoint!r}")
    if path.is_dir():
        file = path / CHECKPOINTS[checkpoint]
        if not file.is_file():
            present = sorted(p.name for p in path.glob('*.pt'))
            raise CheckpointError(f'{path} holds no {file.name} (found: '
                                  f'{", ".join(present) or "no checkpoint"}); is it a run '
                                  f'directory of `crane-pyg train`?')
    elif path.is_file():
        file = path
    else:
        raise CheckpointError(f'{path}: no such run directory or checkpoint file')
    state = load_checkpoint(file, map_location='cpu')
    flags = {'dataset.root': str(data_root)} if data_root is not None else {}
    yaml_file = file.parent / CONFIG_COPY
    if yaml_file.is_file():
        config = load_config(config_file=yaml_file, flags=flags)
    else:
        stored = state.get('config')
        if not isinstance(stored, Mapping):
            raise CheckpointError(f'{file} carries no configuration and there is no '
                                  f'{CONFIG_COPY} beside it')
        config = load_config(config_file=_without_grid(stored), flags=flags,
                             config_source=f'{file} (its configuration)')
    trained_on = state.get('dataset')
    if trained_on is not None and trained_on != config.dataset.name:
        raise CheckpointError(f'{file} was trained on dataset {trained_on!r}, but its '
                              f'configuration names {config.dataset.name!r}')
    folder = locate_dataset(config.dataset)
    data = load_dataset(config.dataset)
    try:
        if yaml_file.is_file():  # a run directory: runs.load_trained_run builds the model
            _, _, model = load_trained_run(file.parent, file.name, data=data)
        else:  # a checkpoint alone, with the configuration it carries
            model = MODELS[config.model_name].from_data(data, **config.model_options)
            model.load_state_dict(state['model'])
    except (CheckpointError, ConfigError):
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f'cannot build model {config.model_name!r} on dataset '
                          f'{config.dataset.name!r}: {exc}') from exc
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first
                      else type(exc).__name__)
        where = folder if folder is not None else 'the embedded synthetic dataset'
        raise CheckpointError(
            f'{file} does not fit dataset {config.dataset.name!r} in {where} '
            f'({data["user"].num_nodes} users, {data["item"].num_nodes} items): the checkpoint '
            f'was trained on other data ({detail})') from None
    model = model.to(resolve_device(device)).eval()
    return TrainedModel(model=model, data=data, config=config, checkpoint=file, folder=folder,
                        epoch=int(state.get('epoch', -1)))


def _without_grid(config: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k in ('dataset', 'model', 'train')}
    return out
