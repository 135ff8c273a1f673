r"""When CRANE's mini-batch mode pays off: peak memory and step time of a
training step, full-batch against sampled subgraphs, as the graph grows.

Modes (:mod:`crane_pyg.models.minibatch`):

* ``full``: :meth:`CRANE.loss <crane_pyg.models.CRANE.loss>`, propagation
  of all :math:`U + I` nodes and encoders + RCA on all :math:`I` items,
  :math:`O((U + I) d L)` activations kept for the backward pass;
* ``mini[-1,-1]``: :class:`~crane_pyg.models.minibatch.MiniBatchCRANE` with
  every neighbour on both user-item hops (exact: same loss and gradients);
* ``mini[10,10]``, ``mini[5,5]``: sampled fan-outs; encoders and RCA on at
  most :math:`|S_0| (1 + \bar{k})^{L_{ii}}` items,
  :math:`|S_0| \le 2B + U_b k_{mean}`, independent of :math:`I`.

For each size (users = items = N, E = 5 N interactions, the two small
modalities of ``memory_linear.py``, a kNN-shaped item graph with k = 10,
d = 64, CRANE defaults) and mode a fresh subprocess builds the data and the
model, resets its peak resident set (``/proc/self/clear_refs``), builds the
mode's loss module and Adam, and runs 1 warm-up + ``--repeats`` timed
training steps (batch 2048: zero_grad, loss, backward, Adam step; the BPR
triples are drawn beforehand). ``memory_mb`` is the peak resident set of
those steps minus ``baseline_rss_mb`` (an interpreter that only imported
torch and crane_pyg), so it holds the model, the data, the embedding
gradients and Adam's moments (:math:`O((U + I) d)` in every mode: the
floor mini-batching cannot remove) plus the step's activations;
``step_memory_mb`` is that peak minus the resident set just before the
steps (what training adds on top of data and model: activations,
gradients, Adam's moments, the samplers' indices); ``process_peak_mb`` is the whole child's peak minus the baseline (the
figure of ``memory_linear.py``, data building included). On CUDA
``memory_mb`` is ``torch.cuda.max_memory_allocated`` over the steps (and
``step_memory_mb`` that minus the memory allocated before them). The
mini-batch points also store ``last_stats`` of the last step (items through
the encoders and RCA, nodes of the user-item subgraph, ...).

    python benchmarks/minibatch_memory.py                 # N = 25k, 50k, 100k, 200k
    python benchmarks/minibatch_memory.py --sizes 25000 50000 --device cuda
    python benchmarks/minibatch_memory.py --quick --in-process   # smoke test
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    baseline_rss_mb, current_rss_mb, environment, loglog_slope, make_heterodata,
    make_parser, measure_point, peak_memory_mb, peak_rss_mb, random_item_graph,
    reset_peak, reset_peak_rss, resolve_device, save_figure, time_fn, write_json, run_child_point,
)
from benchmarks.memory_linear import FEATURES  # noqa: E402

SCRIPT = Path(__file__).resolve()
EDGES_PER_NODE = 5  # E = 5 N, as memory_linear.py
ITEM_K = 10
#: mode label -> user-item fan-out per hop (None: full batch, ``model.loss``)
MODES: Dict[str, Optional[List[int]]] = {
    'full': None, 'mini[-1,-1]': [-1, -1], 'mini[10,10]': [10, 10], 'mini[5,5]': [5, 5],
}
QUICK = {'sizes': [3000, 12000], 'd': 16, 'batch_size': 64}


def _setup(p: Dict[str, Any], n: int, device, steps: int):
    r"""Data, CRANE and ``steps`` BPR batches of size ``p['batch_size']`` for
    users = items = :obj:`n` (the batches cycle over epochs if needed)."""
    import itertools

    from crane_pyg.data import USER_ITEM, BPRSampler
    from crane_pyg.models import CRANE

    data = make_heterodata(n, n, EDGES_PER_NODE * n, FEATURES, seed=p['seed'])
    features = {m: data['item'][m].to(device) for m in FEATURES}
    ii_index, ii_weight = random_item_graph(n, ITEM_K, seed=p['seed'])
    edge_index = data[USER_ITEM].edge_index.to(device)
    model = CRANE(n, n, edge_index, features, ii_index.to(device), ii_weight.to(device),
                  embedding_dim=p['d'], seed=p['seed']).to(device)
    model.train()
    sampler = BPRSampler(edge_index, n, n, seed=p['seed'])
    epochs = (sampler.batches(epoch, p['batch_size']) for epoch in itertools.count())
    batches = list(itertools.islice(itertools.chain.from_iterable(epochs), steps))
    return model, batches


def _trainer(model, num_neighbors, batches, device):
    r"""``(step, module, losses)``: ``step()`` runs the next batch's training
    step (zero_grad, loss of the mode, backward, Adam) and appends its loss
    to ``losses``; ``module`` is the mini-batch loss module (None: full)."""
    import torch
    from crane_pyg.models.minibatch import minibatch_loss_module

    module = None if num_neighbors is None else minibatch_loss_module(model, num_neighbors)
    loss_fn = model.loss if module is None else module
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch_iter, losses = iter(batches), []

    def step() -> None:
        users, pos, neg = (t.to(device) for t in next(batch_iter))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(users, pos, neg)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    return step, module, losses


def run_point(p: Dict[str, Any]) -> Dict[str, Any]:
    r"""One (N, mode) point (see the module docstring)."""
    import gc

    import torch

    device = resolve_device(p['device'])
    torch.manual_seed(p['seed'])
    n = p['N']
    model, batches = _setup(p, n, device, 1 + p['repeats'])
    gc.collect()

    setup_peak = peak_rss_mb()
    setup_rss = current_rss_mb()
    reset_ok = reset_peak_rss()
    reset_peak(device)
    setup_cuda = (torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == 'cuda'
                  else None)
    step, module, losses = _trainer(model, p['num_neighbors'], batches, device)
    timing = time_fn(step, device, repeats=p['repeats'], warmup=1)
    memory = peak_memory_mb(device)
    out = {'N': n, 'mode': p['mode'], 'num_neighbors': p['num_neighbors'],
           'num_users': n, 'num_items': n, 'E_train': int(model.edge_index.size(1)),
           'time': timing, 'step_ms': 1e3 * timing['median'],
           'losses': losses, 'finite_loss': all(map(math.isfinite, losses)),
           'setup_rss_mb': setup_rss, 'setup_peak_rss_mb': setup_peak,
           'peak_reset': reset_ok, 'train_peak_rss_mb': memory['peak_rss_mb'],
           'process_peak_rss_mb': max(setup_peak, memory['peak_rss_mb']),
           'last_stats': dict(module.last_stats) if module is not None else None}
    if 'cuda_max_allocated_mb' in memory:
        out['cuda_max_allocated_mb'] = memory['cuda_max_allocated_mb']
        out['setup_cuda_allocated_mb'] = setup_cuda
    return out


def memory_figures(point: Dict[str, Any], base: float) -> None:
    r"""Adds to an ``'ok'`` point ``memory_mb`` (the steps' peak above
    :obj:`base`; CUDA: allocated), ``step_memory_mb`` (that peak minus the
    footprint of data + model before the steps: what training adds; None
    without a peak reset) and ``process_peak_mb``."""
    point['process_peak_mb'] = point['process_peak_rss_mb'] - base
    point['step_memory_mb'] = None
    if 'cuda_max_allocated_mb' in point:
        point['memory_mb'] = point['cuda_max_allocated_mb']
        point['step_memory_mb'] = point['memory_mb'] - point['setup_cuda_allocated_mb']
    elif point['peak_reset']:
        point['memory_mb'] = point['train_peak_rss_mb'] - base
        point['step_memory_mb'] = point['train_peak_rss_mb'] - point['setup_rss_mb']
    else:  # no peak reset on this platform: the whole child's peak
        point['memory_mb'] = point['process_peak_mb']


def summary_rows(points: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    r"""One row per (N, mode): memory, ms/step, items encoded and UI nodes
    (all :math:`I` and :math:`U + I` for ``full``), and the ratios to
    full-batch at the same N (memory full / mode, time mode / full)."""
    full = {q['N']: q for q in points.get('full', []) if q['status'] == 'ok'}
    rows = []
    for mode, pts in points.items():
        for q in pts:
            if q['status'] != 'ok':
                rows.append({'N': q['N'], 'mode': mode, 'status': q['status']})
                continue
            stats = q['last_stats'] or {'items_encoded': q['num_items'],
                                        'ui_nodes': q['num_users'] + q['num_items']}
            row = {'N': q['N'], 'mode': mode, 'status': 'ok', 'memory_mb': q['memory_mb'],
                   'step_memory_mb': q['step_memory_mb'],
                   'process_peak_mb': q['process_peak_mb'], 'step_ms': q['step_ms'],
                   'items_encoded': stats['items_encoded'], 'ui_nodes': stats['ui_nodes']}
            ref = full.get(q['N'])
            if ref is not None and mode != 'full':
                row['memory_saving'] = ref['memory_mb'] / q['memory_mb']
                if q['step_memory_mb'] and ref['step_memory_mb']:
                    row['step_memory_saving'] = ref['step_memory_mb'] / q['step_memory_mb']
                row['time_ratio'] = q['step_ms'] / ref['step_ms']
            rows.append(row)
    return sorted(rows, key=lambda r: (r['N'], list(points).index(r['mode'])))


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode, pts in result['points'].items():
        pts = [q for q in pts if q['status'] == 'ok']
        xs = [q['N'] for q in pts]
        slopes = result['fitted_slopes'][mode]
        lines = []
        for ax, key, slope in ((ax_mem, 'memory_mb', slopes['memory']),
                               (ax_time, 'step_ms', slopes['time'])):
            label = f'{mode}, slope {slope:.2f}' if slope is not None else mode
            lines += ax.plot(xs, [q[key] for q in pts], marker='o', label=label)
        step = [(x, q['step_memory_mb']) for x, q in zip(xs, pts)
                if q['step_memory_mb'] is not None and q['step_memory_mb'] > 0]
        if step:  # dashed, same colour: what the steps add to data + model
            ax_mem.plot(*zip(*step), ls='--', marker='.', color=lines[0].get_color(),
                        label=f'{mode}, steps only')
    cfg = result['config']
    mem_label = ('max_memory_allocated, MiB' if result['environment']['device'].startswith('cuda')
                 else 'peak RSS of the steps above baseline, MiB')
    for ax, ylabel in ((ax_mem, mem_label), (ax_time, 'ms per training step (median)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('N (users = items)')
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, which='both', alpha=0.3)
    fig.suptitle(f"CRANE training step, full-batch vs mini-batch (d={cfg['d']}, "
                 f"batch {cfg['batch_size']}, E={EDGES_PER_NODE}N, "
                 f"{result['environment']['device']}, "
                 f"{result['environment']['torch_threads']} threads)", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> Dict[str, Any]:
    parser = make_parser(__doc__, 'minibatch_memory.json', timeout=1800,
                         quick_help=f"tiny grid (smoke test): N = {QUICK['sizes']}, "
                                    f"d = {QUICK['d']}, batch {QUICK['batch_size']}")
    parser.add_argument('--sizes', type=int, nargs='+', default=[25000, 50000, 100000, 200000],
                        help='N: users = items = N')
    parser.add_argument('--d', type=int, default=64, help='embedding size')
    parser.add_argument('--batch-size', type=int, default=2048)
    args = parser.parse_args(argv)
    if run_child_point(args, run_point):
        return {}
    device = resolve_device(args.device)
    sizes = QUICK['sizes'] if args.quick else args.sizes
    d = QUICK['d'] if args.quick else args.d
    batch_size = QUICK['batch_size'] if args.quick else args.batch_size
    base = 0.0 if args.in_process else baseline_rss_mb()
    result: Dict[str, Any] = {
        'benchmark': 'minibatch_memory', 'environment': environment(device),
        'baseline_rss_mb': base,
        'config': {'sizes': sizes, 'd': d, 'batch_size': batch_size,
                   'edges_per_node': EDGES_PER_NODE, 'item_k': ITEM_K, 'features': FEATURES,
                   'warmup_steps': 1, 'timed_steps': args.repeats, 'modes': MODES,
                   'seed': args.seed, 'in_process': args.in_process,
                   'memory': 'memory_mb: peak RSS of the training steps (peak reset after '
                             'building data and model) minus baseline_rss_mb (CUDA: '
                             'max_memory_allocated over the steps); process_peak_mb: the '
                             "whole point's peak RSS minus baseline_rss_mb"},
        'points': {mode: [] for mode in MODES},
    }
    out_path = Path(args.output)
    for n in sizes:
        for mode, num_neighbors in MODES.items():
            p = {'device': str(device), 'N': n, 'mode': mode, 'num_neighbors': num_neighbors,
                 'd': d, 'batch_size': batch_size, 'repeats': args.repeats, 'seed': args.seed}
            out = measure_point(SCRIPT, run_point, p, args.in_process, timeout=args.timeout)
            out.update(N=n, mode=mode)
            if out['status'] == 'ok':
                memory_figures(out, base)
                stats = out['last_stats']
                extra = (f"  items encoded {stats['items_encoded']:>7}  "
                         f"ui nodes {stats['ui_nodes']:>7}" if stats else '')
                msg = f"{out['memory_mb']:8.0f} MiB  {out['step_ms']:8.0f} ms/step{extra}"
            else:
                msg = f"{out['status']}: {out.get('error')}"
            print(f'[N={n:>7} {mode:>11}] {msg}', flush=True)
            result['points'][mode].append(out)
            write_json(result, out_path)  # partial results survive an interruption
    result['fitted_slopes'] = {}
    for mode, pts in result['points'].items():
        ok = [q for q in pts if q['status'] == 'ok']
        xs = [q['N'] for q in ok]
        result['fitted_slopes'][mode] = {
            'memory': loglog_slope(xs, [q['memory_mb'] for q in ok]),
            'time': loglog_slope(xs, [q['step_ms'] for q in ok])}
    result['summary'] = summary_rows(result['points'])
    result['environment']['loadavg_end'] = list(os.getloadavg())
    write_json(result, out_path)
    plot(result, out_path.with_suffix('.png'))
    print('\n| N | mode | peak MiB | of which steps | ms/step | items encoded | UI nodes |')
    print('|---:|---|---:|---:|---:|---:|---:|')
    for r in result['summary']:
        if r['status'] == 'ok':
            step = r['step_memory_mb']
            print(f"| {r['N']:,} | {r['mode']} | {r['memory_mb']:.0f} | "
                  f"{'n/a' if step is None else f'{step:.0f}'} | {r['step_ms']:.0f} | "
                  f"{r['items_encoded']:,} | {r['ui_nodes']:,} |")
        else:
            print(f"| {r['N']:,} | {r['mode']} | {r['status']} | | | | |")
    print(f'wrote {out_path} and {out_path.with_suffix(".png")}')
    return result


if __name__ == '__main__':
    main()
