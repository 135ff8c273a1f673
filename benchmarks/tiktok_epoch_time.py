r"""Wall-clock time of one full training epoch and one validation pass of
CRANE, FREEDOM and LightGCN (all with their default options) on TikTok.

The models are timed *side by side and interleaved* in one process (epoch
``e`` of every model, then epoch ``e + 1`` of every model, ...), so that a
shared or noisy machine slows all of them alike; the figure of merit is the
ratio of medians CRANE / FREEDOM. Each ``crane*`` setting's ratio is also
given per epoch (``..._per_epoch``: epoch ``e`` of the setting over epoch
``e`` of FREEDOM, measured seconds apart), whose spread shows how much a
single run's ratio can be trusted on that machine. An epoch is what
:class:`~crane_pyg.train.Trainer` does: ``on_epoch_start``, then for every
batch of the :class:`~crane_pyg.data.BPRSampler` (sampling included)
``zero_grad``, ``loss``, ``backward`` and an Adam step. The validation pass is
``embeddings()`` plus full ranking with
:class:`~crane_pyg.metrics.FullRankingEvaluator` (after one untimed pass, so
that a compiled model's no-gradient graph is compiled before the clock runs).

``crane-compiled`` is CRANE with ``train.compile`` (its RCA module compiled by
:func:`torch.compile`); its compilation happens in the warm-up epoch and is
reported apart as ``compile_seconds``. A suffix ``-bf16`` (or ``-tf32``) runs a
setting with that ``train.precision`` (:mod:`crane_pyg.train.precision`: the
loss under autocast, the sparse propagation in float32; the validation's
embeddings under autocast, its scores in float32), e.g. ``crane-bf16``,
``crane-compiled-bf16``, ``freedom-bf16``; a part ``-cache<T>`` runs CRANE's
loss with ``train.semantic_cache = T`` (:mod:`crane_pyg.train.semantic_cache`;
its refreshes are inside the timed epoch), e.g. ``crane-cache50``,
``crane-cache50-bf16``; every ``crane*`` setting gets a ratio to ``freedom``
(float32).

``--breakdown`` adds where the time of one training step goes (milliseconds,
median of repeated calls on one batch): each part of CRANE timed alone,
forward plus backward (the behavioural view, the modality encoders, RCA, the
rest of the semantic view, the loss terms and the optimizer), FREEDOM's and
LightGCN's whole step, and RCA's *matrix-product floor*: the time of the dense
products RCA's forward and backward need at this size (weights and inputs
of the same shapes, nothing else), a lower bound for any implementation of
those equations on this machine, in float32 (``rca_matmul_floor``) and in
bfloat16 (``rca_matmul_floor_bf16``, where the CPU has native bfloat16). With a
``crane*-bf16`` setting, ``crane-bf16`` is broken down too (each part under
bfloat16 autocast).

Usage::

    python benchmarks/tiktok_epoch_time.py --threads 2 --epochs 3 --breakdown
    python benchmarks/tiktok_epoch_time.py --threads 1 --epochs 3 --breakdown \
        --models crane,crane-bf16,crane-compiled,crane-compiled-bf16,freedom,lightgcn

Writes ``benchmarks/results/tiktok_epoch_time.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR, environment, evaluate, resolve_device, save_figure, summarize, synchronize,
    time_fn, train_epoch, write_json,
)

import torch  # noqa: E402

from crane_pyg.data import load_mmrec  # noqa: E402
from crane_pyg.data.sampler import BPRSampler  # noqa: E402
from crane_pyg.metrics import FullRankingEvaluator  # noqa: E402
from crane_pyg.models import CRANE, FREEDOM, LightGCN  # noqa: E402

MODELS = {'crane': CRANE, 'crane-compiled': CRANE, 'freedom': FREEDOM, 'lightgcn': LightGCN}
#: the suffixes of a setting's name that set ``train.precision``
PRECISION_SUFFIXES = ('-bf16', '-tf32')


def precision_of(name: str) -> str:
    r"""The ``train.precision`` of the setting :obj:`name` (``'fp32'``
    without a precision suffix)."""
    for suffix in PRECISION_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return 'fp32'


def cache_of(name: str) -> int | None:
    r"""``T`` of a ``-cache<T>`` part of the setting :obj:`name`
    (``train.semantic_cache = T``), else :obj:`None`."""
    match = re.search(r'-cache(\d+)', name)
    return int(match.group(1)) if match else None


def model_of(name: str) -> str:
    r"""The :data:`MODELS` key of the setting :obj:`name` (without its
    precision suffix and ``-cache<T>`` part)."""
    precision = precision_of(name)
    name = name if precision == 'fp32' else name[:-len(precision) - 1]
    return re.sub(r'-cache\d+', '', name)


def is_compiled(name: str) -> bool:
    r"""Whether the setting :obj:`name` runs with ``compile_modules()``."""
    return model_of(name).endswith('-compiled')


def build_model(name: str, data: Any, seed: int,
                device: torch.device) -> Tuple[Any, torch.optim.Optimizer]:
    r"""The model :obj:`name` of :data:`MODELS` with its default options,
    built from :obj:`data` after ``torch.manual_seed(seed)`` and moved to
    :obj:`device` (``compile_modules()`` called for a compiled name), and its
    Adam optimizer (learning rate 1e-3)."""
    torch.manual_seed(seed)
    model = MODELS[model_of(name)].from_data(data).to(device)
    if is_compiled(name):
        model.compile_modules()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def validate(model: Any, evaluator: FullRankingEvaluator,
             device: torch.device, precision: str = 'fp32') -> Dict[str, Any]:
    synchronize(device)
    start = time.perf_counter()
    metrics = evaluate(model, evaluator, precision=precision)
    synchronize(device)
    return {'seconds': time.perf_counter() - start, 'recall@20': metrics['recall@20']}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-root', default='/work/shared/data',
                        help='folder holding tiktok/ (default: %(default)s)')
    parser.add_argument('--dataset', default='tiktok')
    parser.add_argument('--models', default='crane,crane-compiled,freedom,lightgcn')
    parser.add_argument('--epochs', type=int, default=3,
                        help='timed epochs per model, >= 3 (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed epochs per model first (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=2048)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default: %(default)s)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--breakdown', action='store_true',
                        help='also time the parts of one training step (see above)')
    parser.add_argument('--breakdown-repeats', type=int, default=15,
                        help='timed calls per part, >= 3 (default: %(default)s)')
    parser.add_argument('--output', default=str(RESULTS_DIR / 'tiktok_epoch_time.json'))
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error('--epochs must be >= 3 (the median of at least 3 epochs)')
    if args.breakdown_repeats < 3:
        parser.error('--breakdown-repeats must be >= 3 (the median of at least 3 calls)')
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    unknown = sorted(n for n in names if model_of(n) not in MODELS
                     or (cache_of(n) is not None and not n.startswith('crane'))
                     or cache_of(n) == 0)
    if unknown:
        parser.error(f'unknown model(s) {unknown}; choose from {sorted(MODELS)}, each with '
                     f'an optional precision suffix {list(PRECISION_SUFFIXES)}')

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the Trainer does (train.flush_denormal)
    device = resolve_device(args.device)
    from crane_pyg.train.precision import resolve_precision
    used = {name: resolve_precision(precision_of(name), device) for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # users without training items
        data = load_mmrec(args.data_root, args.dataset)
    sampler = BPRSampler.from_data(data, seed=args.seed)
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20,), batch_size=4096,
                                     device=device)
    models, optimizers, losses = {}, {}, {}
    for name in names:
        models[name], optimizers[name] = build_model(name, data, args.seed, device)
        if cache_of(name) is not None:
            from crane_pyg.models.semantic_cache import CachedSemanticCRANE
            losses[name] = CachedSemanticCRANE(models[name], cache_of(name))

    epochs: Dict[str, List[float]] = {n: [] for n in names}
    warmup: Dict[str, List[float]] = {n: [] for n in names}
    num_batches = 0
    for epoch in range(args.warmup + args.epochs):
        for name in names:  # interleaved: every model sees the same machine state
            out = train_epoch(models[name], optimizers[name], sampler, epoch,
                              args.batch_size, device, precision=used[name],
                              loss_module=losses.get(name))
            num_batches = out['batches']
            (epochs if epoch >= args.warmup else warmup)[name].append(out['seconds'])
            print(f'epoch {epoch} {name:14s} {out["seconds"]:7.2f} s'
                  + ('' if epoch >= args.warmup else ' (warm-up)'), flush=True)
    valid = {}
    for name in names:
        # the first pass compiles a compiled model
        untimed = validate(models[name], evaluator, device, used[name])
        valid[name] = validate(models[name], evaluator, device, used[name])
        valid[name]['first_pass_seconds'] = untimed['seconds']

    epoch_seconds = {name: summarize(epochs[name]) for name in names}
    median = {name: epoch_seconds[name]['median'] for name in names}
    result: Dict[str, Any] = {
        'dataset': args.dataset, 'batch_size': args.batch_size,
        'batches_per_epoch': num_batches, 'epochs_timed': args.epochs,
        'warmup_epochs': args.warmup, 'interleaved': True,
        'models': {name: {'options': ('defaults, compile_modules()' if is_compiled(name)
                                      else 'defaults'),
                          'precision': used[name],
                          'semantic_cache': cache_of(name),
                          'epoch_seconds': epoch_seconds[name],
                          'ms_per_batch': 1000 * median[name] / num_batches,
                          'validation': valid[name]}
                   for name in names},
        'environment': environment(device),
    }
    for name in names:
        if is_compiled(name) and args.warmup > 0:
            # the warm-up epochs minus as many ordinary epochs
            extra = sum(warmup[name]) - args.warmup * median[name]
            result['models'][name]['compile_seconds'] = extra
    for name in names:
        if name.startswith('crane') and 'freedom' in names:
            key = f"ratio_{name.replace('-', '_')}_over_freedom"
            result[key] = median[name] / median['freedom']
            result[f'{key}_per_epoch'] = summarize(
                [a / b for a, b in zip(epochs[name], epochs['freedom'])])
            spread = result[f'{key}_per_epoch']
            print(f"{name} / freedom epoch time: {result[key]:.2f} "
                  f"(per epoch {spread['min']:.2f}-{spread['max']:.2f})")
    if args.breakdown:
        result['step_breakdown_ms'] = step_breakdown(
            data, sampler, args, device, compiled='crane-compiled' in names,
            bf16=any(n.startswith('crane') and used[n] == 'bf16' for n in names))
        for name, parts in result['step_breakdown_ms'].items():
            print(f'step breakdown {name}: ' + ', '.join(f'{k} {v:.1f}' for k, v in parts.items()))
    output = Path(args.output)
    write_json(result, output)
    plot(result, output.with_suffix('.png'))
    print(f'wrote {output} and {output.with_suffix(".png")}')
    return 0


def rca_matmul_floor(rca: Any, num_nodes: int, device: torch.device, repeats: int,
                     dtype: torch.dtype = torch.float32) -> float:
    r"""Milliseconds of the dense products of one forward + backward of
    :obj:`rca` on :obj:`num_nodes` nodes: per recursion the joint map
    ``[N, Md] x [Md, Td]``, the query and output maps ``[NM, d] x [d, d]``
    (the associative form of
    :class:`~crane_pyg.nn.rca.CrossModalAttentionBlock`), then ``W_Z``; each
    forward product plus its two backward products (input and weight
    gradients), in :obj:`dtype`."""
    M, d, T = rca.num_modalities, rca.dim, rca.num_joint_tokens
    shapes = [(num_nodes, M * d, T * d), (num_nodes * M, d, d),
              (num_nodes * M, d, d)] * rca.num_recursions
    if rca.lin_z is not None:
        shapes.append((num_nodes, M * d, rca.out_dim))
    mats = [(torch.randn(n, k, device=device, dtype=dtype),
             torch.randn(k, m, device=device, dtype=dtype),
             torch.randn(n, m, device=device, dtype=dtype)) for n, k, m in shapes]

    def products() -> None:
        for x, w, grad in mats:
            x @ w
            grad @ w.t()
            x.t() @ grad
    return 1000 * time_fn(products, device, repeats, warmup=3)['median']


def step_breakdown(data: Any, sampler: Any, args: Any, device: torch.device,
                   compiled: bool = True, bf16: bool = False) -> Dict[str, Dict[str, float]]:
    r"""Milliseconds of the parts of one training step on the first batch of
    epoch 0 (see the module docstring), for CRANE (and ``crane-compiled`` when
    :obj:`compiled`, ``crane-bf16`` when :obj:`bf16`), FREEDOM and LightGCN."""
    from crane_pyg.train.precision import autocast, bf16_support
    users, pos, neg = (t.to(device) for t in next(iter(sampler.batches(0, args.batch_size))))
    repeats = args.breakdown_repeats  # >= 3 (checked by the parser; time_fn needs it)
    out: Dict[str, Dict[str, float]] = {}

    def whole_step(model: Any, optimizer: Any, precision: str = 'fp32') -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                loss, _ = model.loss(users, pos, neg)
            loss.backward()
            optimizer.step()
        return step

    cranes = ['crane'] + (['crane-compiled'] if compiled else []) + (['crane-bf16'] if bf16
                                                                     else [])
    for name in cranes:
        precision = precision_of(name)
        model, optimizer = build_model(name, data, args.seed, device)
        model.train()
        batch_users = torch.unique(users)
        x_item = model.encode_items().detach()
        rca_input = torch.cat([x_item, model.profiles(x_item, batch_users, model.encoders).detach()])
        rca_input.requires_grad_()

        def backward(*tensors: torch.Tensor) -> None:
            sum(t.float().sum() for t in tensors).backward()
            model.zero_grad(set_to_none=True)

        def loss_backward() -> None:
            with autocast(precision, device):
                loss, _ = model.loss(users, pos, neg)
            backward(loss)

        def under(fn: Callable[[], Any]) -> Callable[[], None]:
            def run() -> None:
                with autocast(precision, device):
                    out = fn()
                backward(*(out if isinstance(out, tuple) else (out, )))
            return run

        # median milliseconds of `repeats` calls after 3 untimed ones (warm-up, compilation)
        parts = {
            'step': 1000 * time_fn(whole_step(model, optimizer, precision), device, repeats,
                                   warmup=3)['median'],
            'loss_backward': 1000 * time_fn(loss_backward, device, repeats, warmup=3)['median'],
            'behavioural': 1000 * time_fn(under(lambda: model.behavioural(True)), device,
                                          repeats, warmup=3)['median'],
            'semantic': 1000 * time_fn(under(lambda: model.semantic(batch_users)), device,
                                       repeats, warmup=3)['median'],
            'encoders': 1000 * time_fn(under(model.encode_items), device,
                                       repeats, warmup=3)['median'],
            'rca': 1000 * time_fn(under(lambda: model.rca(rca_input)), device, repeats,
                                  warmup=3)['median'],
        }
        parts['semantic_rest'] = parts['semantic'] - parts['encoders'] - parts['rca']
        parts['objective_rest'] = (parts['loss_backward'] - parts['behavioural']
                                   - parts['semantic'])
        parts['optimizer'] = parts['step'] - parts['loss_backward']
        parts['rca_rows'] = float(rca_input.size(0))
        if name == 'crane':
            parts['rca_matmul_floor'] = rca_matmul_floor(model.rca, rca_input.size(0),
                                                         device, repeats)
            if device.type == 'cuda' or bf16_support(device)[0]:
                parts['rca_matmul_floor_bf16'] = rca_matmul_floor(
                    model.rca, rca_input.size(0), device, repeats, dtype=torch.bfloat16)
        out[name] = parts
    for name in ('freedom', 'lightgcn'):
        model, optimizer = build_model(name, data, args.seed, device)
        model.train()
        out[name] = {'step': 1000 * time_fn(whole_step(model, optimizer), device, repeats,
                                            warmup=3)['median']}
    return out


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(result['models'])
    train = [result['models'][n]['epoch_seconds']['median'] for n in names]
    lo = [t - result['models'][n]['epoch_seconds']['min'] for t, n in zip(train, names)]
    hi = [result['models'][n]['epoch_seconds']['max'] - t for t, n in zip(train, names)]
    val = [result['models'][n]['validation']['seconds'] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], train, 0.4, yerr=[lo, hi], capsize=3,
           label='training epoch (median, min-max)')
    ax.bar([x + 0.2 for x in xs], val, 0.4, label='validation pass')
    ax.set_xticks(list(xs), names)
    ax.set_ylabel('seconds')
    env = result['environment']
    title = f"{result['dataset']}: {result['batches_per_epoch']} batches, " \
            f"{env['torch_threads']} thread(s), {env['device']}"
    ratios = [f"{key[6:-13].replace('_', '-')} / freedom = {value:.2f}"
              for key, value in result.items()
              if key.startswith('ratio_') and key.endswith('_over_freedom')]
    if ratios:
        title += '\n' + ', '.join(ratios)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


if __name__ == '__main__':
    sys.exit(main())
