r"""CRANE, FREEDOM and LightGCN at the scale of Amazon Electronics: 192,403
users, 63,001 items, 1,689,188 interactions, 4096-d image and 384-d text
features (synthetic power-law interactions and Gaussian features built in
memory as a :class:`~torch_geometric.data.HeteroData`,
:func:`benchmarks.common.make_heterodata`).

Measures, in this process, with its peak resident set (``VmHWM``; CUDA: ``max_memory_allocated``)
as the peak memory:

1. the item-item kNN build (:func:`crane_pyg.transforms.knn_adjacency`,
   :math:`O(I^2 \sum_m d_m)`); with ``--knn-sample-items Q`` only the
   graph of ``Q`` items is built, and the time is extrapolated by
   :math:`(I / Q)^2` (labelled ``extrapolated``); the models then use a
   random kNN-shaped graph with the same ``k``
   (:func:`benchmarks.common.random_item_graph`); CRANE and FREEDOM get the
   same item graph;
2. **side by side** (``side_by_side``): one training epoch (batch
   ``--batch-size``, Adam, ``train.precision`` autocast as the Trainer runs
   it) of every model of ``--models`` in every precision of
   ``--precisions`` (each setting: ``<model>/<precision>``), in
   ``--rounds`` interleaved rounds (round ``r`` runs every setting once, then
   round ``r + 1``), so that a shared machine slows every setting alike. A
   setting's epoch is ``on_epoch_start`` plus the epoch's first batch draw
   (``epoch_start_s``, the per-epoch costs: edge pruning, the sampler's
   shuffle), then the steps. With ``--max-batches B`` each round times B
   steps after ``--warmup-batches`` untimed ones and the epoch is
   **extrapolated** as ``epoch_start_s + num_batches x`` the median step
   (labelled ``extrapolated``); without it every round runs the whole epoch
   (``time_s`` the median over rounds of the measured epochs). Each
   setting's ``ratio_to_freedom`` is its epoch time over FREEDOM's in
   float32. With ``--semantic-cache T``, ``crane-cache`` is CRANE's loss with
   ``train.semantic_cache = T`` (:mod:`crane_pyg.models.semantic_cache`; the
   model ``crane``'s weights): its cache refresh is timed apart
   (``refresh_s``) and its epoch adds ``ceil(num_batches / T)`` refreshes
   (the timed steps do not refresh). With ``--num-neighbors K1,K2``,
   ``crane-mb`` is CRANE's sampled-subgraph loss
   (:class:`~crane_pyg.models.MiniBatchCRANE`, ``train.num_neighbors``), with
   the cache too when ``--semantic-cache`` is given (the batch's items
   through RCA, every neighbour's code cached; refreshes counted as for
   ``crane-cache``). ``train_epoch`` repeats CRANE's entry in the first precision
   (the stage of earlier versions of this script);
3. one full-ranking evaluation of CRANE (first precision;
   :class:`~crane_pyg.metrics.FullRankingEvaluator`, validation split, all
   63,001 items ranked per user); with ``--max-eval-users V`` only V users'
   held-out items are kept and the time is extrapolated linearly in the
   number of evaluated users (labelled).

    python benchmarks/electronics_scale.py --max-batches 10 --rounds 2 \
        --precisions fp32,bf16 --knn-sample-items 8000 --max-eval-users 20000
                                        # extrapolated, ~15 minutes on 2 cores
    python benchmarks/electronics_scale.py  # the full epochs / evaluation / kNN
    python benchmarks/electronics_scale.py --quick   # tiny shape, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    environment, evaluate, make_heterodata, peak_memory_mb, random_item_graph, resolve_device,
    summarize, synchronize, write_json, RESULTS_DIR,
)

ELECTRONICS = {'users': 192403, 'items': 63001, 'interactions': 1689188,
               'feature_dims': {'image': 4096, 'text': 384}}
MODEL_NAMES = ('crane', 'freedom', 'lightgcn')
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
    parser.add_argument('--models', default='crane,freedom,lightgcn',
                        help='comma-separated, of crane, freedom, lightgcn (default: %(default)s)')
    parser.add_argument('--precisions', default='fp32',
                        help='comma-separated train.precision values, each model runs in '
                             'each (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='interleaved rounds of every setting (default: %(default)s)')
    parser.add_argument('--warmup-batches', type=int, default=1,
                        help='untimed steps per round before the timed ones, with '
                             '--max-batches (default: %(default)s)')
    parser.add_argument('--semantic-cache', type=int, default=None, metavar='T',
                        help='also time crane-cache: CRANE with train.semantic_cache=T (the '
                             'model crane\'s weights; needs crane in --models)')
    parser.add_argument('--num-neighbors', default=None, metavar='K1,K2',
                        help='also time crane-mb: CRANE\'s mini-batch loss with this '
                             'user-item fan-out per layer (-1: all), with the cache when '
                             '--semantic-cache is given (needs crane in --models)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s default)')
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
    from crane_pyg.train.precision import PRECISIONS
    if not names or set(names) - set(MODEL_NAMES):
        parser.error(f'--models: choose from {list(MODEL_NAMES)}, got {args.models!r}')
    if not precisions or set(precisions) - set(PRECISIONS):
        parser.error(f'--precisions: choose from {list(PRECISIONS)}, got {args.precisions!r}')
    if args.semantic_cache is not None:
        if 'crane' not in names or args.semantic_cache < 1:
            parser.error('--semantic-cache needs crane in --models and T >= 1')
        names.insert(names.index('crane') + 1, 'crane-cache')
    fanouts = None
    if args.num_neighbors is not None:
        try:
            fanouts = [int(k) for k in args.num_neighbors.split(',')]
        except ValueError:
            parser.error(f'--num-neighbors: comma-separated ints, got {args.num_neighbors!r}')
        if 'crane' not in names:
            parser.error('--num-neighbors needs crane in --models')
        names.insert(names.index('crane') + 1 + ('crane-cache' in names), 'crane-mb')
    if args.rounds < 1 or args.warmup_batches < 0:
        parser.error('--rounds must be >= 1 and --warmup-batches >= 0')

    import torch
    from crane_pyg.data import BPRSampler
    from crane_pyg.data.schema import USER_ITEM
    from crane_pyg.metrics import FullRankingEvaluator
    from crane_pyg.models import CRANE, FREEDOM, LightGCN
    from crane_pyg.train.precision import autocast, resolve_precision
    from crane_pyg.transforms import knn_adjacency

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the Trainer does (train.flush_denormal)
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
        brief = {k: v for k, v in extra.items() if not isinstance(v, (dict, list))}
        print(f'{name}: {t:.1f} s  {brief}  peak rss '
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

    # -- models -----------------------------------------------------------
    edge_index = data[USER_ITEM].edge_index
    builders = {
        'crane': lambda: CRANE(U, I, edge_index, features, ii_index, ii_weight,
                               embedding_dim=args.embedding_dim, knn_k=args.knn_k),
        'freedom': lambda: FREEDOM(U, I, edge_index, features, ii_index, ii_weight,
                                   embedding_dim=args.embedding_dim, knn_k=args.knn_k),
        'lightgcn': lambda: LightGCN(U, I, edge_index, embedding_dim=args.embedding_dim),
    }
    models, optimizers, built = {}, {}, {}
    t0 = time.perf_counter()
    for name in names:
        if name in ('crane-cache', 'crane-mb'):
            continue
        t1 = time.perf_counter()
        torch.manual_seed(args.seed)
        models[name] = builders[name]().to(device)
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-3)
        built[name] = {'seconds': time.perf_counter() - t1,
                       'parameters': sum(p.numel() for p in models[name].parameters()),
                       'peak_memory_after': peak_memory_mb(device)}
    stage_done('build_model', time.perf_counter() - t0,
               parameters=built[names[0]]['parameters'], models=built)
    losses = {name: models[name].loss for name in models}
    if args.semantic_cache is not None:
        from crane_pyg.models.semantic_cache import CachedSemanticCRANE
        models['crane-cache'], optimizers['crane-cache'] = models['crane'], optimizers['crane']
        losses['crane-cache'] = CachedSemanticCRANE(models['crane'], args.semantic_cache)
    if fanouts is not None:
        from crane_pyg.models import MiniBatchCRANE
        models['crane-mb'], optimizers['crane-mb'] = models['crane'], optimizers['crane']
        losses['crane-mb'] = MiniBatchCRANE(models['crane'], fanouts,
                                            semantic_cache=args.semantic_cache)
    refreshes: Dict[str, list] = {}

    # -- training epochs, side by side and interleaved ----------------------
    sampler = BPRSampler(edge_index, U, I, seed=args.seed, device=device)
    num_batches = sampler.num_batches(args.batch_size)
    full = args.max_batches is None or args.max_batches + args.warmup_batches >= num_batches
    timed = num_batches if full else args.max_batches
    warmup = 0 if full else args.warmup_batches
    settings = [(n, p) for p in precisions for n in names]
    used = {p: resolve_precision(p, device) for p in precisions}  # warns once on a fallback
    starts: Dict[str, list] = {f'{n}/{p}': [] for n, p in settings}
    steps: Dict[str, list] = {f'{n}/{p}': [] for n, p in settings}
    epochs: Dict[str, list] = {f'{n}/{p}': [] for n, p in settings}
    for rnd in range(args.rounds):
        for name, precision in settings:
            key = f'{name}/{precision}'
            model, opt = models[name], optimizers[name]
            model.train()
            synchronize(device)
            t0 = time.perf_counter()
            model.on_epoch_start(rnd)
            batches = iter(sampler.batches(rnd, args.batch_size))
            batch = next(batches)
            synchronize(device)
            starts[key].append(time.perf_counter() - t0)
            loss_fn = losses[name]
            cache = getattr(loss_fn, 'cache', None)  # crane-cache, crane-mb with the cache
            if cache is not None:  # the epoch's first refresh, timed apart
                loss_fn.on_epoch_start(rnd)
                t0 = time.perf_counter()
                with autocast(used[precision], device):
                    cache.refresh()
                synchronize(device)
                refreshes.setdefault(key, []).append(time.perf_counter() - t0)
            for k in range(warmup + timed):
                t1 = time.perf_counter()
                if k > 0:
                    batch = next(batches)
                users, pos, neg = (t.to(device) for t in batch)
                opt.zero_grad(set_to_none=True)
                if cache is not None:  # refreshes within the timed steps: none
                    cache.skip_next_refresh()
                with autocast(used[precision], device):
                    loss, _ = loss_fn(users, pos, neg)
                loss.backward()
                opt.step()
                synchronize(device)
                if k >= warmup:
                    steps[key].append(time.perf_counter() - t1)
            epochs[key].append(starts[key][-1] + sum(steps[key][-timed:])
                               + sum(refreshes.get(key, [0.0])[-1:]))
            print(f'round {rnd} {key:18s} epoch start {starts[key][-1]:.2f} s, '
                  f'median step {1000 * statistics.median(steps[key][-timed:]):.0f} ms',
                  flush=True)
    side: Dict[str, Any] = {}
    for name, precision in settings:
        key = f'{name}/{precision}'
        step = summarize(steps[key])
        start = statistics.median(starts[key])
        entry = {'model': name, 'precision': used[precision],
                 'requested_precision': precision, 'num_batches': num_batches,
                 'epoch_start_s': start, 'seconds_per_batch': step['median'],
                 'step_seconds': step, 'rounds': args.rounds, 'extrapolated': not full}
        extra_refresh = 0.0
        if key in refreshes:  # the cache: a refresh at the epoch start and every T steps
            refresh = statistics.median(refreshes[key])
            count = -(-num_batches // args.semantic_cache)  # ceil
            extra_refresh = count * refresh
            entry.update(refresh_s=refresh, refreshes_per_epoch=count,
                         refresh_every=args.semantic_cache)
        if full:
            entry.update(time_s=statistics.median(epochs[key]) + extra_refresh
                         - (refresh if key in refreshes else 0.0),
                         epoch_seconds=epochs[key],
                         method='measured epochs (epoch start + every step), median '
                                'over rounds')
        else:
            entry.update(time_s=start + num_batches * step['median'] + extra_refresh,
                         measured_batches=timed * args.rounds, warmup_batches=warmup,
                         measured_time_s=sum(starts[key]) + sum(steps[key]),
                         method='epoch_start_s + num_batches x the median timed step '
                                '(untimed warm-up steps first in each round)'
                                + (' + refreshes_per_epoch x refresh_s' if key in refreshes
                                   else ''))
        side[key] = entry
    reference = side.get(f'freedom/{precisions[0]}') if 'fp32' not in precisions \
        else side.get('freedom/fp32')
    for entry in side.values():
        entry['ratio_to_freedom'] = (entry['time_s'] / reference['time_s']
                                     if reference is not None else None)
    stage_done('side_by_side', sum(sum(v) for v in epochs.values()), settings=side,
               reference='freedom/fp32' if 'fp32' in precisions else f'freedom/{precisions[0]}')
    for key, entry in side.items():
        ratio = entry['ratio_to_freedom']
        print(f'{key:18s} epoch {entry["time_s"]:8.1f} s'
              + (' (extrapolated)' if entry['extrapolated'] else '')
              + (f', {ratio:.2f}x FREEDOM' if ratio is not None else ''), flush=True)
    if 'crane' in names:
        crane = dict(side[f'crane/{precisions[0]}'])
        stage_done('train_epoch', crane.pop('time_s'), **crane)
        model = models['crane']
    else:
        model = models[names[0]]

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
    metrics = evaluate(model, evaluator, after_embeddings=time_embeddings,
                       precision=used[precisions[0]])
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
