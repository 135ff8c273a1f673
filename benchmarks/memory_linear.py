#!/usr/bin/env python
"""Peak memory of one CRANE forward + backward as the graph grows.

The claim under test (DESIGN.md section 3): memory is linear in the number of
nodes, O((U + I) M d + E + k I). For each size (users = items = N, E = 5 N
interactions, two small modalities, a kNN-shaped item graph with k = 10,
d = 64) a fresh subprocess builds CRANE, runs ``model.loss`` on one batch of
2048 triples plus ``backward()``, and reports its peak resident set. The
largest default point is 200,000 users and 200,000 items.

    python benchmarks/memory_linear.py                 # N = 25k, 50k, 100k, 200k
    python benchmarks/memory_linear.py --sizes 1000 2000 --output /tmp/m.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR, baseline_rss_mb, environment, loglog_slope, make_heterodata,
    measure_point, peak_memory_mb, random_item_graph, resolve_device, write_json,
)

SCRIPT = Path(__file__).resolve()
FEATURES = {'image': 64, 'text': 32}


def run_point(point: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from crane_pyg.data import BPRSampler, USER_ITEM
    from crane_pyg.models import CRANE

    torch.manual_seed(0)
    device = resolve_device(point['device'])
    n = point['N']
    data = make_heterodata(n, n, 5 * n, FEATURES, seed=0)
    features = {m: data['item'][m].to(device) for m in FEATURES}
    ii_index, ii_weight = random_item_graph(n, 10, seed=0)
    edge_index = data[USER_ITEM].edge_index.to(device)
    model = CRANE(n, n, edge_index, features, ii_index.to(device), ii_weight.to(device),
                  embedding_dim=point['d']).to(device)
    users, pos, neg = next(iter(BPRSampler(edge_index, n, n, seed=0).batches(0, 2048)))
    t0 = time.perf_counter()
    loss, _ = model.loss(users, pos, neg)
    loss.backward()
    seconds = time.perf_counter() - t0
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
    return {'N': n, 'E_train': int(edge_index.size(1)), 'step_seconds': seconds,
            'loss': float(loss), 'finite_gradients': bool(grads_ok),
            **peak_memory_mb(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[25000, 50000, 100000, 200000])
    parser.add_argument('--d', type=int, default=64)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda', 'auto'])
    parser.add_argument('--output', type=Path, default=RESULTS_DIR / 'memory_linear.json')
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    points = []
    for n in args.sizes:
        res = measure_point(SCRIPT, run_point, {'N': n, 'd': args.d, 'device': args.device})
        points.append(res)
        if res.get('status') != 'ok':
            raise SystemExit(f'N = {n}: {res}')
        print(f"N = {n:>7} users and items: peak RSS {res['peak_rss_mb']:.0f} MiB, "
              f"forward + backward {res['step_seconds']:.2f} s", flush=True)
    key = 'cuda_max_allocated_mb' if device.type == 'cuda' else 'peak_rss_mb'
    base = baseline_rss_mb() if device.type == 'cpu' else 0.0
    above = [max(p[key] - base, 1e-3) for p in points]
    result = {'benchmark': 'memory_linear', 'environment': environment(device),
              'features': FEATURES, 'baseline_rss_mb': base, 'points': points,
              'memory_key': key,
              'slope_memory_above_baseline_vs_N': loglog_slope(args.sizes, above),
              'predicted_slope': 1.0}
    write_json(result, args.output)
    print(f"log-log slope of peak memory (above baseline) vs N: "
          f"{result['slope_memory_above_baseline_vs_N']:.2f} (predicted 1)")
    return 0


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--_point':
        import json
        print(json.dumps(run_point(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
