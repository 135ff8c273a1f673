r"""The training loop, experiment runner and command-line entry point.

:class:`Trainer` implements the MMRec protocol (``docs/ARCHITECTURE.md``
section 6, design brief section 4):

* Adam on BPR batches from :class:`~crane_pyg.data.BPRSampler` (one uniform
  negative per training interaction, a fresh shuffle per epoch, a pure
  function of ``(seed, epoch)``); ``model.on_epoch_start(epoch)`` before each
  epoch;
* full-ranking validation every ``eval_every`` epochs and after the last one;
  early stopping after ``patience`` evaluations without a strict improvement
  of ``stop_metric`` (validation Recall@20);
* **test at the best validation epoch**: the test split is evaluated right
  after every validation evaluation that sets a new best, on exactly the
  model that produced that score, and only the latest one is kept. This costs
  one extra evaluation per improvement but needs no reload of the best
  weights (a reload would silently miss any model state kept outside the
  ``state_dict``); the test numbers never influence training or selection.

Epochs are numbered from 0, as :meth:`Recommender.on_epoch_start` and
:meth:`BPRSampler.batches` see them; ``best_epoch`` uses the same numbering.

Files written to ``output_dir`` (all atomically, except the appended history):

* ``last.pt`` after every epoch, ``best.pt`` at every new best
  (:mod:`crane_pyg.train.checkpoint`);
* ``history.jsonl``: one JSON object per epoch (loss and its parts, seconds,
  validation metrics when evaluated);
* ``curves.png``: loss and validation Recall@K / NDCG@K over the epochs;
* ``metrics.csv`` (or ``tensorboard/``, ``train.logger``): the loss parts and
  validation metrics per epoch (:mod:`crane_pyg.train.loggers`);
* ``results.json`` when the run finishes (:meth:`Trainer.fit`).

``resume=True`` restores ``last.pt`` (weights, optimizer, early-stopping
state, history and every random generator) and continues; the run then ends
with exactly the numbers of an uninterrupted run with the same seed. A
:class:`KeyboardInterrupt` stops the run cleanly: ``last.pt`` holds the last
completed epoch and the message says how to resume (:func:`main` turns
SIGTERM into one). For its whole life a run holds the lock of its output
directory (:mod:`crane_pyg.train.rundir`): a second run into it fails at once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import (BEST, LAST, CheckpointError, CheckpointWriteError, load_checkpoint,
                         save_checkpoint)
from .loggers import EpochLogger, check_logger, open_logger
from .config import (ConfigError, DataConfig, ExperimentConfig, TrainConfig,
                     default_data_root, expand_grid, load_config)
from .rundir import OutputDirError, locked_output_dir
from .utils import (atomic_write, atomic_write_json, atomic_write_text, available_cpus,
                    compile_support_problem, configure_reproducibility, get_rng_state,
                    library_versions, peak_memory_mb, remove_stale_temporaries,
                    reset_peak_memory, resolve_device, set_rng_state, sigterm_as_interrupt,
                    interrupts_deferred, to_jsonable)

__all__ = ['Trainer', 'DatasetNotFoundError', 'load_dataset', 'locate_dataset', 'run_experiment',
           'run_single', 'run_grid', 'plot_curves', 'format_metrics_table', 'run_name',
           'build_parser', 'main', 'RESULTS', 'HISTORY', 'CURVES']

RESULTS = 'results.json'
#: how a run ended, by status (``results.json``'s ``ended_by``)
ENDED_BY = {'completed': 'epoch_limit', 'early_stopped': 'early_stopping',
            'paused': 'paused', 'interrupted': 'interrupted'}
#: the summary line's words for it
ENDINGS = {'completed': 'stopped by the epoch limit (train.epochs) before early stopping',
           'early_stopped': 'early stopping', 'paused': 'paused', 'interrupted': 'interrupted'}
#: a best epoch among this many first evaluations, with ``patience`` more after
#: it, is warned about (:meth:`Trainer.early_best_warning`)
EARLY_EVALUATIONS = 3
HISTORY = 'history.jsonl'
CURVES = 'curves.png'
CONFIG_COPY = 'config.yaml'
GRID_SUMMARY = 'grid_summary'

#: options that may differ between a checkpoint and the resumed run (they do
#: not change the trajectory of the epochs already run)
RESUMABLE_CHANGES = ('train.epochs', 'train.patience', 'train.device', 'train.eval_batch_size',
                     'train.num_threads', 'train.compile', 'train.logger')

#: options added after runs were recorded, with the value every older run had:
#: at that value they are left out of the run hash and the resume check, so
#: older run folders and checkpoints keep their names and stay resumable
LATER_OPTIONS = {'train.mask_valid_in_test': False, 'train.precision': 'fp32',
                 'train.semantic_cache': None, 'model.semantic_gate': False,
                 'model.semantic_item_graph': True}

Callback = Callable[['Trainer', dict], None]


class Trainer:
    r"""Trains a :class:`~crane_pyg.models.Recommender` with the MMRec protocol.

    Args:
        model (Recommender): the model (moved to the configured device).
        data (HeteroData): the dataset from :func:`crane_pyg.data.load_mmrec`
            (training, validation and test interactions).
        config (TrainConfig): the protocol.
        output_dir (str or Path, optional): where checkpoints, history, curves
            and ``results.json`` go (created; locked while :meth:`fit` runs);
            default ``runs/<dataset>-<model>-seed<seed>-<hash>`` (:func:`run_name`
            of ``experiment``).
        experiment (dict, optional): the full configuration recorded in the
            checkpoints and ``results.json`` (default: ``{'train': config}``).
        dataset_name (str, optional): recorded as ``dataset`` (default
            ``data.name``).
        model_name (str, optional): recorded as ``model`` (default the class
            name, lower case).
        resume (bool): continue from ``output_dir/last.pt`` when it exists.
        quiet (bool): no progress bar and no per-evaluation lines.
        max_epochs_this_run (int, optional): stop (status ``'paused'``, resumable)
            after this many epochs of this call, e.g. to split a run.
        callbacks (sequence of callables): ``callback(trainer, record)`` after
            every epoch, once its checkpoint is written (``record`` is the
            epoch's history entry). A callback may raise
            :class:`KeyboardInterrupt` to stop the run as Ctrl-C would.
        log (callable, optional): where the per-evaluation lines go
            (default :func:`print`).
        restore_best (bool): load the best epoch's weights into :obj:`model`
            when the run finishes. (default: :obj:`True`)
        extra_results (dict, optional): more entries for ``results.json``.
        plot (bool): write ``curves.png`` whenever :meth:`fit` returns.
            (default: :obj:`True`)
        distributed (DistributedContext, optional): data-parallel training
            (:mod:`crane_pyg.train.distributed`): the model is wrapped in
            :class:`~torch.nn.parallel.DistributedDataParallel`, each rank
            trains on its shard of every epoch with batches of
            ``batch_size / world_size`` triples (``batch_size`` stays the
            *global* batch), evaluation is sharded over users, only rank 0
            writes files, and early stopping is decided on rank 0 and
            broadcast. ``config.device`` is replaced by the context's device.
        find_unused_parameters (bool): passed to DDP; needed only by a model
            whose loss leaves some parameters without gradient.
            (default: :obj:`False`)
        loss_module (torch.nn.Module, optional): the module called as
            ``loss_module(users, pos, neg) -> (loss, parts)`` in training,
            sharing the model's parameters; default the model itself, or, when
            ``config.num_neighbors`` is set,
            :func:`~crane_pyg.models.minibatch.minibatch_loss_module`'s
            (:class:`~crane_pyg.models.minibatch.MiniBatchCRANE` for CRANE,
            :class:`~crane_pyg.models.minibatch.MiniBatchLightGCN` for
            LightGCN; :class:`TypeError` for the other models; with
            ``config.semantic_cache`` too, the CRANE one reads cached codes),
            or, when only ``config.semantic_cache`` is set,
            :class:`~crane_pyg.models.semantic_cache.CachedSemanticCRANE`
            (CRANE only). A loss module with an ``on_epoch_start(epoch)``
            method has it called after the model's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Any,
        config: TrainConfig,
        output_dir: str | os.PathLike | None = None,
        *,
        experiment: Mapping[str, Any] | None = None,
        dataset_name: str | None = None,
        model_name: str | None = None,
        resume: bool = False,
        quiet: bool = False,
        max_epochs_this_run: int | None = None,
        callbacks: Sequence[Callback] = (),
        log: Callable[[str], None] | None = None,
        restore_best: bool = True,
        extra_results: Mapping[str, Any] | None = None,
        plot: bool = True,
        distributed: Any = None,
        find_unused_parameters: bool = False,
        loss_module: torch.nn.Module | None = None,
    ) -> None:
        from crane_pyg.data import BPRSampler
        from crane_pyg.data.schema import ITEM, USER, USER_ITEM

        if not isinstance(config, TrainConfig):
            raise TypeError(f'config must be a TrainConfig, got {type(config).__name__}')
        if max_epochs_this_run is not None and max_epochs_this_run < 1:
            raise ValueError(f'max_epochs_this_run must be >= 1, got {max_epochs_this_run}')
        self.config = config
        self.distributed = distributed
        self.world_size = distributed.world_size if distributed is not None else 1
        self.rank = distributed.rank if distributed is not None else 0
        #: whether this process writes the outputs (rank 0)
        self.is_main = self.rank == 0
        if config.batch_size % self.world_size != 0:
            raise ValueError(f'train.batch_size = {config.batch_size} (the global batch) must '
                             f'be a multiple of the {self.world_size} processes')
        self.device = distributed.device if distributed is not None \
            else resolve_device(config.device)
        self.model = model.to(self.device)
        self.data = data
        self.experiment = (dict(experiment) if experiment is not None
                           else {'train': to_jsonable(dataclasses.asdict(config))})
        self.dataset_name = dataset_name or getattr(data, 'name', None) or 'unknown'
        self.model_name = model_name or type(model).__name__.lower()
        if output_dir is None:
            output_dir = Path('runs') / run_name(self.dataset_name, self.model_name,
                                                 config.seed, self.experiment)
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.quiet = quiet
        self.max_epochs_this_run = max_epochs_this_run
        self.callbacks = list(callbacks)
        self.log = log if log is not None else (lambda line: print(line, flush=True))
        self.restore_best = restore_best
        self.extra_results = dict(extra_results or {})
        self.plot = plot

        store = data[USER_ITEM]
        self.num_users = int(data[USER].num_nodes)
        self.num_items = int(data[ITEM].num_nodes)
        too_large = [k for k in config.ks if k > self.num_items]
        if too_large:
            raise ConfigError(f'cut-off {too_large[0]} is larger than the {self.num_items} '
                              f'items of dataset {self.dataset_name!r} (metric@k ranks k '
                              f'items); use cut-offs of at most {self.num_items}, e.g. '
                              f"--set 'train.ks=[10, 20]'", key='train.ks')
        cpus = available_cpus()
        if config.num_threads is not None and config.num_threads > cpus:
            warnings.warn(f'train.num_threads = {config.num_threads} is more than the {cpus} '
                          f'CPUs available to this process; the threads will compete for '
                          f'them (slower, not faster)', UserWarning, stacklevel=2)
        self.sampler = BPRSampler(store.edge_index, self.num_users, self.num_items,
                                  seed=config.seed, device=self.device,
                                  rank=self.rank, world_size=self.world_size)
        from .precision import resolve_precision
        #: the precision used (``config.precision``, or ``'fp32'`` where the
        #: device lacks it: :mod:`crane_pyg.train.precision`)
        self.precision = resolve_precision(config.precision, self.device)
        if self.precision != 'fp32' and not self.quiet:
            self._log(f'train.precision: {self.precision} (dense parts; sparse propagation, '
                      f'weights and Adam in float32)')
        if config.compile:
            compiled = self.model.compile_modules()
            problem = compile_support_problem(self.device) if compiled else None
            if problem is not None:
                raise RuntimeError(f'train.compile: {problem}; set train.compile=false to run '
                                   f'eagerly')
            if not self.quiet:
                self._log(f'train.compile: compiled {", ".join(compiled)} of '
                          f'{type(self.model).__name__} (torch.compile; the first steps '
                          f'compile)' if compiled else
                          f'train.compile: {type(self.model).__name__} has no module to '
                          f'compile; running eagerly')
        if loss_module is None and config.num_neighbors is not None:
            from crane_pyg.models.minibatch import minibatch_loss_module  # TypeError: not CRANE/LightGCN
            loss_module = minibatch_loss_module(self.model, config.num_neighbors,
                                                semantic_cache=config.semantic_cache)
        if loss_module is None and config.semantic_cache is not None:
            from crane_pyg.models.semantic_cache import CachedSemanticCRANE  # TypeError: not CRANE
            loss_module = CachedSemanticCRANE(self.model, config.semantic_cache)
        self._loss_module = loss_module
        #: the module called for the training loss (``model`` or ``loss_module``,
        #: wrapped in DDP when distributed)
        self.train_model: torch.nn.Module = (self.model if loss_module is None
                                             else loss_module.to(self.device))
        if distributed is not None and self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # Buffers are not synchronised in forward: they are derived from
            # the data or updated deterministically (same seed) on every rank,
            # and some change size (CRANE's rebuilt item graph).
            import inspect
            sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in
                    inspect.signature(DistributedDataParallel.__init__).parameters
                    else {'broadcast_buffers': False})
            self.train_model = DistributedDataParallel(
                self.train_model,
                device_ids=[self.device] if self.device.type == 'cuda' else None,
                find_unused_parameters=find_unused_parameters, **sync)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self._evaluators: dict[str, Any] = {}
        check_logger(config.logger)  # before training: tensorboard may be missing
        self._epoch_logger: EpochLogger | None = None

        # state (what last.pt holds)
        self.epoch = -1                 # last completed epoch
        self.best_epoch = -1
        self.best_score = -math.inf
        self.best_valid: dict[str, float] = {}
        self.best_test: dict[str, float] = {}
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_after: list[int] = []  # the epochs after which this run was resumed
        self._saved_epoch = -1          # the epoch of the last.pt on disk

    # ------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------
    def evaluator(self, split: str):
        r"""The (cached) :class:`~crane_pyg.metrics.FullRankingEvaluator` of ``split``."""
        if split not in self._evaluators:
            from crane_pyg.metrics import FullRankingEvaluator
            self._evaluators[split] = FullRankingEvaluator(
                self.data, split=split, ks=self.config.ks,
                batch_size=self.config.eval_batch_size, device=self.device,
                mask_valid_in_test=self.config.mask_valid_in_test)
        return self._evaluators[split]

    @torch.no_grad()
    def evaluate(self, split: str = 'valid') -> dict[str, float]:
        r"""Full-ranking metrics of the current model on ``split`` (eval mode,
        final embeddings computed once and reused for every user batch)."""
        evaluator = self.evaluator(split)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():  # the ranking scores stay float32
                embeddings = tuple(e.float() for e in self.model.embeddings())

            def score(users: Tensor) -> Tensor:
                return self.model.score_all_items(users, embeddings)

            from .distributed import evaluate_sharded
            return evaluate_sharded(evaluator, score, self.distributed)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        r"""The checkpoint contents (see :mod:`crane_pyg.train.checkpoint`)."""
        return {
            'epoch': self.epoch,
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'early_stop': {'best_epoch': self.best_epoch, 'best_score': self.best_score,
                           'bad_evals': self.bad_evals, 'valid': dict(self.best_valid),
                           'test': dict(self.best_test)},
            'history': self.history,
            'resumed_after': list(self.resumed_after),
            'rng': get_rng_state(),
            'sampler_seed': self.sampler.seed,
            'config': to_jsonable(self.experiment),
            'dataset': self.dataset_name,
            'model_name': self.model_name,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        r"""Restores a checkpoint written by :meth:`state` (after checking that it
        belongs to the same experiment)."""
        self._check_compatible(state)
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        early = state['early_stop']
        self.epoch = int(state['epoch'])
        self.best_epoch = int(early['best_epoch'])
        self.best_score = float(early['best_score'])
        self.bad_evals = int(early['bad_evals'])
        self.best_valid = dict(early['valid'])
        self.best_test = dict(early['test'])
        self.history = list(state['history'])
        self.resumed_after = list(state.get('resumed_after', []))  # older checkpoints lack it
        set_rng_state(state['rng'])

    def _check_compatible(self, state: Mapping[str, Any]) -> None:
        path = self.output_dir / LAST
        if state.get('sampler_seed') != self.sampler.seed:
            raise CheckpointError(f'{path} was written with seed {state.get("sampler_seed")}, '
                                  f'this run uses seed {self.sampler.seed}')
        old = _flatten(state.get('config', {}))
        new = _flatten(to_jsonable(self.experiment))
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            details = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed[:5])
            raise CheckpointError(f'{path} belongs to another configuration ({details}); '
                                  f'use another output directory or drop --resume')

    def _autocast(self):
        from .precision import autocast
        return autocast(self.precision, self.device)

    def _log(self, line: str) -> None:
        if self.is_main:
            self.log(line)

    def _save_last(self) -> None:
        with interrupts_deferred():  # last.pt and _saved_epoch agree whenever Ctrl-C comes
            if self.is_main:
                save_checkpoint(self.output_dir / LAST, self.state())
            self._saved_epoch = self.epoch
        if self.is_main:
            # what a run killed while writing it left (taking the lock removes them too)
            remove_stale_temporaries(self.output_dir, LAST)

    # ------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[float, dict[str, float]]:
        self.model.train()
        self.model.on_epoch_start(epoch)
        if self._loss_module is not self.model and hasattr(self._loss_module, 'on_epoch_start'):
            # the semantic cache (train.semantic_cache)
            self._loss_module.on_epoch_start(epoch)
        batch_size = self.config.batch_size // self.world_size  # per rank
        total, parts_sum, count = 0.0, {}, 0
        bar = tqdm(self.sampler.batches(epoch, batch_size),
                   total=self.sampler.num_batches(batch_size),
                   desc=f'epoch {epoch}', leave=False, unit='batch',
                   disable=self.quiet or not self.is_main or not sys.stderr.isatty())
        try:
            for step, (users, pos, neg) in enumerate(bar):
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    loss, parts = self.train_model(users, pos, neg)  # == model.loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f'the training loss is {value} at epoch {epoch}, batch {step} '
                        f'(parts: {parts}); lower train.lr or check the data')
                loss.backward()
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                n = users.numel()
                total += value * n
                for key, part in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(part) * n
                count += n
                bar.set_postfix(loss=f'{value:.4f}', refresh=False)
        finally:
            bar.close()
        if self.world_size > 1:  # the epoch's mean over all ranks' triples
            from .distributed import all_reduce_sum
            keys = sorted(parts_sum)
            sums = all_reduce_sum(torch.tensor([total, float(count)]
                                               + [parts_sum[k] for k in keys],
                                               dtype=torch.float64), self.distributed)
            total, count = float(sums[0]), float(sums[1])
            parts_sum = {k: float(v) for k, v in zip(keys, sums[2:])}
        return total / count, {k: v / count for k, v in parts_sum.items()}

    def _should_evaluate(self, epoch: int) -> bool:
        return (epoch + 1) % self.config.eval_every == 0 or epoch == self.config.epochs - 1

    def _finished(self) -> bool:
        return self.bad_evals >= self.config.patience or self.epoch >= self.config.epochs - 1

    def fit(self) -> dict[str, Any]:
        r"""Runs (or resumes) training; returns the results.

        Returns:
            dict: the content of ``results.json`` (see :meth:`results`). Its
            ``status`` is ``'completed'`` (all epochs), ``'early_stopped'``,
            ``'paused'`` (``max_epochs_this_run`` reached) or ``'interrupted'``
            (:class:`KeyboardInterrupt`); ``results.json`` is written only for
            the first two.

        Raises:
            ~crane_pyg.train.rundir.RunLockedError: another run holds the
                output directory.
            FloatingPointError: the training loss is not finite.
            ~crane_pyg.train.checkpoint.CheckpointWriteError: a checkpoint
                cannot be written (e.g. a full disk).
        """
        with locked_output_dir(self.output_dir, self.distributed):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        reset_peak_memory(self.device)
        cfg = self.config
        configure_reproducibility(cfg.seed, cfg.deterministic, cfg.num_threads,
                                  cfg.flush_denormal)
        last = self.output_dir / LAST
        resuming = self.resume and last.is_file()
        if self.distributed is not None and self.world_size > 1:
            from .distributed import barrier, broadcast_object
            resuming = broadcast_object(resuming, self.distributed)  # rank 0 decides
            barrier(self.distributed)
        if resuming:
            self.load_state(load_checkpoint(last, map_location='cpu'))
            self._saved_epoch = self.epoch
            self.resumed_after.append(self.epoch)
            if self.is_main:
                _rewrite_history(self.output_dir / HISTORY, self.history)
            self._log(f'resuming {self.output_dir} after epoch {self.epoch} '
                     f'(best {self.config.stop_metric} {self.best_score:.4f} '
                     f'at epoch {self.best_epoch})')
        else:
            if self.resume:
                self._log(f'no {LAST} in {self.output_dir}: starting a fresh run')
            if self.is_main:
                for stale in (RESULTS, BEST, CURVES):
                    (self.output_dir / stale).unlink(missing_ok=True)
                _rewrite_history(self.output_dir / HISTORY, [])
            self._save_last()  # the initial state: a Ctrl-C in epoch 0 can resume

        if self.is_main:
            self._epoch_logger = open_logger(cfg.logger, self.output_dir, self.epoch + 1)
        status = 'paused'
        epochs_this_run = 0
        try:
            while not self._finished():
                if (self.max_epochs_this_run is not None
                        and epochs_this_run >= self.max_epochs_this_run):
                    break
                self._run_epoch(self.epoch + 1)
                epochs_this_run += 1
            else:
                status = ('early_stopped' if self.bad_evals >= self.config.patience
                          else 'completed')
        except KeyboardInterrupt:
            status = 'interrupted'
            if self.is_main:
                print(f'\ninterrupted: {self.output_dir / LAST} holds the state after epoch '
                  f'{self._saved_epoch}; continue the run with the same command plus --resume '
                  f'(Trainer(..., resume=True) in Python)', file=sys.stderr, flush=True)
        finally:
            if self._epoch_logger is not None:
                self._epoch_logger.close()
                self._epoch_logger = None
            if self.history and self.plot and self.is_main:
                failing = sys.exc_info()[0] is not None
                try:
                    plot_curves(self.history, self.output_dir / CURVES, self.config.stop_metric)
                except OSError:
                    if not failing:  # else the error in flight (a full disk?) is the news
                        raise

        results = self.results(status)
        if status in ('completed', 'early_stopped'):
            early = self.early_best_warning()
            if early is not None:
                results['warnings'] = [early]
                if self.is_main:
                    warnings.warn(early)
            if self.distributed is not None:
                from .distributed import barrier
                barrier(self.distributed)  # rank 0 has written best.pt
            if self.restore_best and (self.output_dir / BEST).is_file():
                best = load_checkpoint(self.output_dir / BEST, map_location='cpu')
                self.model.load_state_dict(best['model'])
            if self.is_main:
                atomic_write_json(self.output_dir / RESULTS, results)
            if not self.quiet:
                self._log(f'{ENDINGS[status]} after epoch {self.epoch}; best '
                         f'{self.config.stop_metric} {self.best_score:.4f} at epoch '
                         f'{self.best_epoch}; results in {self.output_dir / RESULTS}')
        return results

    def early_best_warning(self) -> str | None:
        r"""A warning when the best validation epoch is among the first
        :data:`EARLY_EVALUATIONS` evaluations although at least ``patience``
        more followed: the model peaked right after a fast start and then
        stalled (or training diverged from it), a run to look at before
        trusting its figures. :obj:`None` otherwise."""
        evaluated = [r['epoch'] for r in self.history if 'valid' in r]
        if self.best_epoch < 0 or self.best_epoch not in evaluated:
            return None
        rank = evaluated.index(self.best_epoch)
        after = len(evaluated) - rank - 1
        if rank >= EARLY_EVALUATIONS or after < self.config.patience:
            return None
        return (f'the best {self.config.stop_metric} came at epoch {self.best_epoch}, '
                f'evaluation {rank + 1} of {len(evaluated)}, and the {after} evaluations '
                f'after it did not improve on it: the run peaked right after its start; '
                f'check the curves ({self.output_dir / CURVES}) before trusting the result')

    def _run_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        loss, parts = self._train_epoch(epoch)
        record: dict[str, Any] = {'epoch': epoch, 'loss': loss, 'loss_parts': parts,
                                  'train_seconds': time.perf_counter() - start}
        if self._should_evaluate(epoch):
            start = time.perf_counter()
            valid = self.evaluate('valid')
            record['valid'] = valid
            record['eval_seconds'] = time.perf_counter() - start
            score = valid[self.config.stop_metric]
            improved = score > self.best_score
            if self.distributed is not None and self.world_size > 1:
                # identical metrics on every rank already; rank 0's decision
                # is broadcast so that no rounding can make the ranks diverge
                from .distributed import broadcast_object
                improved = broadcast_object(improved, self.distributed)
            if improved:
                self.best_score, self.best_epoch, self.bad_evals = score, epoch, 0
                self.best_valid = dict(valid)
                start = time.perf_counter()
                self.best_test = self.evaluate('test')
                record['test_seconds'] = time.perf_counter() - start
            else:
                self.bad_evals += 1
            record['best'] = improved
            record['best_epoch'] = self.best_epoch
            record['bad_evals'] = self.bad_evals
            if not self.quiet:
                self._log(_summary_line(record, self.config.stop_metric))
        self.epoch = epoch
        self.history.append(record)
        # a Ctrl-C / SIGTERM after the history line waits for last.pt of the same
        # epoch (it used to hit the best.pt save and leave last.pt one epoch behind)
        with interrupts_deferred():
            if self.is_main:
                with open(self.output_dir / HISTORY, 'a', encoding='utf-8') as f:
                    f.write(json.dumps(to_jsonable(record)) + '\n')
                if self._epoch_logger is not None:
                    self._epoch_logger.log_epoch(record, self.history)
                if record.get('best'):
                    save_checkpoint(self.output_dir / BEST, self.state())
            self._save_last()
        for callback in self.callbacks:
            callback(self, record)

    # ------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------
    def results(self, status: str = 'completed') -> dict[str, Any]:
        r"""The results so far.

        Keys: ``dataset``, ``model``, ``status``, ``ended_by``
        (``'early_stopping'``, ``'epoch_limit'``: every epoch of
        ``train.epochs`` ran and early stopping never fired, ``'paused'`` or
        ``'interrupted'``), ``resumed_after_epochs`` (the epochs after which
        the run was resumed), ``warnings`` (when there are any, e.g.
        :meth:`early_best_warning`), ``config`` (the full configuration), ``best_epoch``, ``stop_metric``, ``valid`` and ``test``
        (flat ``{'recall@10': ..., 'ndcg@20': ..., ...}`` at the best validation
        epoch), ``epochs_run``, ``seconds_per_epoch`` (median training epoch),
        ``eval_seconds`` (median validation pass), ``total_train_seconds``,
        ``peak_memory_mb`` with ``peak_memory_source``, ``device``,
        ``num_parameters``, ``data`` (sizes) and ``versions``.
        """
        train_times = [r['train_seconds'] for r in self.history]
        eval_times = [r['eval_seconds'] for r in self.history if 'eval_seconds' in r]
        peak, source = peak_memory_mb(self.device)
        from crane_pyg.data.schema import USER_ITEM
        store = self.data[USER_ITEM]
        return {
            'dataset': self.dataset_name,
            'model': self.model_name,
            'status': status,
            'ended_by': ENDED_BY[status],
            'resumed_after_epochs': list(self.resumed_after),
            'config': to_jsonable(self.experiment),
            'best_epoch': self.best_epoch,
            'stop_metric': self.config.stop_metric,
            'valid': dict(self.best_valid),
            'test': dict(self.best_test),
            'epochs_run': self.epoch + 1,
            'seconds_per_epoch': statistics.median(train_times) if train_times else None,
            'eval_seconds': statistics.median(eval_times) if eval_times else None,
            'total_train_seconds': sum(train_times),
            'peak_memory_mb': peak,
            'peak_memory_source': source,
            'device': str(self.device),
            'precision': self.precision,
            'world_size': self.world_size,
            'num_parameters': sum(p.numel() for p in self.model.parameters()),
            'data': {'users': self.num_users, 'items': self.num_items,
                     'train': int(store.edge_index.size(1)),
                     'valid': int(store.val_edge_index.size(1)) if 'val_edge_index' in store else 0,
                     'test': int(store.test_edge_index.size(1)) if 'test_edge_index' in store else 0,
                     'modalities': list(getattr(self.data, 'modalities', []) or [])},
            'versions': library_versions(),
            **self.extra_results,
        }


