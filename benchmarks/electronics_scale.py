r"""CRANE at the scale of Amazon Electronics: 192,403 users, 63,001 items,
1,689,188 interactions, 4096-d image and 384-d text features (synthetic
power-law interactions and Gaussian features built in memory as a
:class:`~torch_geometric.data.HeteroData`, :func:`benchmarks.common.make_heterodata`).

Measures, in this process, with its peak resident set (``VmHWM``; CUDA: ``max_memory_allocated``)
as the peak memory:

1. the item-item kNN build (:func:`crane_pyg.transforms.knn_adjacency`,
   :math:`O(I^2 \sum_m d_m)`); with ``--knn-sample-items Q`` only the
   graph of ``Q`` items is built, and the time is extrapolated by
   :math:`(I / Q)^2` (labelled ``extrapolated``); the model then uses a
   random kNN-shaped graph with the same ``k``
   (:func:`benchmarks.common.random_item_graph`);
2. one CRANE training epoch (batch ``--batch-size``, Adam); with
   ``--max-batches B`` only the first B batches are timed and the epoch time
   is extrapolated linearly (labelled);
3. one full-ranking evaluation (:class:`~crane_pyg.metrics.FullRankingEvaluator`,
   validation split, all 63,001 items ranked per user); with
   ``--max-eval-users V`` only V users' held-out items are kept and the time
   is extrapolated linearly in the number of evaluated users (labelled).

    python benchmarks/electronics_scale.py --max-batches 20 --knn-sample-items 8000 \
        --max-eval-users 20000          # extrapolated, some minutes on 2 cores
    python benchmarks/electronics_scale.py  # the full epoch / evaluation / kNN
    python benchmarks/electronics_scale.py --quick   # tiny shape, seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment, evaluate, make_heterodata, peak_memory_mb, random_item_graph, resolve_device,
    synchronize, train_epoch, write_json, RESULTS_DIR,
)

ELECTRONICS = {'users': 192403, 'items': 63001, 'interactions': 1689188,
               'feature_dims': {'image': 4096, 'text': 384}}
QUICK = {'users': 600, 'items': 300, 'interactions': 6000,
         'feature_dims': {'image': 64, 'text': 16}}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=('cpu', 'cuda', 'auto'), default='auto')
    parser.add_argument('--output', default=str(RESULTS_DIR / 'electronics_scale.json'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quick', action='store_true', help='tiny shape (smoke test)')
    parser.add_argument('--batch-size', type=int, default=2048)
    parser.add_argument('--max-batches', type=int, default=None,
                        help='time only this many batches and extrapolate the epoch')
    parser.add_argument('--knn-k', type=int, default=10)
    parser.add_argument('--knn-sample-items', type=int, default=None,
                        help='build the kNN graph of this many items and extrapolate')
    parser.add_argument('--max-eval-users', type=int, default=None,
                        help='evaluate only this many users and extrapolate')
    parser.add_argument('--embedding-dim', type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from crane_pyg.data import BPRSampler
    from crane_pyg.data.schema import USER_ITEM
    from crane_pyg.metrics import FullRankingEvaluator
    from crane_pyg.models import CRANE
    from crane_pyg.transforms import knn_adjacency

    device = resolve_device(args.device)
    shape = QUICK if args.quick else ELECTRONICS
    U, I = shape['users'], shape['items']
    result: Dict[str, Any] = {'benchmark': 'electronics_scale', 'environment': environment(device),
                              'shape': shape, 'config': vars(args).copy(), 'stages': {}}
    stages = result['stages']
    out_path = Path(args.output)

    def stage_done(name: str, t: float, **extra: Any) -> None:
        stages[name] = dict({'time_s': t, 'memory_after': peak_memory_mb(device),
                             'loadavg': list(os.getloadavg())}, **extra)
        write_json(result, out_path)
        print(f'{name}: {t:.1f} s  {extra}  peak rss '
              f'{stages[name]["memory_after"]["peak_rss_mb"]:.0f} MiB', flush=True)

    # -- data -------------------------------------------------------------
    t0 = time.perf_counter()
    data = make_heterodata(U, I, shape['interactions'], shape['feature_dims'], seed=args.seed)
    stage_done('build_data', time.perf_counter() - t0,
               interactions_unique=int(data[USER_ITEM].edge_index.size(1)
                                       + data[USER_ITEM].val_edge_index.size(1)
                                       + data[USER_ITEM].test_edge_index.size(1)),
               train_interactions=int(data[USER_ITEM].edge_index.size(1)))
    features = {m: data['item'][m].to(device) for m in data.modalities}

    # -- kNN build --------------------------------------------------------
    Q = min(args.knn_sample_items or I, I)
    feats = [x[:Q] for x in features.values()]
    synchronize(device)
    t0 = time.perf_counter()
    knn_index, knn_weight = knn_adjacency(feats, args.knn_k)
    synchronize(device)
    t_knn = time.perf_counter() - t0
    if Q < I:
        stage_done('knn_build', t_knn * (I / Q) ** 2, extrapolated=True,
                   measured_items=Q, measured_time_s=t_knn,
                   method='time of knn_adjacency on Q items x (I / Q)^2')
        ii_index, ii_weight = random_item_graph(I, args.knn_k, seed=args.seed)
    else:
        stage_done('knn_build', t_knn, extrapolated=False, nnz=int(knn_index.size(1)))
        ii_index, ii_weight = knn_index, knn_weight
    del knn_index, knn_weight, feats

    # -- model ------------------------------------------------------------
    t0 = time.perf_counter()
    edge_index = data[USER_ITEM].edge_index
    model = CRANE(U, I, edge_index, features, ii_index, ii_weight,
                  embedding_dim=args.embedding_dim, knn_k=args.knn_k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stage_done('build_model', time.perf_counter() - t0,
               parameters=sum(p.numel() for p in model.parameters()))

    # -- one training epoch ----------------------------------------------
    sampler = BPRSampler(edge_index, U, I, seed=args.seed, device=device)
    num_batches = sampler.num_batches(args.batch_size)
    limit = min(args.max_batches or num_batches, num_batches)
    epoch = train_epoch(model, opt, sampler, 0, args.batch_size, device, max_batches=limit)
    t_train, done = epoch['seconds'], epoch['batches']
    if done < num_batches:
        stage_done('train_epoch', t_train * num_batches / done, extrapolated=True,
                   measured_batches=done, num_batches=num_batches, measured_time_s=t_train,
                   seconds_per_batch=t_train / done,
                   method='measured batches (incl. the epoch sampling) x num_batches / measured')
    else:
        stage_done('train_epoch', t_train, extrapolated=False, num_batches=num_batches,
                   seconds_per_batch=t_train / num_batches)

    # -- one full-ranking evaluation -------------------------------------
    model.eval()
    store = data[USER_ITEM]
    evaluator = FullRankingEvaluator(data, 'valid', batch_size=1024, device=device)
    full_users = evaluator.num_users  # the users a full evaluation ranks for
    if args.max_eval_users:
        keep = store.val_edge_index[0] < args.max_eval_users
        store.val_edge_index = store.val_edge_index[:, keep]
        evaluator = FullRankingEvaluator(data, 'valid', batch_size=1024, device=device)
    embeddings_done = []

    def time_embeddings() -> None:
        synchronize(device)
        embeddings_done.append(time.perf_counter())

    synchronize(device)
    t0 = time.perf_counter()
    metrics = evaluate(model, evaluator, after_embeddings=time_embeddings)
    synchronize(device)
    t_eval = time.perf_counter() - t0
    t_emb = embeddings_done[0] - t0
    if evaluator.num_users < full_users:
        stage_done('evaluation', t_emb + (t_eval - t_emb) * full_users / evaluator.num_users,
                   extrapolated=True, measured_users=evaluator.num_users,
                   evaluated_users_full=full_users, measured_time_s=t_eval,
                   embeddings_time_s=t_emb,
                   method='embeddings + ranking time x full users / measured users',
                   recall_at_20=metrics.get('recall@20'))
    else:
        stage_done('evaluation', t_eval, extrapolated=False, evaluated_users=evaluator.num_users,
                   embeddings_time_s=t_emb, recall_at_20=metrics.get('recall@20'))

    result['peak_memory'] = peak_memory_mb(device)
    result['within_24_gb'] = result['peak_memory']['peak_rss_mb'] < 24 * 1024
    result['environment']['loadavg_end'] = list(os.getloadavg())
    write_json(result, out_path)
    print(f"peak memory {result['peak_memory']}; wrote {out_path}")
    return result


if __name__ == '__main__':
    main()
