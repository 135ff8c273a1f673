r"""Sparse backends of :class:`crane_pyg.nn.UserItemConv`: forward + backward
time and peak memory of one LightGCN propagation step (both directions,
:math:`\hat{\mathbf{R}}\mathbf{X}_I` and :math:`\hat{\mathbf{R}}^\top
\mathbf{X}_U`, gradients w.r.t. both inputs) on power-law graphs of several
sizes, for every name of :func:`crane_pyg.nn.available_backends`.

The adjacency is built once (``cached=True``, as CRANE uses the layer) and
excluded from the timing. Two references time PyG's own dispatch of the same
step, PyG's :class:`~torch_geometric.nn.conv.LGConv` (``normalize=False``) on
the homogeneous :math:`(U + I)`-node graph with the normalised adjacency
built once: ``pyg_spmm`` with a ``torch.sparse`` CSR ``adj_t`` (PyG's
``spmm``), ``pyg_edge_index`` with an :class:`~torch_geometric.EdgeIndex`
sorted by target and the weights (``--backends`` selects among all). Every (backend, size) point runs in a fresh
subprocess (peak resident set, ``VmHWM``; CUDA: ``max_memory_allocated``) unless
``--in-process``. Writes JSON + PNG and which backend is fastest per size.

    python benchmarks/backends.py                 # default sizes, a few minutes
    python benchmarks/backends.py --quick
    python benchmarks/backends.py --edges 1e5 1e6 --dim 64
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    make_parser, save_figure, baseline_rss_mb, environment, loglog_slope, measure_point,
    peak_memory_mb, power_law_graph, reset_peak, resolve_device, time_fn, write_json,
    run_child_point,
)


#: PyG's own dispatch of the same product, for reference
PYG_REFERENCES = ('pyg_spmm', 'pyg_edge_index')


def _pyg_step(p: Dict[str, Any], edge_index, x_user, x_item, g_user, g_item):
    r"""One step of PyG's LGConv on the homogeneous graph, normalisation cached."""
    import torch
    from torch_geometric import EdgeIndex
    from torch_geometric.nn import LGConv

    from crane_pyg.nn import gcn_norm_bipartite
    U, I = x_user.size(0), x_item.size(0)
    w = gcn_norm_bipartite(edge_index, U, I)
    item = edge_index[1] + U
    index = torch.stack([torch.cat([edge_index[0], item]), torch.cat([item, edge_index[0]])])
    weight = torch.cat([w, w])
    if p['backend'] == 'pyg_spmm':
        graph, weight = torch.sparse_coo_tensor(index.flip(0), weight, (U + I, U + I)) \
            .coalesce().to_sparse_csr(), None
    else:
        graph, perm = EdgeIndex(index, sparse_size=(U + I, U + I)).sort_by('col')
        weight = weight[perm]
    conv = LGConv(normalize=False)

    def step():
        x_user.grad = x_item.grad = None
        out = conv(torch.cat([x_user, x_item]), graph, weight)
        ((out[:U] * g_user).sum() + (out[U:] * g_item).sum()).backward()
    return step