def run_name(dataset: str, model: str, seed: int, experiment: Mapping[str, Any]) -> str:
    r"""The default name of a run's output folder,
    ``<dataset>-<model>-seed<seed>-<hash>``: ``hash`` is 8 hex digits of the
    SHA-256 of the resolved configuration ``experiment`` (the ``config`` of
    ``results.json``) without ``dataset.root`` and the options a resumed run
    may change (:data:`RESUMABLE_CHANGES`: epochs, patience, device, ...).
    So a run with other settings gets a folder of its own, and the same
    command plus ``--resume`` (with more epochs, say) finds its run."""
    flat = _flatten(to_jsonable(dict(experiment)))
    kept = {k: v for k, v in flat.items()
            if k not in RESUMABLE_CHANGES and k != 'dataset.root'}
    text = json.dumps(kept, sort_keys=True, default=str)
    return f'{dataset}-{model}-seed{seed}-{hashlib.sha256(text.encode()).hexdigest()[:8]}'


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and key in ('dataset', 'model', 'train', 'grid'):
            out.update(_flatten(value, f'{prefix}{key}.'))
        elif LATER_OPTIONS.get(f'{prefix}{key}', ...) != value:  # at an older run's value: left out
            out[f'{prefix}{key}'] = value
    return out


def _rewrite_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(path, ''.join(json.dumps(to_jsonable(r)) + '\n' for r in history))


