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

Any registered model can be compared (``crane``, ``lightgcn``, ``vbpr``,
``freedom``, ``mgcn``, ``lgmrec``), e.g. ``--models
crane,freedom,mgcn,lgmrec``.

**Variants and ablations**: an entry of ``--models`` may also be
``LABEL=MODEL:KEY=VALUE[:KEY=VALUE...]``, the model ``MODEL`` with those
overrides (applied after the ``--set`` ones), reported, tested and stored
(``<output>/<LABEL>-seed<seed>/``) under ``LABEL``. CRANE's ablations against
the full model::

    python benchmarks/compare_models.py --dataset tiktok --seeds 999,1,2 \
        --models crane,no-rca=crane:model.use_rca=false,\
    no-profiles=crane:model.use_profiles=false,no-item-graph=crane:model.use_item_graph=false,\
    no-cl=crane:model.lambda_cl=0.0

A list value keeps its commas inside its brackets, e.g.
``mb=crane:train.num_neighbors=[10,10]:train.semantic_cache=10``.

``--resume`` continues interrupted runs and reuses finished ones. Both
result files are written atomically.

**Fair tuning** (``--tune``): every model first searches the space declared
under ``search:`` in its packaged YAML (``crane_pyg/configs/model/<model>.yaml``,
MMRec's ``hyper_parameters``) with the first seed, each point trained fully
with early stopping, and the point with the best **validation** stop metric
wins (:func:`crane_pyg.train.run_grid`; test metrics play no part). The
search spaces must have the same number of points for every model (the same
tuning budget; ``comparison.md`` lists trials and epochs per model). Then
every seed trains the winner (the first seed reuses the winning search run).

**Significance**: after the runs, every model's best checkpoints are ranked
again on the test split per user (:func:`crane_pyg.train.runs.per_user_metrics`),
each user's Recall@20 / NDCG@20 averaged over the seeds, and the target model
(``--target``, default ``crane`` when compared) is tested against every
other model with the Wilcoxon signed-rank test over users
(:func:`crane_pyg.metrics.significance.paired_wilcoxon`, two-sided). The
"best baseline" is the one with the highest mean *validation* stop metric.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import crane_pyg  # noqa: F401
except ImportError:  # a source checkout without installation
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from crane_pyg.metrics import FullRankingEvaluator
from crane_pyg.metrics.significance import paired_wilcoxon, seed_averaged
from crane_pyg.train import (ConfigError, DatasetNotFoundError, expand_grid, load_config,
                             load_dataset, run_experiment)
from crane_pyg.train.config import search_space
from crane_pyg.train.runs import load_trained_run, per_user_metrics
from crane_pyg.train.trainer import locate_dataset
from crane_pyg.train.utils import (atomic_write_json, atomic_write_text, library_versions,
                                   sigterm_as_interrupt)

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
                        help='comma-separated model names, any of crane, lightgcn, vbpr, '
                        'freedom, mgcn, lgmrec, or variants LABEL=MODEL:KEY=VALUE[:KEY=VALUE...] '
                        '(default: crane,lightgcn,freedom)')
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
    parser.add_argument('--tune', action='store_true',
                        help="search each model's declared search space on validation "
                             '(first seed) before the seeds; same number of points per model')
    parser.add_argument('--target', help='model tested against the others per user '
                        '(default: crane when compared, else the first model)')
    parser.add_argument('--no-significance', action='store_true',
                        help='skip the per-user re-ranking and paired tests')
    return parser


def _split(text: str, what: str, cast=str) -> list:
    # commas inside [...] belong to a list value (a variant's train.num_neighbors=[10,10])
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ','):
        depth += {'[': 1, ']': -1}.get(char, 0)
        if char == ',' and depth <= 0:
            items.append(text[start:i].strip())
            start = i + 1
    items = [item for item in items if item]
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


