#!/usr/bin/env python
r"""Compare models on one dataset with one protocol.

Trains every model (``--models``) with every seed (``--seeds``) through the
same entry point as ``examples/train_amazon.py`` (layered configs, the
:class:`crane_pyg.train.Trainer`, early stopping on validation Recall@20, test
at the best validation epoch), one output folder per run
(``<output>/<model>-seed<seed>/``), and writes

* ``comparison.json``: every run's metrics and costs, and per model the mean,
  standard deviation (sample, ``ddof=1``) and values over seeds;
* ``comparison.md``: a table model x test Recall@10/20, NDCG@10/20 (mean ± std
  when there are several seeds), validation Recall@20, best epoch, seconds per
  training epoch, seconds per validation pass and peak memory.

By default every run is a separate Python process, so that the CPU peak
memory (``ru_maxrss``, a per-process high-water mark) belongs to that run
alone; ``--in-process`` trains in this process instead (faster to start; CPU
peak memory then includes the earlier runs).

Example (the lead's runs on the MMRec Amazon data)::

    python benchmarks/compare_models.py --dataset baby --data-root ./data \
        --models crane,lightgcn,freedom --seeds 999,1,2 \
        --output benchmarks/results/compare-baby

``--resume`` continues interrupted runs and reuses finished ones. Both
result files are written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import crane_pyg  # noqa: F401
except ImportError:  # a source checkout without installation
    sys.path.insert(0, str(REPO_ROOT))

from crane_pyg.train import (ConfigError, DatasetNotFoundError, load_config, load_dataset,
                             run_experiment)
from crane_pyg.train.trainer import locate_dataset
from crane_pyg.train.utils import atomic_write_json, atomic_write_text, library_versions

#: test metrics of the table (mean ± std over seeds)
TABLE_METRICS = ('recall@10', 'recall@20', 'ndcg@10', 'ndcg@20')
COSTS = ('best_epoch', 'seconds_per_epoch', 'eval_seconds', 'peak_memory_mb')
FINISHED = ('completed', 'early_stopped')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Train several models (and seeds) on one dataset with the same protocol '
                    'and write comparison.md / comparison.json.')
    parser.add_argument('--dataset', default='synthetic',
                        help="dataset name (default: the embedded 'synthetic')")
    parser.add_argument('--data-root', help='folder holding <dataset>/ '
                        '(default: $CRANE_DATA_ROOT or ./data)')
    parser.add_argument('--models', default='crane,lightgcn,freedom',
                        help='comma-separated model names (default: crane,lightgcn,freedom)')
    parser.add_argument('--seeds', default='999',
                        help='comma-separated seeds (default: 999, MMRec\'s)')
    parser.add_argument('--output', help='output folder '
                        '(default: benchmarks/results/compare-<dataset>)')
    parser.add_argument('--config', help='a YAML file applied to every run')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override for every run (repeatable)')
    parser.add_argument('--epochs', type=int, help='maximum epochs of every run')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), help='train.device')
    parser.add_argument('--resume', action='store_true',
                        help='continue interrupted runs, reuse finished ones')
    parser.add_argument('--in-process', action='store_true',
                        help='train in this process (CPU peak memory is then cumulative)')
    parser.add_argument('--quiet', action='store_true', help='no per-epoch output')
    return parser


def _split(text: str, what: str, cast=str) -> list:
    items = [item.strip() for item in text.split(',') if item.strip()]
    if not items:
        raise ConfigError(f'--{what} is empty')
    try:
        values = [cast(item) for item in items]
    except ValueError:
        raise ConfigError(f'--{what} must be a comma-separated list of '
                          f'{cast.__name__}, got {text!r}') from None
    if len(set(values)) != len(values):
        raise ConfigError(f'--{what} repeats an entry: {text!r}')
    return values


def _flags(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    flags: dict[str, Any] = {'train.seed': seed}
    if args.data_root is not None:
        flags['dataset.root'] = args.data_root
    if args.epochs is not None:
        flags['train.epochs'] = args.epochs
    if args.device is not None:
        flags['train.device'] = args.device
    return flags


def _cli_args(args: argparse.Namespace, model: str, seed: int, out: Path) -> list[str]:
    argv = ['--model', model, '--dataset', args.dataset, '--seed', str(seed),
            '--output', str(out)]
    if args.data_root is not None:
        argv += ['--data-root', args.data_root]
    if args.config is not None:
        argv += ['--config', args.config]
    if args.epochs is not None:
        argv += ['--epochs', str(args.epochs)]
    if args.device is not None:
        argv += ['--device', args.device]
    for override in args.overrides:
        argv += ['--set', override]
    if args.resume:
        argv.append('--resume')
    if args.quiet:
        argv.append('--quiet')
    return argv


def _run_subprocess(args: argparse.Namespace, model: str, seed: int, out: Path) -> int:
    code = 'import sys; from crane_pyg.train import main; sys.exit(main(sys.argv[1:]))'
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
    proc = subprocess.Popen([sys.executable, '-c', code, *_cli_args(args, model, seed, out)],
                            env=env)
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C, or SIGTERM (raised as KeyboardInterrupt in main)
        stop_child(proc)
        raise


def stop_child(proc: subprocess.Popen, grace: float = 60.0) -> int:
    r"""Ends a training subprocess when this script is interrupted, so that
    no run is left behind: a Ctrl-C in a terminal has reached the child
    already (same process group), so it gets two seconds to save its
    checkpoint and exit; otherwise (this script was sent SIGTERM) it is sent
    SIGINT, which makes the trainer save a checkpoint and exit with code
    130, and after :obj:`grace` seconds it is killed. Returns its exit code."""
    for action, timeout in ((None, 2.0), (signal.SIGINT, grace), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        if action is not None:
            proc.send_signal(action)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    return proc.returncode


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None,
            'values': values}


def summarise(runs: Sequence[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    r"""Per model: mean/std/values over seeds of the test metrics, the validation
    stop metric and the costs."""
    rows = []
    for model in models:
        mine = [r for r in runs if r['model'] == model]
        stop = mine[0]['stop_metric']
        row: dict[str, Any] = {'model': model, 'seeds': [r['seed'] for r in mine],
                               'stop_metric': stop}
        row['test'] = {m: _mean_std([r['test'][m] for r in mine]) for m in TABLE_METRICS}
        row['valid'] = {stop: _mean_std([r['valid'][stop] for r in mine])}
        for cost in COSTS:
            row[cost] = _mean_std([r[cost] for r in mine])
        rows.append(row)
    return rows


def _cell(stat: dict[str, Any], digits: int = 4) -> str:
    if stat['std'] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def to_markdown(summary: dict[str, Any]) -> str:
    seeds = summary['seeds']
    stop = summary['stop_metric']
    head = (['model', 'seeds'] + [m.replace('recall', 'Recall').replace('ndcg', 'NDCG')
                                  for m in TABLE_METRICS]
            + [f'valid {stop}', 'best epoch', 's / epoch', 'eval s', 'peak MiB'])
    over = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
            else f'seed {seeds[0]}')
    lines = [f"# Model comparison on {summary['dataset']}", '',
             f'Test metrics at the best validation epoch (early stopping and selection on '
             f'validation {stop}); {over}. Device: {summary["device"]}; peak memory: '
             f'{summary["peak_memory_source"]}.', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in summary['rows']:
        cells = [row['model'], str(len(row['seeds']))]
        cells += [_cell(row['test'][m]) for m in TABLE_METRICS]
        cells += [_cell(row['valid'][stop]), _cell(row['best_epoch'], 1),
                  _cell(row['seconds_per_epoch'], 2), _cell(row['eval_seconds'], 2),
                  _cell(row['peak_memory_mb'], 0)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'Runs: ' + ', '.join(f"`{r['output_dir']}`" for r in summary['runs']), '']
    return '\n'.join(lines)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    models = _split(args.models, 'models')
    seeds = _split(args.seeds, 'seeds', int)
    output = Path(args.output or REPO_ROOT / 'benchmarks' / 'results' / f'compare-{args.dataset}')
    # resolve every configuration first: a typo fails before hours of training
    configs = {(m, s): load_config(model=m, dataset=args.dataset, config_file=args.config,
                                   overrides=args.overrides, flags=_flags(args, s))
               for m in models for s in seeds}
    locate_dataset(next(iter(configs.values())).dataset)  # a clear error if it is missing
    data = None
    runs = []
    for (model, seed), config in configs.items():
        out = output / f'{model}-seed{seed}'
        done = out / 'results.json'
        if not (args.resume and done.is_file()):
            print(f'== {model}, seed {seed} -> {out}', flush=True)
            if args.in_process:
                if data is None:  # one dataset object for every run (never modified)
                    data = load_dataset(config.dataset)
                result = run_experiment(config, out, resume=args.resume, quiet=args.quiet,
                                        data=data)
                status = result['status']
            else:
                code = _run_subprocess(args, model, seed, out)
                status = 'completed' if code == 0 else f'exit code {code}'
            if status not in FINISHED:
                raise RuntimeError(f'run {model} seed {seed} did not finish ({status}); '
                                   f'rerun with --resume to continue')
        result = json.loads(done.read_text(encoding='utf-8'))
        runs.append({'model': model, 'seed': seed, 'output_dir': str(out),
                     'best_epoch': result['best_epoch'], 'stop_metric': result['stop_metric'],
                     'valid': result['valid'], 'test': result['test'],
                     'seconds_per_epoch': result['seconds_per_epoch'],
                     'eval_seconds': result['eval_seconds'],
                     'peak_memory_mb': result['peak_memory_mb'],
                     'peak_memory_source': result['peak_memory_source'],
                     'device': result['device'], 'epochs_run': result['epochs_run']})
    summary = {
        'dataset': args.dataset, 'models': models, 'seeds': seeds,
        'stop_metric': runs[0]['stop_metric'],
        'device': ', '.join(sorted({r['device'] for r in runs})),
        'peak_memory_source': ', '.join(sorted({r['peak_memory_source'] for r in runs}))
        + (' (in-process: cumulative over runs)' if args.in_process else ''),
        'rows': summarise(runs, models), 'runs': runs, 'versions': library_versions(),
    }
    atomic_write_json(output / 'comparison.json', summary)
    atomic_write_text(output / 'comparison.md', to_markdown(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the runs too
    try:
        summary = compare(args)
    except (ConfigError, DatasetNotFoundError) as exc:
        print(f'compare_models.py: error: {exc}', file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f'compare_models.py: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('compare_models.py: interrupted; rerun with --resume to continue',
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(to_markdown(summary))
    return 0

if __name__ == '__main__':
    sys.exit(main())
