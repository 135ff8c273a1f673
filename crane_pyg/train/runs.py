r"""Reading finished runs back: the configuration and checkpoint of a run
directory (as written by :func:`~crane_pyg.train.run_single`) rebuilt into a
trained model, and its per-user metrics on a split (for paired significance
tests and for diagnosing what each view of a model contributes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checkpoint import BEST, load_checkpoint
from .config import ConfigError, ExperimentConfig, load_config
from .trainer import CONFIG_COPY, load_dataset

__all__ = ['load_trained_run', 'per_user_metrics']


def load_trained_run(run_dir: str | os.PathLike, checkpoint: str = BEST, *,
                     data: Any = None, overrides: Sequence[str] = ()
                     ) -> Tuple[ExperimentConfig, Any, torch.nn.Module]:
    r"""``(config, data, model)`` of a finished run: the resolved
    configuration ``<run_dir>/config.yaml`` (plus :obj:`overrides`, e.g.
    ``dataset.root=...``), its dataset (unless :obj:`data` is given) and the
    model built from it with the weights of ``<run_dir>/<checkpoint>``, in
    eval mode on the CPU.

    Raises:
        ConfigError: no ``config.yaml`` in :obj:`run_dir`.
        CheckpointError: the checkpoint is missing or unreadable.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG_COPY
    if not config_file.is_file():
        raise ConfigError(f'{run_dir} is not a run directory: no {CONFIG_COPY}')
    config = load_config(config_file=config_file, overrides=overrides)
    state = load_checkpoint(run_dir / checkpoint)
    if data is None:
        data = load_dataset(config.dataset)
    registry = config.registry
    if registry is None:
        from crane_pyg.models import MODELS as registry
    model = registry[config.model_name].from_data(data, **config.model_options)
    model.load_state_dict(state['model'])
    model.eval()
    return config, data, model


@torch.no_grad()
def per_user_metrics(model: torch.nn.Module, data: Any, split: str = 'test',
                     ks: Sequence[int] = (10, 20), *,
                     embeddings: Optional[Tuple[Tensor, Tensor]] = None,
                     batch_size: int = 4096, evaluator: Any = None) -> dict[str, Any]:
    r"""Per-user full-ranking metrics of :obj:`model` on :obj:`split`:
    ``{'users': LongTensor[n], '<metric>@<k>': Tensor[n], ...}`` over the
    users the :class:`~crane_pyg.metrics.FullRankingEvaluator` evaluates
    (those with a held-out item in the split). :obj:`embeddings` replaces
    ``model.embeddings()`` (e.g. one view of CRANE); :obj:`evaluator`, a
    :class:`~crane_pyg.metrics.FullRankingEvaluator` of :obj:`data` built
    once, is reused instead of building one per call (several runs or views
    on the same data)."""
    from crane_pyg.metrics import FullRankingEvaluator

    if evaluator is None:
        evaluator = FullRankingEvaluator(data, split=split, ks=ks, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        if embeddings is None:
            embeddings = model.embeddings()
        score: Callable[[Tensor], Tensor] = (
            lambda users: model.score_all_items(users, embeddings))
        values = evaluator.evaluate_per_user(score)
    finally:
        model.train(was_training)
    return {'users': evaluator.users.cpu(), **{k: v.cpu() for k, v in values.items()}}