def _cli_args(args: argparse.Namespace, model: str, seed: int, out: Path,
              extra: Sequence[str] = ()) -> list[str]:
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
    for override in [*args.overrides, *extra]:
        argv += ['--set', override]
    # without --resume a comparison recomputes its runs (as the in-process mode does)
    argv.append('--resume' if args.resume else '--overwrite')
    if args.quiet:
        argv.append('--quiet')
    return argv


def _run_subprocess(args: argparse.Namespace, model: str, seed: int, out: Path,
                    extra: Sequence[str] = ()) -> int:
    code = 'import sys; from crane_pyg.train import main; sys.exit(main(sys.argv[1:]))'
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
    proc = subprocess.Popen([sys.executable, '-c', code,
                             *_cli_args(args, model, seed, out, extra)], env=env)
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
    SIGTERM, which makes the trainer save a checkpoint and exit with code
    130 (SIGINT would not: a job started in the background by a shell
    ignores it, and so do its children), and after :obj:`grace` seconds it
    is killed. Returns its exit code."""
    for action, timeout in ((None, 2.0), (signal.SIGTERM, grace), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        if action is not None:
            proc.send_signal(action)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    return proc.returncode


class Variant(NamedTuple):
    r"""One entry of ``--models``: the table's ``label``, the registered
    ``model`` it trains and its own ``overrides`` (``KEY=VALUE``)."""
    label: str
    model: str
    overrides: tuple[str, ...] = ()


def parse_models(text: str) -> list[Variant]:
    r"""``--models``: plain model names and ``LABEL=MODEL:KEY=VALUE[:...]``
    variants (see the module docstring)."""
    variants = []
    for entry in _split(text, 'models'):
        if '=' not in entry.split(':', 1)[0]:
            if ':' in entry:
                raise ConfigError(f'--models entry {entry!r}: a variant needs a label, '
                                  f'LABEL=MODEL:KEY=VALUE[:KEY=VALUE...]')
            variants.append(Variant(entry, entry))
            continue
        label, rest = (part.strip() for part in entry.split('=', 1))
        model, *overrides = (part.strip() for part in rest.split(':'))
        if (not label or not model or not overrides
                or any('=' not in o or o.startswith('=') for o in overrides)):
            raise ConfigError(f'--models entry {entry!r} is not LABEL=MODEL:KEY=VALUE'
                              f'[:KEY=VALUE...]')
        if not all(c.isalnum() or c in '-_' for c in label):
            raise ConfigError(f'--models entry {entry!r}: the label {label!r} names a '
                              f'folder; use letters, digits, - and _')
        variants.append(Variant(label, model, tuple(overrides)))
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f'--models repeats a label: {text!r}')
    return variants


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
    variants = summary.get('variants')
    if variants:
        lines += ['', 'Variants: ' + '; '.join(
            f"{label} = {v['model']} with " + ', '.join(f'`{o}`' for o in v['overrides'])
            for label, v in variants.items()) + '.']
    tuning = summary.get('tuning')
    if tuning:
        lines += ['', f'Tuning (seed {seeds[0]}, selected by validation {stop}; the same '
                  'number of trials per model):', '',
                  '| model | trials | epochs trained | search space | chosen |', '|---|---|---|---|---|']
        for model, t in tuning.items():
            space = '; '.join(f'{k} {v}' for k, v in t['space'].items()) or '-'
            chosen = ', '.join(f'{k}={v}' for k, v in t['params'].items()) or '-'
            lines.append(f"| {model} | {t['trials']} | {t['epochs']} | {space} | {chosen} |")
    sig = summary.get('significance')
    if sig:
        lines += ['', f"Paired test of {sig['target']} against each model on the test "
                  f"split ({sig['test']}); best baseline by {sig['selected_by']}: "
                  f"**{sig['best_baseline']}**.", '',
                  '| against | metric | users | target mean | other mean | rel. diff | '
                  'wins / losses | p-value |', '|---|---|---|---|---|---|---|---|']
        for other, by in sig['against'].items():
            for metric, t in by.items():
                rel = (t['mean_a'] / t['mean_b'] - 1) * 100 if t['mean_b'] else float('nan')
                lines.append(f"| {other} | {metric} | {t['users']} | {t['mean_a']:.4f} | "
                             f"{t['mean_b']:.4f} | {rel:+.1f} % | {t['wins']} / "
                             f"{t['losses']} | {t['p_value']:.2g} |")
    lines += ['', 'Runs: ' + ', '.join(f"`{r['output_dir']}`" for r in summary['runs']), '']
    return '\n'.join(lines)


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()


def _grid_overrides(space: dict[str, list[Any]]) -> list[str]:
    return [f'grid.{key}={_yaml_value(values)}' for key, values in space.items()]


def _point_overrides(params: dict[str, Any]) -> list[str]:
    return [f'{key}={_yaml_value(value)}' for key, value in params.items()]


def _train(args: argparse.Namespace, model: str, seed: int, out: Path,
           extra: Sequence[str], data_box: list) -> str:
    r"""Trains one run (or one grid) into ``out``; returns its status."""
    if args.in_process:
        config = load_config(model=model, dataset=args.dataset, config_file=args.config,
                             overrides=[*args.overrides, *extra], flags=_flags(args, seed))
        if not data_box:  # one dataset object for every run (never modified)
            data_box.append(load_dataset(config.dataset))
        return run_experiment(config, out, resume=args.resume, quiet=args.quiet,
                              data=data_box[0])['status']
    code = _run_subprocess(args, model, seed, out, extra)
    return 'completed' if code == 0 else f'exit code {code}'


def tune(args: argparse.Namespace, variants: Sequence[Variant], seed: int, output: Path,
         data_box: list) -> dict[str, dict[str, Any]]:
    r"""Searches every model's declared space on validation with ``seed``;
    returns per model (label) the winner's parameters, its run directory and
    the budget spent (points, epochs)."""
    by_label = {v.label: v for v in variants}
    models = list(by_label)
    spaces = {v.label: search_space(v.model) for v in variants}
    sizes = {model: len(expand_grid(space)) for model, space in spaces.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError('--tune needs the same number of search points for every model '
                          '(the same tuning budget); declared: '
                          + ', '.join(f'{m} {n}' for m, n in sizes.items())
                          + ' (search: in crane_pyg/configs/model/<model>.yaml)')
    tuned = {}
    for model in models:
        out = output / f'{model}-tune'
        done = out / 'results.json'
        if not (args.resume and done.is_file()):
            print(f'== tuning {model} ({sizes[model]} points), seed {seed} -> {out}', flush=True)
            variant = by_label[model]
            status = _train(args, variant.model, seed, out,
                            [*variant.overrides, *_grid_overrides(spaces[model])], data_box)
            if status not in FINISHED:
                raise RuntimeError(f'tuning {model} did not finish ({status}); '
                                   f'rerun with --resume to continue')
        grid = json.loads(done.read_text(encoding='utf-8'))['grid']
        if grid is None:  # an empty search space: one plain run
            grid = {'params': {}, 'points': [{'output_dir': str(out)}], 'winner': 0}
        epochs = []
        for point in grid['points']:
            result = json.loads((Path(point['output_dir']) / 'results.json')
                                .read_text(encoding='utf-8'))
            epochs.append(result['epochs_run'])
        tuned[model] = {'space': spaces[model], 'params': grid['params'],
                        'winner_dir': grid['points'][grid['winner']]['output_dir'],
                        'trials': len(grid['points']), 'epochs': sum(epochs),
                        'max_epochs_per_trial': max(epochs)}
    return tuned


def significance(runs: Sequence[dict[str, Any]], target: str, rows: Sequence[dict[str, Any]],
                 metrics: Sequence[str] = ('recall@20', 'ndcg@20')) -> dict[str, Any]:
    r"""Per-user test metrics of every run (best checkpoint), averaged over
    seeds per model, and the paired Wilcoxon test of ``target`` against every
    other model; ``best_baseline`` is the other model with the highest mean
    validation stop metric."""
    data = evaluator = None
    ks = sorted({int(m.split('@')[1]) for m in metrics})
    per_model: dict[str, dict[str, list[dict[int, float]]]] = {}
    for run in runs:
        _, data, model = load_trained_run(run['output_dir'], data=data)
        if evaluator is None:  # one evaluator for every run: they share the data
            evaluator = FullRankingEvaluator(data, split='test', ks=ks)
        values = per_user_metrics(model, data, 'test', ks, evaluator=evaluator)
        users = values['users'].tolist()
        for metric in metrics:
            per_model.setdefault(run['model'], {}).setdefault(metric, []).append(
                dict(zip(users, values[metric].tolist())))
    averaged = {model: {metric: seed_averaged(per_seed) for metric, per_seed in by.items()}
                for model, by in per_model.items()}
    stop = rows[0]['stop_metric']
    others = [row for row in rows if row['model'] != target]
    best = max(others, key=lambda row: row['valid'][stop]['mean'])['model'] if others else None
    tests = {other['model']: {metric: paired_wilcoxon(averaged[target][metric],
                                                      averaged[other['model']][metric])
                              for metric in metrics} for other in others}
    return {'target': target, 'best_baseline': best, 'selected_by': f'valid {stop}',
            'test': 'Wilcoxon signed-rank over users, two-sided, per-user values '
                    'averaged over seeds', 'against': tests}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    variants = {v.label: v for v in parse_models(args.models)}
    models = list(variants)
    seeds = _split(args.seeds, 'seeds', int)
    output = Path(args.output or REPO_ROOT / 'benchmarks' / 'results' / f'compare-{args.dataset}')
    target = args.target or ('crane' if 'crane' in models else models[0])
    if target not in models:
        raise ConfigError(f'--target {target!r} is not among --models {models}')
    # resolve every configuration first: a typo fails before hours of training
    configs = {(m, s): load_config(model=variants[m].model, dataset=args.dataset,
                                   config_file=args.config,
                                   overrides=[*args.overrides, *variants[m].overrides],
                                   flags=_flags(args, s))
               for m in models for s in seeds}
    locate_dataset(next(iter(configs.values())).dataset)  # a clear error if it is missing
    data_box: list = []
    tuned = tune(args, list(variants.values()), seeds[0], output, data_box) if args.tune else {}
    runs = []
    for (model, seed), config in configs.items():
        extra = [*variants[model].overrides,
                 *(_point_overrides(tuned[model]['params']) if model in tuned else [])]
        out = output / f'{model}-seed{seed}'
        if model in tuned and seed == seeds[0]:
            out = Path(tuned[model]['winner_dir'])  # the winning search run is this seed's run
        done = out / 'results.json'
        if not (args.resume and done.is_file()) and not (model in tuned and seed == seeds[0]):
            print(f'== {model}, seed {seed} -> {out}', flush=True)
            status = _train(args, variants[model].model, seed, out, extra, data_box)
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
    rows = summarise(runs, models)
    summary = {
        'dataset': args.dataset, 'models': models, 'seeds': seeds,
        'variants': {v.label: {'model': v.model, 'overrides': list(v.overrides)}
                     for v in variants.values() if v.overrides} or None,
        'stop_metric': runs[0]['stop_metric'],
        'device': ', '.join(sorted({r['device'] for r in runs})),
        'peak_memory_source': ', '.join(sorted({r['peak_memory_source'] for r in runs}))
        + (' (in-process: cumulative over runs)' if args.in_process else ''),
        'tuning': tuned or None,
        'rows': rows, 'runs': runs, 'versions': library_versions(),
        'significance': (None if args.no_significance or len(models) < 2
                         else significance(runs, target, rows)),
    }
    atomic_write_json(output / 'comparison.json', summary)
    atomic_write_text(output / 'comparison.md', to_markdown(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():  # `kill` stops the runs too
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
    print()
    print(to_markdown(summary))
    return 0

if __name__ == '__main__':
    sys.exit(main())