def run_point(p: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from crane_pyg.nn import UserItemConv
    device = resolve_device(p['device'])
    E = p['E']
    U, I = max(2, E // p['density']), max(2, E // (2 * p['density']))
    edge_index = torch.from_numpy(power_law_graph(U, I, E, p['seed'])).to(device)
    g = torch.Generator().manual_seed(p['seed'])
    x_user = torch.randn(U, p['d'], generator=g).to(device).requires_grad_()
    x_item = torch.randn(I, p['d'], generator=g).to(device).requires_grad_()
    g_user = torch.randn(U, p['d'], generator=g).to(device)
    g_item = torch.randn(I, p['d'], generator=g).to(device)
    if p['backend'] in PYG_REFERENCES:
        step = _pyg_step(p, edge_index, x_user, x_item, g_user, g_item)
        reset_peak(device)
    else:
        conv = UserItemConv(cached=True, backend=p['backend']).to(device)
        conv.adjacency(edge_index, U, I)  # build the cached adjacency (and its transpose)
        reset_peak(device)

        def step():  # both directions, as LayerCombination runs them
            x_user.grad = x_item.grad = None
            adj = conv.adjacency(edge_index, U, I)  # [I, U], from the cache
            out_user, out_item = conv((x_item, x_user), adj.t()), conv((x_user, x_item), adj)
            ((out_user * g_user).sum() + (out_item * g_item).sum()).backward()

    timing = time_fn(step, device, repeats=p['repeats'])
    return {'U': U, 'I': I, 'E': int(edge_index.size(1)), 'time': timing,
            'memory': peak_memory_mb(device)}


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    base = result['baseline_rss_mb']
    for backend, points in result['backends'].items():
        ok = [q for q in points if q['status'] == 'ok']
        xs = [q['E'] for q in ok]
        ax_t.errorbar(xs, [q['time']['median'] for q in ok],
                      yerr=[[q['time']['median'] - q['time']['min'] for q in ok],
                            [q['time']['max'] - q['time']['median'] for q in ok]],
                      marker='o', capsize=3, label=backend)
        key = 'cuda_max_allocated_mb' if result['environment']['device'].startswith('cuda') \
            else 'peak_rss_mb'
        ax_m.plot(xs, [q['memory'][key] - (0 if key != 'peak_rss_mb' else base) for q in ok],
                  marker='o', label=backend)
    for ax, ylabel in ((ax_t, 'forward + backward, s (median, min-max)'),
                       (ax_m, 'peak memory above baseline, MiB')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('interactions E')
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"UserItemConv backends, d={result['config']['d']}, "
                 f"{result['environment']['device']} (loadavg "
                 f"{result['environment']['loadavg'][0]:.1f})", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> Dict[str, Any]:
    parser = make_parser(__doc__, 'backends.json')
    parser.add_argument('--edges', type=float, nargs='+', default=[5e4, 2e5, 8e5],
                        help='interaction counts E')
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--density', type=int, default=10,
                        help='U = E / density, I = E / (2 density)')
    parser.add_argument('--backends', nargs='+', default=None,
                        help='subset of crane_pyg.nn.available_backends() and '
                             f'{list(PYG_REFERENCES)}')
    args = parser.parse_args(argv)
    if run_child_point(args, run_point):
        return {}
    from crane_pyg.nn import available_backends
    device = resolve_device(args.device)
    backends = args.backends or available_backends() + list(PYG_REFERENCES)
    edges = [2000, 8000] if args.quick else [int(e) for e in args.edges]
    dim = 16 if args.quick else args.dim
    result: Dict[str, Any] = {
        'benchmark': 'backends', 'environment': environment(device),
        'baseline_rss_mb': 0.0 if args.in_process else baseline_rss_mb(),
        'config': {'edges': edges, 'd': dim, 'density': args.density,
                   'repeats': args.repeats, 'available_backends': available_backends(),
                   'measured': 'UserItemConv forward (both directions) + backward, '
                               'cached adjacency, median of repeats after 1 warm-up'},
        'backends': {},
    }
    script = Path(__file__).resolve()
    for backend in backends:
        points = []
        for E in edges:
            p = {'device': str(device), 'backend': backend, 'E': E, 'd': dim,
                 'density': args.density, 'seed': args.seed, 'repeats': args.repeats}
            t0 = time.time()
            out = measure_point(script, run_point, p, args.in_process, timeout=args.timeout)
            out.update(E_requested=E, params=p)
            out.setdefault('E', E)
            points.append(out)
            msg = (f"{out['time']['median'] * 1e3:9.2f} ms (spread {out['time']['spread']:.2f})"
                   f"  rss {out['memory']['peak_rss_mb']:7.0f} MiB"
                   if out['status'] == 'ok' else f"FAILED: {out.get('error')}")
            print(f"[{backend:>14} E={E:>9}] {msg}  ({time.time() - t0:.0f} s)", flush=True)
        result['backends'][backend] = points

    fastest: Dict[str, Any] = {}
    for i, E in enumerate(edges):
        times = {b: pts[i]['time']['median'] for b, pts in result['backends'].items()
                 if pts[i]['status'] == 'ok'}
        if times:
            best = min(times, key=times.get)
            fastest[str(E)] = {'backend': best, 'median_s': times[best],
                               'ratio_to_best': {b: t / times[best] for b, t in times.items()}}
    result['fastest'] = fastest
    result['slopes_vs_E'] = {
        b: loglog_slope([q['E'] for q in pts if q['status'] == 'ok'],
                        [q['time']['median'] for q in pts if q['status'] == 'ok'], None)
        for b, pts in result['backends'].items()}
    result['environment']['loadavg_end'] = list(__import__('os').getloadavg())
    out = Path(args.output)
    write_json(result, out)
    plot(result, out.with_suffix('.png'))
    for E, f in fastest.items():
        print(f"fastest at E={E}: {f['backend']} ({f['median_s'] * 1e3:.2f} ms)")
    print(f'wrote {out} and {out.with_suffix(".png")}')
    return result


if __name__ == '__main__':
    main()