def _summary_line(record: Mapping[str, Any], stop_metric: str) -> str:
    k = stop_metric.split('@')[1]
    parts = ', '.join(f'{name} {value:.4f}' for name, value in record['loss_parts'].items())
    valid = record['valid']
    marker = ' *' if record.get('best') else ''
    return (f"epoch {record['epoch']:4d} | loss {record['loss']:.4f}"
            f"{f' ({parts})' if parts else ''} | valid recall@{k} "
            f"{valid.get(f'recall@{k}', float('nan')):.4f} ndcg@{k} "
            f"{valid.get(f'ndcg@{k}', float('nan')):.4f}{marker} | "
            f"train {record['train_seconds']:.1f}s eval {record['eval_seconds']:.1f}s")


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                stop_metric: str = 'recall@20') -> None:
    r"""Writes the training curves to ``path`` (PNG, atomically): the loss and
    its parts per epoch (left), validation Recall@K and NDCG@K (right, K of
    ``stop_metric``) with the best epoch marked. Uses matplotlib's Agg canvas
    directly, so the global backend of the caller is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    k = stop_metric.split('@')[1]
    fig = Figure(figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.95, wspace=0.22)
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    epochs = [r['epoch'] for r in history]
    ax_loss.plot(epochs, [r['loss'] for r in history], label='loss', linewidth=2)
    part_names = list(dict.fromkeys(name for r in history for name in r['loss_parts']))
    if len(part_names) > 1:
        for name in part_names:
            ax_loss.plot(epochs, [r['loss_parts'].get(name, math.nan) for r in history],
                         label=name, linewidth=1)
    plotted = [r['loss'] for r in history] + [v for r in history for v in r['loss_parts'].values()]
    if len(part_names) > 1 and all(v > 0 for v in plotted if math.isfinite(v)):
        ax_loss.set_yscale('log')  # the parts differ by orders of magnitude
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('training loss (mean per triple)')
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    evaluated = [r for r in history if 'valid' in r]
    eval_epochs = [r['epoch'] for r in evaluated]
    for metric in (f'recall@{k}', f'ndcg@{k}'):
        ax_metric.plot(eval_epochs, [r['valid'].get(metric, math.nan) for r in evaluated],
                       marker='.', label=f'valid {metric}')
    if evaluated:
        best = evaluated[-1].get('best_epoch', -1)
        if best >= 0:
            ax_metric.axvline(best, color='gray', linestyle='--', label=f'best epoch {best}')
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_metric.set_xlabel('epoch')
    ax_metric.set_ylabel('validation metric')
    if evaluated:
        ax_metric.legend()
    ax_metric.grid(alpha=0.3)
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100)


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------
class DatasetNotFoundError(FileNotFoundError):
    r"""The dataset folder or its ``.inter`` file does not exist; the message
    says where the MMRec data is published and how the folder must look."""


MMREC_DATA_URL = 'https://github.com/enoche/MMRec/tree/master/data'


def _missing_dataset_message(root: Path, name: str) -> str:
    return f"""dataset {name!r} not found: {root / name / f'{name}.inter'} does not exist.

