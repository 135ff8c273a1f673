r"""Peak memory of our Recursive Cross-Modal Attention (linear in the number
of nodes :math:`N`) against the all-items attention of the authors' code.

* ``rca``: :class:`crane_pyg.nn.RecursiveCrossModalAttention` (``M`` = 2
  modalities, ``d``, ``R`` recursions) forward + backward on ``[N, 2, d]``:
  :math:`O(R N M d)` memory.
* ``all_items``: ``nn.MultiheadAttention(d, heads)`` (``batch_first=False``)
  applied to the same ``[N, 2, d]`` tensor, as the authors' code does by
  accident: the sequence axis is then the *node* axis, so every node attends
  to every other and the attention weights are ``[2 heads, N, N]``:
  :math:`O(N^2)` memory. Points whose predicted weight tensors
  (:math:`3 \cdot 2 \cdot heads \cdot N^2 \cdot 4` bytes: scores, softmax,
  saved for backward) exceed ``--cap-gb`` are skipped and recorded as such.

Every point runs in a fresh subprocess; memory is the child's peak RSS minus
the RSS of an interpreter that only imported torch and crane_pyg (CUDA:
``max_memory_allocated``). Writes JSON + a log-log PNG with both curves and
their fitted slopes (over the largest 3 points).

    python benchmarks/attention_memory.py            # default sizes
    python benchmarks/attention_memory.py --rca-sizes 1e3 1e4 1e5 1e6 --cap-gb 8
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    make_parser, save_figure, baseline_rss_mb, environment, loglog_slope, measure_point,
    peak_memory_mb, reset_peak, resolve_device, synchronize, write_json, run_child_point,
)


def run_point(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from torch import nn
    from crane_pyg.nn import RecursiveCrossModalAttention
    device = resolve_device(p['device'])
    torch.manual_seed(p['seed'])
    N, d = p['N'], p['d']
    if p['kind'] == 'rca':
        module = RecursiveCrossModalAttention(2, d, num_recursions=p['R']).to(device)

        def forward(x):
            return module(x)
    else:
        module = nn.MultiheadAttention(d, p['heads']).to(device)  # batch_first=False

        def forward(x):
            return module(x, x, x)[0]
    x = torch.randn(N, 2, d, device=device, requires_grad=True)
    reset_peak(device)
    t0 = time.perf_counter()
    forward(x).sum().backward()
    synchronize(device)
    return {'time_s': time.perf_counter() - t0, 'memory': peak_memory_mb(device)}


def predicted_all_items_bytes(N: int, heads: int) -> int:
    return 3 * 2 * heads * N * N * 4


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind, label in (('rca', 'our RCA (O(N))'), ('all_items', 'all-items MHA (O(N^2))')):
        pts = [q for q in result['points'][kind] if q['status'] == 'ok']
        xs = [q['N'] for q in pts]
        ys = [q['memory_mb'] for q in pts]
        slope = result['fitted_slopes'][kind]
        ax.plot(xs, ys, marker='o',
                label=f"{label}, slope {slope:.2f}" if slope is not None else label)
    ax.axhline(result['config']['cap_gb'] * 1024, color='grey', ls=':', label='cap')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('nodes N')
    ax.set_ylabel('peak memory above baseline, MiB')
    ax.set_title(f"forward + backward, d={result['config']['d']}, "
                 f"{result['environment']['device']}", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> Dict[str, Any]:
    parser = make_parser(__doc__, 'attention_memory.json')
    parser.add_argument('--rca-sizes', type=float, nargs='+',
                        default=[1e3, 4e3, 1.6e4, 6.4e4, 2.56e5, 1e6])
    parser.add_argument('--all-items-sizes', type=float, nargs='+',
                        default=[1e3, 2e3, 4e3, 8e3, 1.6e4, 3.2e4])
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--recursions', type=int, default=2)
    parser.add_argument('--heads', type=int, default=1)
    parser.add_argument('--cap-gb', type=float, default=6.0,
                        help='skip all-items points predicted above this')
    args = parser.parse_args(argv)
    if run_child_point(args, run_point):
        return {}
    device = resolve_device(args.device)
    rca_sizes = [200, 400] if args.quick else [int(n) for n in args.rca_sizes]
    mha_sizes = [200, 400] if args.quick else [int(n) for n in args.all_items_sizes]
    dim = 16 if args.quick else args.dim
    base = 0.0 if args.in_process else baseline_rss_mb()
    result: Dict[str, Any] = {
        'benchmark': 'attention_memory', 'environment': environment(device),
        'baseline_rss_mb': base,
        'config': {'d': dim, 'num_modalities': 2, 'R': args.recursions, 'heads': args.heads,
                   'cap_gb': args.cap_gb, 'rca_sizes': rca_sizes,
                   'all_items_sizes': mha_sizes,
                   'memory': 'peak RSS of a fresh subprocess minus baseline_rss_mb '
                             '(CUDA: max_memory_allocated)'},
        'points': {'rca': [], 'all_items': []},
    }
    script = Path(__file__).resolve()
    for kind, sizes in (('rca', rca_sizes), ('all_items', mha_sizes)):
        for N in sizes:
            p = {'device': str(device), 'kind': kind, 'N': N, 'd': dim, 'R': args.recursions,
                 'heads': args.heads, 'seed': args.seed}
            pred = predicted_all_items_bytes(N, args.heads) / 2 ** 30
            if kind == 'all_items' and pred > args.cap_gb:
                out = {'status': 'skipped',
                       'error': f'predicted {pred:.1f} GiB > cap {args.cap_gb} GiB'}
            else:
                out = measure_point(script, run_point, p, args.in_process, timeout=args.timeout)
            out.update(N=N, params=p)
            if out['status'] == 'ok':
                mem = out['memory']
                out['memory_mb'] = (mem['cuda_max_allocated_mb'] if 'cuda_max_allocated_mb'
                                    in mem else mem['peak_rss_mb'] - base)
            result['points'][kind].append(out)
            msg = (f"{out['memory_mb']:9.1f} MiB  {out['time_s']:.2f} s"
                   if out['status'] == 'ok' else f"{out['status']}: {out.get('error')}")
            print(f"[{kind:>9} N={N:>8}] {msg}", flush=True)
    result['fitted_slopes'] = {}
    for kind in ('rca', 'all_items'):
        pts = [q for q in result['points'][kind] if q['status'] == 'ok']
        result['fitted_slopes'][kind] = loglog_slope([q['N'] for q in pts],
                                                     [q['memory_mb'] for q in pts], 3)
    result['predicted_slopes'] = {'rca': 1.0, 'all_items': 2.0}
    result['environment']['loadavg_end'] = list(__import__('os').getloadavg())
    out = Path(args.output)
    write_json(result, out)
    plot(result, out.with_suffix('.png'))
    print(f"fitted slopes: {result['fitted_slopes']} (predicted rca 1, all_items 2)")
    print(f'wrote {out} and {out.with_suffix(".png")}')
    return result


if __name__ == '__main__':
    main()
