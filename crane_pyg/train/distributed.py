r"""Data-parallel training with :mod:`torch.distributed`.

One process per device (``torchrun --nproc_per_node=N ... --distributed``);
every process holds the whole graph and a full replica of the model, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients.

**What is split.** With :math:`W` processes (ranks) and global batch size
:math:`B` (``train.batch_size``, the same number as a single-process run):

* the epoch's BPR triples: rank :math:`r` trains on ``perm[r::W]`` of the
  single-process epoch (:class:`~crane_pyg.data.BPRSampler` with ``rank`` and
  ``world_size``, the same seed on every rank), in batches of :math:`B / W`;
  batch :math:`s` of rank :math:`r` holds the triples at positions
  :math:`sB + r, sB + r + W, \ldots` of the single-process epoch, so the
  :math:`W` rank batches of step :math:`s` together are exactly the
  single-process batch :math:`s` whenever :math:`E` is a multiple of
  :math:`B` (otherwise the batch boundaries of the last steps differ by a few
  triples);
* full-ranking evaluation: rank :math:`r` evaluates the users
  ``users[r::W]``; the per-user metric *sums* and the user *counts* are
  all-reduced, so every evaluated user counts exactly once and the averages
  equal the single-process ones.

**Why the update equals the single-process one.** A loss that is a *mean*
over the triples of a batch, :math:`\mathcal{L} = \frac{1}{B}\sum_{t}
\ell_t`, splits into the rank losses :math:`\mathcal{L}_r =
\frac{W}{B}\sum_{t \in r} \ell_t`; DDP averages the rank gradients,
:math:`\frac{1}{W}\sum_r \nabla \mathcal{L}_r = \nabla \mathcal{L}`. This
holds for BPR and for the squared L2 regulariser (``reg_form='squared'``: a
sum over triples divided by the batch size), hence for LightGCN and VBPR
with that form and the BPR/L2 terms of the others. It does **not** hold for
MMRec's L2 form (``reg_form='mmrec'``, the default of LightGCN and VBPR):
the Frobenius norm of the batch's embeddings is not a sum over triples, so
each rank penalises the norm of its own shard (a slightly stronger
regulariser: its gradient is about :math:`\sqrt{W}` times larger). Nor does it
hold for CRANE's contrastive term: its InfoNCE is taken over the *unique* users and items of
a batch with in-batch negatives, which is not a sum over triples, so in
data-parallel training each rank computes it over its own :math:`B / W`
triples (fewer negatives per anchor). Data-parallel CRANE is therefore a
slightly different, equally valid, optimisation of the same objective,
close to single-process CRANE with batch size :math:`B / W` for that term.

Outputs (checkpoints, ``history.jsonl``, ``results.json``, ``curves.png``)
are written by rank 0 only (atomically); early stopping is decided on rank 0
and broadcast, so every rank stops after the same epoch. Resuming reads
``last.pt`` on every rank: on several machines, ``--output`` must be on a
shared file system.
"""
from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from crane_pyg.metrics import METRIC_NAMES

__all__ = ['DistributedContext', 'init_distributed', 'destroy_distributed',
           'launched_by_torchrun', 'evaluate_sharded', 'broadcast_object',
           'all_reduce_sum', 'barrier']

_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