crane_pyg reads datasets in the MMRec format. The preprocessed Amazon sets (baby,
sports, clothing, elec) with their image and text features are published by the
MMRec toolbox: {MMREC_DATA_URL} (its README links the Google Drive folder).
Unpack a dataset into <data-root>/<name>/ so that the folder looks like

  {root / name}/
    {name}.inter      tab-separated, header line: userID itemID rating timestamp x_label
                      (0-based contiguous ids; x_label 0 = train, 1 = valid, 2 = test)
    image_feat.npy    float [num_items, 4096], row i = item i   (one file per modality:
    text_feat.npy     float [num_items, 384]                     <modality>_feat.npy)

Point --data-root (or $CRANE_DATA_ROOT) at the folder holding <name>/ (now: {root}).
Without --dataset the script trains on the embedded synthetic dataset."""


def locate_dataset(config: DataConfig) -> Path | None:
    r"""The folder ``<root>/<name>`` of ``config`` (``None`` for the embedded
    synthetic dataset: ``name='synthetic'`` without ``root``).

    Raises:
        DatasetNotFoundError: ``<root>/<name>/<name>.inter`` does not exist.
    """
    if config.name == 'synthetic' and config.root is None:
        return None
    root = Path(config.root if config.root is not None else default_data_root())
    if not (root / config.name / f'{config.name}.inter').is_file():
        raise DatasetNotFoundError(_missing_dataset_message(root, config.name))
    return root / config.name


def load_dataset(config: DataConfig) -> Any:
    r"""Loads the dataset of ``config``: the embedded synthetic set for
    ``name='synthetic'`` without ``root``, else ``<root>/<name>`` with
    :func:`~crane_pyg.data.load_mmrec`; keeps only ``config.modalities``.

    Raises:
        DatasetNotFoundError: ``<root>/<name>/<name>.inter`` does not exist.
        ConfigError: a requested modality is missing.
    """
    from crane_pyg.data import load_mmrec, load_synthetic
    from crane_pyg.data.schema import ITEM

    folder = locate_dataset(config)
    data = load_synthetic() if folder is None else load_mmrec(folder)
    if config.modalities is not None:
        present = list(getattr(data, 'modalities', []) or [])
        missing = [m for m in config.modalities if m not in present]
        if missing:
            raise ConfigError(f'dataset {config.name!r} has modalities {present}, not '
                              f'{missing} (feature files <modality>_feat.npy)',
                              key='dataset.modalities')
        for m in present:
            if m not in config.modalities:
                del data[ITEM][m]
        data.modalities = [m for m in present if m in config.modalities]
    return data


# ---------------------------------------------------------------------------
# experiments
# ---------------------------------------------------------------------------
def _config_yaml(config: ExperimentConfig) -> str:
    import yaml
    content = to_jsonable(config.to_dict())
    content.pop('grid', None)
    if config.sources.get('model.seed', '').startswith('train.seed'):
        content['model'].pop('seed', None)  # keeps following train.seed when rerun
    return ('# resolved configuration of this run; rerun with --config <this file>\n'
            + yaml.safe_dump(content, sort_keys=False))


def run_single(config: ExperimentConfig, output_dir: str | os.PathLike, *,
               data: Any = None, resume: bool = False, quiet: bool = False,
               max_epochs_this_run: int | None = None,
               callbacks: Sequence[Callback] = (),
               log: Callable[[str], None] | None = None,
               distributed: Any = None) -> dict[str, Any]:
    r"""Trains one configuration (no grid): seeds, loads the data (unless
    given), builds the model with ``from_data`` and runs a :class:`Trainer`.
    Writes ``config.yaml`` (the resolved configuration) beside the results.
    ``distributed`` (a :class:`~crane_pyg.train.distributed.DistributedContext`)
    makes it one rank of a data-parallel run (only rank 0 writes files)."""
    train = config.train
    configure_reproducibility(train.seed, train.deterministic, train.num_threads,
                              train.flush_denormal)
    if data is None:
        data = load_dataset(config.dataset)
    registry = config.registry
    if registry is None:
        from crane_pyg.models import MODELS as registry
    model_cls = registry[config.model_name]
    try:
        model = model_cls.from_data(data, **config.model_options)
    except (TypeError, ValueError) as exc:  # an option value, or a dataset the model cannot use
        raise ConfigError(f'cannot build model {config.model_name!r} on dataset '
                          f'{config.dataset.name!r}: {exc}') from exc
    _warn_if_one_modality(config, data, model_cls)
    output_dir = Path(output_dir)
    is_main = distributed is None or distributed.is_main
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / CONFIG_COPY, _config_yaml(config))
    extra: dict[str, Any] = {'config_sources': dict(config.sources)}
    experiment = config.to_dict()
    experiment.pop('grid', None)
    trainer = Trainer(model, data, train, output_dir, experiment=experiment,
                      dataset_name=config.dataset.name, model_name=config.model_name,
                      resume=resume, quiet=quiet, max_epochs_this_run=max_epochs_this_run,
                      callbacks=callbacks, log=log, extra_results=extra,
                      distributed=distributed)
    return trainer.fit()


def _warn_if_one_modality(config: ExperimentConfig, data: Any, model_cls: type) -> None:
    r"""Warns when a model that uses item features runs on a dataset whose
    modalities were found on disk (``dataset.modalities`` unset) and are a
    single one: most likely another feature file is missing (a multimodal
    recommender on one modality is not what its user expects by default)."""
    import inspect
    modalities = list(getattr(data, 'modalities', None) or [])
    if (config.dataset.modalities is not None or len(modalities) != 1
            or 'features' not in inspect.signature(model_cls.__init__).parameters):
        return
    folder = locate_dataset(config.dataset)
    warnings.warn(f'dataset {config.dataset.name!r} has a single modality, {modalities[0]!r}: '
                  f'no other <modality>_feat.npy{f" in {folder}" if folder else ""}, so '
                  f'{config.model_name} trains on {modalities[0]} alone; add the missing '
                  f'feature file, or set dataset.modalities=[{modalities[0]}] to confirm',
                  UserWarning, stacklevel=3)


Runner = Callable[..., dict]


def run_grid(config: ExperimentConfig, output_dir: str | os.PathLike, *,
             data: Any = None, resume: bool = False, quiet: bool = False,
             runner: Runner = run_single,
             log: Callable[[str], None] | None = None,
             distributed: Any = None) -> dict[str, Any]:
    r"""Trains every point of ``config.grid`` (each fully, in
    ``output_dir/grid/<index>``) and selects the point with the best
    **validation** ``stop_metric`` (ties: the first point). The test metrics
    play no part in the choice (MMRec selects by test Recall@20, which leaks
    the test set into model selection).

    Writes ``grid_summary.md`` / ``grid_summary.json`` (every point's
    parameters, valid and test metrics, the winner marked) and
    ``results.json`` (the winner's results plus a ``grid`` entry).
    With ``resume=True`` finished points are read back, not retrained.
    """
    output_dir = Path(output_dir)
    is_main = distributed is None or distributed.is_main
    log = log if log is not None else (lambda line: print(line, flush=True))
    if not is_main:
        log = lambda line: None  # noqa: E731
    if distributed is not None:
        import functools
        runner = functools.partial(runner, distributed=distributed)
    points = expand_grid(config.grid)
    metric = config.train.stop_metric
    if data is None and not any(key.startswith('dataset.') for key in config.grid):
        data = load_dataset(config.dataset)
    rows, all_results = [], []
    for index, point in enumerate(points):
        point_config = config.with_values(point)
        point_dir = output_dir / 'grid' / f'{index:03d}'
        done = point_dir / RESULTS
        label = ', '.join(f'{k}={v}' for k, v in point.items())
        if resume and done.is_file():
            results = json.loads(done.read_text(encoding='utf-8'))
            log(f'grid point {index + 1}/{len(points)} ({label}): finished earlier')
        else:
            log(f'grid point {index + 1}/{len(points)}: {label}')
            results = runner(point_config, point_dir, data=data, resume=resume, quiet=quiet)
        if results.get('status') not in ('completed', 'early_stopped'):
            return {**results, 'grid': None}
        all_results.append(results)
        rows.append({'index': index, 'params': point, 'output_dir': str(point_dir),
                     'best_epoch': results['best_epoch'], 'valid': results['valid'],
                     'test': results['test']})
    winner = max(range(len(rows)), key=lambda i: (rows[i]['valid'][metric], -i))
    for i, row in enumerate(rows):
        row['winner'] = i == winner
    summary = {'stop_metric': metric, 'selected_by': f'valid {metric}',
               'winner': winner, 'params': rows[winner]['params'], 'points': rows}
    results = {**all_results[winner], 'grid': summary}
    if is_main:
        atomic_write_json(output_dir / f'{GRID_SUMMARY}.json', summary)
        atomic_write_text(output_dir / f'{GRID_SUMMARY}.md',
                          _grid_markdown(summary, config.train.ks))
        atomic_write_json(output_dir / RESULTS, results)
    log(f'grid winner (by valid {metric}): point {winner} '
        f'({", ".join(f"{k}={v}" for k, v in rows[winner]["params"].items())})')
    return results


def _grid_markdown(summary: Mapping[str, Any], ks: Sequence[int]) -> str:
    metric = summary['stop_metric']
    keys = list(summary['points'][0]['params']) if summary['points'] else []
    columns = [f'valid {metric}'] + [f'valid {m}@{k}' for m in ('recall', 'ndcg') for k in ks
                                     if f'{m}@{k}' != metric]
    columns += [f'test {m}@{k}' for m in ('recall', 'ndcg') for k in ks]
    head = ['#'] + keys + ['best epoch'] + columns + ['winner']
    lines = [f'# Grid search ({len(summary["points"])} points), selected by '
             f'{summary["selected_by"]}', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in summary['points']:
        values = []
        for column in columns:
            split, name = column.split(' ')
            values.append(f'{row[split].get(name, math.nan):.4f}')
        cells = ([str(row['index'])] + [str(row['params'][k]) for k in keys]
                 + [str(row['best_epoch'])] + values + ['**winner**' if row['winner'] else ''])
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'Test metrics are reported for information only; the selection uses '
              'the validation split.', '']
    return '\n'.join(lines)


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, *,
                   resume: bool = False, quiet: bool = False, data: Any = None,
                   max_epochs_this_run: int | None = None,
                   callbacks: Sequence[Callback] = (),
                   log: Callable[[str], None] | None = None,
                   distributed: Any = None) -> dict[str, Any]:
    r"""Runs ``config``: a grid search when ``config.grid`` is set
    (:func:`run_grid`), else a single training run (:func:`run_single`);
    ``distributed``: one rank of a data-parallel run (see :class:`Trainer`).
    Holds the lock of ``output_dir`` throughout
    (:class:`~crane_pyg.train.rundir.RunLockedError` when another run has it)."""
    with locked_output_dir(output_dir, distributed):
        if config.grid:
            return run_grid(config, output_dir, data=data, resume=resume, quiet=quiet,
                            log=log, distributed=distributed)
        return run_single(config, output_dir, data=data, resume=resume, quiet=quiet,
                          max_epochs_this_run=max_epochs_this_run, callbacks=callbacks,
                          log=log, distributed=distributed)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def format_metrics_table(valid: Mapping[str, float], test: Mapping[str, float],
                         ks: Sequence[int] = (10, 20, 50)) -> str:
    r"""A fixed-width table: rows ``valid``/``test``, columns metric@K."""
    names = (('recall', 'Recall'), ('ndcg', 'NDCG'), ('precision', 'Prec'), ('map', 'MAP'),
             ('hit', 'Hit'))
    columns = [(f'{key}@{k}', f'{label}@{k}') for key, label in names for k in ks]
    width = max(9, *(len(label) for _, label in columns))
    lines = ['split ' + ' '.join(f'{label:>{width}}' for _, label in columns)]
    for split, metrics in (('valid', valid), ('test', test)):
        lines.append(f'{split:<5} ' + ' '.join(f'{metrics.get(key, math.nan):>{width}.4f}'
                                               for key, _ in columns))
    return '\n'.join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    r"""The argument parser of ``examples/train_amazon.py``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description='Train a multimodal recommender (CRANE, LightGCN, VBPR, FREEDOM, MGCN, '
                    'LGMRec) with '
                    'the MMRec protocol. Without arguments: CRANE on the embedded synthetic '
                    'dataset.',
        epilog='Configuration layers (later wins): crane_pyg/configs/overall.yaml < '
               'configs/model/<model>.yaml < configs/dataset/<dataset>.yaml < --config FILE '
               '< --set KEY=VALUE < the flags above. Example: --set train.lr=5e-4 '
               "--set model.lambda_cl=0.05 --set 'grid.model.lambda_cl=[0.01,0.1]'. "
               'Exit codes: 0 done, 1 the run failed, 2 usage error, 130 interrupted '
               '(Ctrl-C or SIGTERM; resumable).')
    parser.add_argument('--dataset', help="dataset name: the folder <data-root>/<name>/ "
                        "(default: 'synthetic', the embedded synthetic set)")
    parser.add_argument('--data-root', help='folder holding the dataset folders '
                        '(default: $CRANE_DATA_ROOT or ./data)')
    parser.add_argument('--model', help='crane, lightgcn, vbpr, freedom, mgcn or lgmrec '
                        '(default: crane)')
    parser.add_argument('--config', help='a YAML file with dataset/model/train/grid sections')
    parser.add_argument('--output', help='output directory, locked while the run lasts '
                        '(default: runs/<dataset>-<model>-seed<seed>-<hash>, the hash of the '
                        'resolved configuration but for epochs, patience, device and other '
                        'options a resumed run may change)')
    parser.add_argument('--epochs', type=int, help='maximum epochs (train.epochs)')
    parser.add_argument('--seed', type=int, help='random seed (train.seed)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'),
                        help='train.device (default: auto)')
    again = parser.add_mutually_exclusive_group()
    again.add_argument('--resume', action='store_true',
                       help='continue the run in --output from its last.pt')
    again.add_argument('--overwrite', action='store_true',
                       help='replace the run the output directory holds; without it (or '
                       '--resume) a directory with a finished or interrupted run is an error')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override a dotted key, e.g. train.lr=5e-4 '
                        '(repeatable; the value is parsed as YAML)')
    parser.add_argument('--quiet', action='store_true',
                        help='no progress bars and no per-epoch lines')
    parser.add_argument('--debug', action='store_true',
                        help='show the Python traceback of an error (errors are one line '
                        'without it)')
    parser.add_argument('--distributed', action='store_true',
                        help='data-parallel training, one process per device: launch with '
                        'torchrun --nproc_per_node=N (gloo on CPU, nccl on CUDA); '
                        'train.batch_size is the global batch; rank 0 writes the outputs')
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    r"""The command line of ``examples/train_amazon.py``; returns the exit code:
    0 success, 1 a failed run (the loss diverged, a file cannot be written,
    an unexpected error), 2 a usage error (configuration, data, output
    directory, a checkpoint that cannot be resumed), 130 interrupted (Ctrl-C
    or SIGTERM: ``last.pt`` holds the last epoch and the resume command is
    printed). Every error is one line on stderr (``--debug`` adds the
    traceback), every warning too. With ``--distributed`` the process group
    is destroyed on return."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    name = parser.prog
    try:
        with sigterm_as_interrupt(), _one_line_warnings(name):
            return _main(args, name, argv)
    except KeyboardInterrupt:
        print(f'{name}: interrupted before training started', file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line (--debug: traceback)
        if args.debug:
            traceback.print_exc()
        code, message = _error_line(exc, args.debug)
        print(f'{name}: error: {message}', file=sys.stderr)
        return code
    finally:
        if args.distributed:
            from .distributed import destroy_distributed
            destroy_distributed()


@contextlib.contextmanager
def _one_line_warnings(name: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f'{name}: warning: {message}', file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _error_line(exc: Exception, debug: bool = False) -> tuple[int, str]:
    r"""The exit code and message of an error that ended :func:`main`."""
    from crane_pyg.data import DataFormatError
    if isinstance(exc, CheckpointWriteError):
        return 1, str(exc)
    if isinstance(exc, DataFormatError):
        return 2, f'invalid dataset: {exc}'
    if isinstance(exc, (ConfigError, DatasetNotFoundError, OutputDirError, CheckpointError)):
        return 2, str(exc)
    if isinstance(exc, FloatingPointError):
        return 1, f'the run diverged: {exc}'
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return 1, f'{exc.filename}: {exc.strerror}'
    lines = str(exc).strip().splitlines()
    return 1, (f'{type(exc).__name__}: {lines[0] if lines else ""}'
               f'{"" if debug else " (--debug shows the traceback)"}')


def _no_run_to_overwrite(output: Path, *, resume: bool, overwrite: bool) -> None:
    r"""Refuses an output directory that holds a run, unless it is resumed or
    ``overwrite`` is set (which removes its results first)."""
    if resume:
        return
    finished = (output / RESULTS).is_file()
    if not (finished or (output / LAST).is_file() or (output / 'grid').is_dir()):
        return
    if overwrite:
        for stale in (RESULTS, f'{GRID_SUMMARY}.json', f'{GRID_SUMMARY}.md'):
            (output / stale).unlink(missing_ok=True)
        return
    what = (f'a finished run ({RESULTS})' if finished
            else f'an unfinished run ({LAST}; --resume continues it)')
    raise OutputDirError(f'{output} holds {what}; add --overwrite to replace it, or choose '
                         f'another --output')


def _main(args: argparse.Namespace, name: str, argv: Sequence[str] | None) -> int:
    flags: dict[str, Any] = {}
    if args.data_root is not None:
        flags['dataset.root'] = args.data_root
    if args.epochs is not None:
        flags['train.epochs'] = args.epochs
    if args.seed is not None:
        flags['train.seed'] = args.seed
    if args.device is not None:
        flags['train.device'] = args.device
    config = load_config(model=args.model, dataset=args.dataset, config_file=args.config,
                         overrides=args.overrides, flags=flags)
    try:
        resolve_device(config.train.device)  # now, not after loading the data
    except RuntimeError as exc:
        raise ConfigError(str(exc), config.sources.get('train.device'), 'train.device') from None
    output = Path(args.output) if args.output else Path('runs') / run_name(
        config.dataset.name, config.model_name, config.train.seed, config.to_dict())
    ctx = None
    if args.distributed:
        from .distributed import init_distributed
        try:
            ctx = init_distributed(config.train.device)
        except RuntimeError as exc:  # not launched by torchrun, no process group
            raise ConfigError(str(exc), '--distributed') from exc
    is_main = ctx is None or ctx.is_main
    check = lambda path: _no_run_to_overwrite(  # noqa: E731
        path, resume=args.resume, overwrite=args.overwrite)
    with locked_output_dir(output, ctx, check):
        if not args.quiet and is_main:
            world = f' ({ctx.world_size} processes, {ctx.backend})' if ctx is not None else ''
            print(f'{config.model_name} on {config.dataset.name} -> {output}{world}', flush=True)
        results = run_experiment(config, output, resume=args.resume,
                                 quiet=args.quiet or not is_main, distributed=ctx)
    if ctx is not None and not ctx.is_main:
        return 0 if results['status'] in ('completed', 'early_stopped') else 130
    if results['status'] not in ('completed', 'early_stopped'):
        words = [w for w in (argv if argv is not None else sys.argv[1:]) if w != '--overwrite']
        program = sys.argv[0] if sys.argv and sys.argv[0].endswith('.py') else 'train_amazon.py'
        launcher = (['torchrun', f'--nproc_per_node={ctx.world_size}'] if ctx is not None
                    else ['python'])
        cmd = ' '.join(shlex.quote(w) for w in launcher + [program] + words)
        if '--resume' not in cmd:
            cmd += ' --resume'
        if '--output' not in cmd:
            cmd += f' --output {shlex.quote(str(output))}'
        print(f'to resume: {cmd}', file=sys.stderr)
        return 130
    print(f"\n{results['model']} on {results['dataset']}: best epoch {results['best_epoch']} "
          f"(by valid {results['stop_metric']}), {results['seconds_per_epoch']:.2f} s/epoch, "
          f"eval {results['eval_seconds']:.2f} s, peak memory "
          f"{results['peak_memory_mb']:.0f} MiB")
    print(format_metrics_table(results['valid'], results['test'], config.train.ks))
    print(f'results: {output / RESULTS}')
    return 0
