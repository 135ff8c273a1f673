r"""Wall-clock time of one full training epoch and one validation pass of
CRANE, FREEDOM and LightGCN (all with their default options) on TikTok.

The models are timed *side by side and interleaved* in one process (epoch
``e`` of every model, then epoch ``e + 1`` of every model, ...), so that a
shared or noisy machine slows all of them alike; the figure of merit is the
ratio of medians CRANE / FREEDOM. An epoch is what
:class:`~crane_pyg.train.Trainer` does: ``on_epoch_start``, then for every
batch of the :class:`~crane_pyg.data.BPRSampler` (sampling included)
``zero_grad``, ``loss``, ``backward`` and an Adam step. The validation pass is
``embeddings()`` plus full ranking with
:class:`~crane_pyg.metrics.FullRankingEvaluator`.

Usage::

    python benchmarks/tiktok_epoch_time.py --threads 1 --epochs 3

Writes ``benchmarks/results/tiktok_epoch_time.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, environment, resolve_device, summarize, synchronize,  # noqa: E402
                    train_epoch, write_json)

import torch  # noqa: E402

from crane_pyg.data import load_mmrec  # noqa: E402
from crane_pyg.data.sampler import BPRSampler  # noqa: E402
from crane_pyg.metrics import FullRankingEvaluator  # noqa: E402
from crane_pyg.models import CRANE, FREEDOM, LightGCN  # noqa: E402

MODELS = {'crane': CRANE, 'freedom': FREEDOM, 'lightgcn': LightGCN}


@torch.no_grad()
def validate(model: Any, evaluator: FullRankingEvaluator,
             device: torch.device) -> Dict[str, Any]:
    model.eval()
    synchronize(device)
    start = time.perf_counter()
    embeddings = model.embeddings()
    metrics = evaluator.evaluate(lambda users: model.score_all_items(users, embeddings))
    synchronize(device)
    return {'seconds': time.perf_counter() - start, 'recall@20': metrics['recall@20']}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-root', default='/work/shared/data',
                        help='folder holding tiktok/ (default: %(default)s)')
    parser.add_argument('--dataset', default='tiktok')
    parser.add_argument('--models', default='crane,freedom,lightgcn')
    parser.add_argument('--epochs', type=int, default=3,
                        help='timed epochs per model, >= 3 (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed epochs per model first (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=2048)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default: %(default)s)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or auto')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default=str(RESULTS_DIR / 'tiktok_epoch_time.json'))
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error('--epochs must be >= 3 (the median of at least 3 epochs)')
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f'unknown model(s) {unknown}; choose from {sorted(MODELS)}')

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # users without training items
        data = load_mmrec(args.data_root, args.dataset)
    sampler = BPRSampler.from_data(data, seed=args.seed)
    evaluator = FullRankingEvaluator(data, split='valid', ks=(20,), batch_size=4096,
                                     device=device)
    models, optimizers = {}, {}
    for name in names:
        torch.manual_seed(args.seed)
        models[name] = MODELS[name].from_data(data).to(device)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-3)

    epochs: Dict[str, List[float]] = {n: [] for n in names}
    num_batches = 0
    for epoch in range(args.warmup + args.epochs):
        for name in names:  # interleaved: every model sees the same machine state
            out = train_epoch(models[name], optimizers[name], sampler, epoch,
                              args.batch_size, device)
            num_batches = out['batches']
            if epoch >= args.warmup:
                epochs[name].append(out['seconds'])
            print(f'epoch {epoch} {name:9s} {out["seconds"]:7.2f} s'
                  + ('' if epoch >= args.warmup else ' (warm-up)'), flush=True)
    valid = {name: validate(models[name], evaluator, device) for name in names}

    result: Dict[str, Any] = {
        'dataset': args.dataset, 'batch_size': args.batch_size,
        'batches_per_epoch': num_batches, 'epochs_timed': args.epochs,
        'warmup_epochs': args.warmup, 'interleaved': True,
        'models': {name: {'options': 'defaults', 'epoch_seconds': summarize(epochs[name]),
                          'ms_per_batch': 1000 * statistics.median(epochs[name]) / num_batches,
                          'validation': valid[name]}
                   for name in names},
        'environment': environment(device),
    }
    if 'crane' in names and 'freedom' in names:
        result['ratio_crane_over_freedom'] = (
            statistics.median(epochs['crane']) / statistics.median(epochs['freedom']))
        print(f"CRANE / FREEDOM epoch time: {result['ratio_crane_over_freedom']:.2f}")
    output = Path(args.output)
    write_json(result, output)
    plot(result, output.with_suffix('.png'))
    print(f'wrote {output} and {output.with_suffix(".png")}')
    return 0


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
    if 'ratio_crane_over_freedom' in result:
        title += f"\nCRANE / FREEDOM = {result['ratio_crane_over_freedom']:.2f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