@dataclass(frozen=True)
class DistributedContext:
    r"""Where this process stands in a data-parallel run.

    Attributes:
        rank (int): global rank :math:`r \in [0, W)`.
        world_size (int): number of processes :math:`W`.
        local_rank (int): rank on this machine (selects the CUDA device).
        device (torch.device): this process's device.
        backend (str): ``'nccl'`` (CUDA) or ``'gloo'`` (CPU).
    """
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        r""":obj:`True` on rank 0, the process that writes the outputs."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    r""":obj:`True` when the ``env://`` variables of ``torchrun``
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) are all set."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def init_distributed(device: str = 'auto', backend: Optional[str] = None,
                     timeout_minutes: float = 30.0) -> DistributedContext:
    r"""Initialises the default process group from the ``env://`` variables
    that ``torchrun`` sets (or reuses an initialised one) and picks the device.

    Args:
        device (str): ``train.device``: ``'auto'`` (CUDA when available),
            ``'cpu'``, ``'cuda'`` (each rank takes ``cuda:<LOCAL_RANK>``) or
            ``'cuda:<n>'`` (taken as is).
        backend (str, optional): ``'nccl'`` or ``'gloo'``; default ``'nccl'``
            on CUDA, ``'gloo'`` on CPU.
        timeout_minutes (float): collective timeout.

    Raises:
        RuntimeError: not launched by ``torchrun`` (and no process group
            initialised), or CUDA requested but not available.
    """
    if not dist.is_available():
        raise RuntimeError('torch.distributed is not available in this PyTorch build')
    if not dist.is_initialized() and not launched_by_torchrun():
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        raise RuntimeError(
            f'--distributed needs the environment set by torchrun (missing {missing}); '
            f'launch with: torchrun --nproc_per_node=N examples/train_amazon.py ... '
            f'--distributed')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError(f'device {device!r} requested but CUDA is not available')
        if dev.index is None:
            dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    if backend is None:
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if dev.type == 'cuda':
            kwargs['device_id'] = dev
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **kwargs)
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              local_rank=local_rank, device=dev,
                              backend=dist.get_backend())


def destroy_distributed() -> None:
    r"""Destroys the default process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(ctx: Optional[DistributedContext]) -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors
    return ctx.device if ctx is not None and ctx.backend == 'nccl' else torch.device('cpu')


def all_reduce_sum(tensor: Tensor, ctx: DistributedContext) -> Tensor:
    r"""The element-wise sum of :obj:`tensor` over all ranks (a new tensor on
    the device of :obj:`tensor`)."""
    out = tensor.detach().to(_collective_device(ctx), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast_object(obj: Any, ctx: DistributedContext, src: int = 0) -> Any:
    r"""Rank :obj:`src`'s :obj:`obj` (picklable) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device(ctx))
    return box[0]


def barrier(ctx: Optional[DistributedContext]) -> None:
    r"""Waits for every rank (no-op without a context)."""
    if ctx is not None and ctx.world_size > 1:
        if ctx.backend == 'nccl':
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def shard_evaluator(evaluator: Any, rank: int, world_size: int) -> Any:
    r"""A shallow copy of a :class:`~crane_pyg.metrics.FullRankingEvaluator`
    that evaluates only the users ``evaluator.users[rank::world_size]``
    (possibly none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'need 0 <= rank < world_size (got rank={rank}, '
                         f'world_size={world_size})')
    shard = copy.copy(evaluator)
    shard.users = evaluator.users[rank::world_size]
    shard.num_relevant = evaluator.num_relevant[rank::world_size]
    shard.num_users = int(shard.users.numel())
    return shard


@torch.no_grad()
def evaluate_sharded(evaluator: Any, score_fn: Callable[[Tensor], Tensor],
                     ctx: Optional[DistributedContext]) -> dict[str, float]:
    r"""Full-ranking metrics computed cooperatively by all ranks.

    Rank :math:`r` computes the per-user metrics of the users
    ``evaluator.users[r::W]``; the sums of every metric (float64) and the
    number of users are all-reduced, and every rank returns
    :math:`\frac{\sum_u m(u)}{\#\text{users}}`, the single-process
    :meth:`~crane_pyg.metrics.FullRankingEvaluator.evaluate` (up to the
    summation order). Without a context (or with :math:`W = 1`) this is
    ``evaluator.evaluate(score_fn)``.

    Raises:
        RuntimeError: the gathered user count differs from
            ``evaluator.num_users`` (ranks built different evaluators).
    """
    if ctx is None or ctx.world_size == 1:
        return evaluator.evaluate(score_fn)
    shard = shard_evaluator(evaluator, ctx.rank, ctx.world_size)
    names = [f'{m}@{k}' for m in METRIC_NAMES for k in evaluator.ks]
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    if shard.num_users > 0:
        per_user = shard.evaluate_per_user(score_fn)
        sums[:-1] = torch.stack([per_user[n].double().sum().cpu() for n in names])
    sums[-1] = shard.num_users
    total = all_reduce_sum(sums, ctx)
    count = int(round(float(total[-1])))
    if count != evaluator.num_users:
        raise RuntimeError(f'sharded evaluation gathered {count} users, expected '
                           f'{evaluator.num_users} (do all ranks load the same data?)')
    return {name: float(total[i] / count) for i, name in enumerate(names)}
