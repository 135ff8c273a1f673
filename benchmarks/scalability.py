r"""Scalability of CRANE against the cost formula of DESIGN.md section 3,

.. math::
    O(L_{ui} E d + L_{ii} k I d + R (U + I) M d^2)

per training step (our step runs RCA on all items and the batch's users).

Synthetic power-law graphs (:func:`benchmarks.common.make_heterodata`) grow
along one axis at a time -- ``N`` (users + items, interactions fixed),
``E`` (interactions, nodes fixed), ``d``, ``R`` (RCA recursions),
``L`` (user-item layers), ``k`` (item-item neighbours; a random kNN-shaped
graph, :func:`benchmarks.common.random_item_graph`, so that the
:math:`O(I^2)` kNN search does not enter) -- with the others at the base
values. Every point runs in a fresh subprocess, which reports

* the time of one training step (batch ``--batch-size``) split into parts,
  timed with forward hooks on CRANE's own submodules: ``ui_prop``
  (``CRANE.ui_encoder``, the UserItemConv stack), ``ii_prop``
  (``CRANE.item_conv``, ItemItemConv), ``encoders`` (modality
  ``nn.Linear``), ``profiles`` (``CRANE.profiles`` + the ``item_mean``
  UserProfileAggregation), ``rca`` (RecursiveCrossModalAttention) and
  ``loss_backward`` (the rest of the step: losses, backward, Adam), plus
  ``sampling`` (:class:`~crane_pyg.data.BPRSampler` ``.sample`` of a whole
  epoch divided by the number of batches) -- forward parts only; their
  backward is inside ``loss_backward``;
* the time of one full-ranking evaluation
  (:class:`~crane_pyg.metrics.FullRankingEvaluator`, validation split,
  :math:`O(U I d)`: predicted slope 2 along ``N``);
* its peak resident set (``VmHWM``; CUDA: ``max_memory_allocated``).

Each time is the median of ``--repeats`` (>= 3) runs after one warm-up, with
its spread. The log-log slope of every part against its axis is fitted over
the ``--fit-last`` largest points and stored beside the slope the formula
predicts for the parts it governs.

    python benchmarks/scalability.py               # default sizes, a few minutes on 2 CPU cores
    python benchmarks/scalability.py --quick       # seconds (smoke test)
    python benchmarks/scalability.py --axes E d --scale 4
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    make_parser, save_figure, baseline_rss_mb, environment, evaluate, loglog_slope,
    make_heterodata, measure_point, peak_memory_mb, random_item_graph, reset_peak, resolve_device,
    summarize, synchronize, write_json, run_child_point,
)

PARTS = ('sampling', 'encoders', 'profiles', 'rca', 'ii_prop', 'ui_prop', 'loss_backward')

#: per axis: the parts whose cost the formula ties to the axis, and the slope
PREDICTED = {
    'N': {'parts': ['rca', 'ii_prop', 'encoders'], 'slope': 1.0,
          'note': 'R (I + U_b) M d^2 + k I d + I sum(d_m) d; evaluation O(U I d): slope 2'},
    'E': {'parts': ['ui_prop'], 'slope': 1.0,
          'note': 'L_ui (E + U + I) d per step: linear in E once E >> U + I; sampling '
                  'is O(E log E) per epoch, i.e. O(B log E) per batch (slope ~0 here)'},
    'd': {'parts': ['rca'], 'slope': 2.0,
          'note': 'R (U + I) M d^2; the propagations are linear in d'},
    'R': {'parts': ['rca'], 'slope': 1.0, 'note': 'R (U + I) M d^2'},
    'L': {'parts': ['ui_prop'], 'slope': 1.0, 'note': 'L_ui E d'},
    'k': {'parts': ['ii_prop'], 'slope': 1.0, 'note': 'L_ii k I d'},
}

BASE = {'N': 12000, 'E': 60000, 'd': 64, 'R': 2, 'L': 2, 'k': 10}
GRID = {
    'N': [6000, 12000, 24000, 48000],
    'E': [30000, 60000, 120000, 240000],
    'd': [32, 64, 128, 256],
    'R': [1, 2, 4, 8],
    'L': [1, 2, 4, 8],
    'k': [5, 10, 20, 40],
}
QUICK_BASE = {'N': 600, 'E': 3000, 'd': 16, 'R': 1, 'L': 1, 'k': 4}
QUICK_GRID = {'N': [400, 800], 'E': [2000, 4000], 'd': [8, 16], 'R': [1, 2],
              'L': [1, 2], 'k': [2, 4]}
FEATURE_DIMS = {'image': 128, 'text': 64}
USER_FRACTION = 2 / 3  # U = 2N/3, I = N/3


# ---------------------------------------------------------------------------
# one point (runs in the child process)
# ---------------------------------------------------------------------------

class _PartTimer:
    r"""Accumulates wall-clock time of module forwards (forward hooks)."""

    def __init__(self, device):
        self.device = device
        self.totals: Dict[str, float] = {}
        self._start: Dict[int, float] = {}

    def hook(self, module, name: str) -> None:
        def pre(mod, args):
            synchronize(self.device)
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            synchronize(self.device)
            self.add(name, time.perf_counter() - self._start.pop(id(mod)))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def add(self, name: str, dt: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + dt


def run_point(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    previous = torch.get_num_threads()
    if p.get('threads'):
        torch.set_num_threads(p['threads'])
    try:
        return _run_point(p)
    finally:  # matters with --in-process
        torch.set_num_threads(previous)


def _run_point(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from crane_pyg.data import BPRSampler
    from crane_pyg.data.schema import USER_ITEM
    from crane_pyg.metrics import FullRankingEvaluator
    from crane_pyg.models import CRANE

    device = resolve_device(p['device'])
    torch.manual_seed(p['seed'])
    N, E = p['N'], p['E']
    U = max(2, int(round(N * USER_FRACTION)))
    I = max(2, N - U)
    data = make_heterodata(U, I, E, FEATURE_DIMS, seed=p['seed'])
    ii_index, ii_weight = random_item_graph(I, p['k'], seed=p['seed'])
    edge_index = data[USER_ITEM].edge_index
    features = {m: data['item'][m] for m in data.modalities}
    model = CRANE(U, I, edge_index, features, ii_index, ii_weight,
                  embedding_dim=p['d'], num_recursions=p['R'], num_ui_layers=p['L'],
                  knn_k=p['k']).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = BPRSampler(edge_index, U, I, seed=p['seed'], device=device)
    batch = p['batch_size']
    num_batches = sampler.num_batches(batch)

    timer = _PartTimer(device)
    timer.hook(model.ui_encoder, 'ui_prop')
    timer.hook(model.item_conv, 'ii_prop')
    timer.hook(model.rca, 'rca')
    for enc in model.encoders:
        timer.hook(enc, 'encoders')
    for module in (model.profiles, model.item_mean):  # public submodules, forward hooks
        if module is not None:
            timer.hook(module, 'profiles')

    reset_peak(device)
    step_samples: List[Dict[str, float]] = []
    for rep in range(p['repeats'] + 1):  # the first one is a warm-up
        synchronize(device)
        t0 = time.perf_counter()
        users, pos, neg = sampler.sample(rep)
        synchronize(device)
        t_sample = (time.perf_counter() - t0) / num_batches
        users, pos, neg = users[:batch], pos[:batch], neg[:batch]
        timer.totals = {}
        model.train()
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(users, pos, neg)
        loss.backward()
        opt.step()
        synchronize(device)
        t_step = time.perf_counter() - t0
        parts = {name: timer.totals.get(name, 0.0) for name in PARTS if name not in
                 ('sampling', 'loss_backward')}
        parts['loss_backward'] = max(t_step - sum(parts.values()), 0.0)
        parts['sampling'] = t_sample
        parts['step'] = t_step + t_sample
        if rep > 0:
            step_samples.append(parts)
    step = {name: summarize([s[name] for s in step_samples]) for name in step_samples[0]}

    # full-ranking evaluation (embeddings once, then scoring in batches)
    model.eval()
    evaluator = FullRankingEvaluator(data, 'valid', batch_size=1024, device=device)
    eval_samples = []
    for rep in range(p['repeats'] + 1):
        synchronize(device)
        t0 = time.perf_counter()
        evaluate(model, evaluator)
        synchronize(device)
        if rep > 0:
            eval_samples.append(time.perf_counter() - t0)
    return {'U': U, 'I': I, 'E_train': int(edge_index.size(1)),
            'num_batches': num_batches, 'step': step,
            'evaluation': summarize(eval_samples), 'memory': peak_memory_mb(device)}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    axes = list(result['axes'])
    cols = min(3, len(axes))
    rows = (len(axes) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(grid.flat, axes):
        entry = result['axes'][name]
        pts = [q for q in entry['points'] if q.get('status') == 'ok']
        xs = [q['value'] for q in pts]
        for part in PARTS + ('step',):
            ys = [q['step'][part]['median'] for q in pts]
            if max(ys, default=0) <= 0:
                continue
            slope = entry['fitted_slopes'].get(part)
            label = f"{part} ({slope:.2f})" if slope is not None else part
            ax.plot(xs, ys, marker='o', lw=2 if part == 'step' else 1, label=label)
        ys = [q['evaluation']['median'] for q in pts]
        slope = entry['fitted_slopes'].get('evaluation')
        ax.plot(xs, ys, 'k--', marker='s', label=f"eval ({slope:.2f})" if slope else 'eval')
        ax.set_xscale('log')
        ax.set_yscale('log')
        pred = PREDICTED[name]
        ax.set_title(f"axis {name}: predicted slope {pred['slope']:g} for "
                     f"{', '.join(pred['parts'])}", fontsize=9)
        ax.set_xlabel(name)
        ax.set_ylabel('seconds (median)')
        ax.legend(fontsize=6)
    for ax in list(grid.flat)[len(axes):]:
        ax.axis('off')
    fig.suptitle(f"CRANE step parts vs. axis (loadavg {result['environment']['loadavg'][0]:.1f})",
                 fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> Dict[str, Any]:
    parser = make_parser(__doc__, 'scalability.json')
    parser.add_argument('--axes', nargs='+', default=list(GRID), choices=list(GRID))
    parser.add_argument('--scale', type=float, default=1.0,
                        help='multiplies the N and E grids and base values')
    parser.add_argument('--points', type=int, default=None,
                        help='use only the first POINTS values of each grid')
    parser.add_argument('--batch-size', type=int, default=2048)
    parser.add_argument('--fit-last', type=int, default=3,
                        help='fit the slope over this many largest points')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads per point (default: %(default)s: one '
                             'thread keeps fixed per-operation overheads small against '
                             'the work, so the slopes reflect the algorithm; 0 keeps '
                             "torch's default)")
    parser.add_argument('--grid', action='append', default=[], metavar='AXIS=V1,V2,...',
                        help='replace the values of one axis (after --scale), e.g. '
                             'E=240000,480000,960000 (repeatable)')
    parser.add_argument('--base', action='append', default=[], metavar='AXIS=V',
                        help='replace the base value of one axis (after --scale), e.g. '
                             'N=96000 (repeatable)')
    args = parser.parse_args(argv)
    if run_child_point(args, run_point):
        return {}

    device = resolve_device(args.device)
    base = dict(QUICK_BASE if args.quick else BASE)
    grid = {k: list(v) for k, v in (QUICK_GRID if args.quick else GRID).items()}
    for key in ('N', 'E'):
        base[key] = int(base[key] * args.scale)
        grid[key] = [int(v * args.scale) for v in grid[key]]
    for text, target, many in [(g, grid, True) for g in args.grid] + \
            [(b, base, False) for b in args.base]:
        axis, _, values = text.partition('=')
        try:
            parsed = [int(float(v)) for v in values.split(',') if v.strip()]
        except ValueError:
            parsed = []
        if axis not in GRID or not parsed or (not many and len(parsed) != 1) \
                or min(parsed) < 1:
            parser.error(f"--{'grid' if many else 'base'} {text!r}: expected "
                         f"AXIS={'V1,V2,...' if many else 'V'} with AXIS in {list(GRID)} "
                         f"and positive integers")
        target[axis] = parsed if many else parsed[0]
    if args.points:
        grid = {k: v[:args.points] for k, v in grid.items()}
    batch = min(args.batch_size, 256) if args.quick else args.batch_size

    result: Dict[str, Any] = {
        'benchmark': 'scalability', 'environment': environment(device),
        'baseline_rss_mb': 0.0 if args.in_process else baseline_rss_mb(),
        'config': {'base': base, 'grid': {a: grid[a] for a in args.axes},
                   'feature_dims': FEATURE_DIMS, 'user_fraction': USER_FRACTION,
                   'batch_size': batch, 'repeats': args.repeats, 'fit_last': args.fit_last,
                   'parts': list(PARTS), 'timing': 'median of repeats after 1 warm-up; '
                   'forward parts via hooks, backward inside loss_backward; sampling is '
                   'one epoch of BPRSampler.sample divided by the batches per epoch'},
        'axes': {},
    }
    script = Path(__file__).resolve()
    for axis in args.axes:
        points = []
        for value in grid[axis]:
            p = dict(base, device=str(device), seed=args.seed, repeats=args.repeats,
                     batch_size=batch, threads=args.threads)
            p[axis] = value
            t0 = time.time()
            out = measure_point(script, run_point, p, args.in_process, timeout=args.timeout)
            out.update(value=value, params=p)
            points.append(out)
            msg = (f"step {out['step']['step']['median']*1e3:8.1f} ms  eval "
                   f"{out['evaluation']['median']*1e3:8.1f} ms  rss "
                   f"{out['memory']['peak_rss_mb']:7.0f} MiB" if out['status'] == 'ok'
                   else f"FAILED: {out.get('error')}")
            print(f"[{axis}={value:>8}] {msg}  ({time.time() - t0:.0f} s)", flush=True)
        ok = [q for q in points if q['status'] == 'ok']
        xs = [q['value'] for q in ok]
        slopes = {part: loglog_slope(xs, [q['step'][part]['median'] for q in ok],
                                     args.fit_last)
                  for part in PARTS + ('step',)}
        slopes['evaluation'] = loglog_slope(xs, [q['evaluation']['median'] for q in ok],
                                            args.fit_last)
        slopes['peak_rss_mb'] = loglog_slope(
            xs, [q['memory']['peak_rss_mb'] - result['baseline_rss_mb'] for q in ok],
            args.fit_last)
        if ok and all('cuda_max_allocated_mb' in q['memory'] for q in ok):
            slopes['cuda_max_allocated_mb'] = loglog_slope(
                xs, [q['memory']['cuda_max_allocated_mb'] for q in ok], args.fit_last)
        result['axes'][axis] = {'points': points, 'fitted_slopes': slopes,
                                'predicted': PREDICTED[axis]}
        pred = PREDICTED[axis]
        fitted = ', '.join(f"{part} {slopes[part]:.2f}" if slopes[part] is not None
                           else f"{part} n/a" for part in pred['parts'])
        print(f"  slope along {axis}: predicted {pred['slope']:g}; fitted {fitted}", flush=True)
        result['environment']['loadavg_end'] = list(__import__('os').getloadavg())
        write_json(result, Path(args.output))  # partial results survive interruption
    out = Path(args.output)
    write_json(result, out)
    plot(result, out.with_suffix('.png'))
    print(f'wrote {out} and {out.with_suffix(".png")}')
    return result


if __name__ == '__main__':
    main()
