#!/usr/bin/env python
r"""What does CRANE's content view add to a trained model?

For each finished CRANE run directory (``config.yaml`` + ``best.pt``) this
scores the validation split three ways (:meth:`crane_pyg.models.CRANE.view_embeddings`):

* ``full``: the fused score the model ranks with;
* ``behavioural``: the ID view alone (the content view removed);
* ``semantic``: the content view alone;

and reports Recall/NDCG@20 of each, the mean overlap of the full and the
ID-only top-20 lists (1.0: the content view changes no ranking), the fraction
of users whose top-20 changes, and the mean norms of the two views. Output:
``content_diagnosis.json`` beside the first run (or ``--output``) and a
table on stdout. Validation only: it is a diagnosis for choosing options,
not a reported test figure::

    python benchmarks/content_diagnosis.py runs/tiktok-crane-seed999
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from crane_pyg.metrics import FullRankingEvaluator  # noqa: E402
from crane_pyg.models.crane import CRANE, VIEWS  # noqa: E402
from crane_pyg.train.runs import load_trained_run, per_user_metrics  # noqa: E402
from crane_pyg.train.utils import atomic_write_json  # noqa: E402

K = 20


@torch.no_grad()
def top_k_overlap(model: CRANE, evaluator: FullRankingEvaluator, a: tuple, b: tuple,
                  k: int = K) -> dict[str, float]:
    r"""Mean :math:`|T_a(u) \cap T_b(u)| / k` of the masked top-``k`` lists of
    two embedding pairs over the users of :obj:`evaluator`, and the fraction
    of users whose list differs."""
    top_a = evaluator.recommend(lambda u: model.score_all_items(u, a), evaluator.users, k)
    top_b = evaluator.recommend(lambda u: model.score_all_items(u, b), evaluator.users, k)
    same = (top_a.unsqueeze(-1) == top_b.unsqueeze(-2)).any(-1).sum(-1).float() / k
    return {'mean_overlap': float(same.mean()), 'changed_fraction': float((same < 1).float().mean())}


@torch.no_grad()
def diagnose(run_dir: Path) -> dict[str, Any]:
    config, data, model = load_trained_run(run_dir)
    if not isinstance(model, CRANE):
        raise SystemExit(f'{run_dir}: model {config.model_name!r} is not CRANE')
    views = {view: model.view_embeddings(view) for view in VIEWS}
    result: dict[str, Any] = {'run': str(run_dir), 'model_options': config.model_options}
    evaluator = FullRankingEvaluator(data, split='valid', ks=(K, ))  # one for every view
    for view, emb in views.items():
        values = per_user_metrics(model, data, 'valid', (K, ), embeddings=emb,
                                  evaluator=evaluator)
        result[view] = {name: float(values[name].double().mean())
                        for name in (f'recall@{K}', f'ndcg@{K}')}
    result['top20_full_vs_behavioural'] = top_k_overlap(model, evaluator, views['full'],
                                                        views['behavioural'])
    e_user, e_item = views['behavioural']
    h_user, h_item = views['semantic']
    result['norms'] = {'behavioural_user': float(e_user.norm(dim=-1).mean()),
                       'behavioural_item': float(e_item.norm(dim=-1).mean()),
                       'semantic_user': float(h_user.norm(dim=-1).mean()),
                       'semantic_item': float(h_item.norm(dim=-1).mean())}
    return result


def to_table(results: Sequence[dict[str, Any]]) -> str:
    lines = [f'| run | full R@{K} | ID only R@{K} | content only R@{K} | full N@{K} | '
             f'ID only N@{K} | content only N@{K} | top-{K} overlap full/ID | users changed | '
             '|ID| item | |content| item |', '|' + '---|' * 11]
    for r in results:
        cells = [Path(r['run']).name]
        cells += [f"{r[v][f'recall@{K}']:.4f}" for v in VIEWS]
        cells += [f"{r[v][f'ndcg@{K}']:.4f}" for v in VIEWS]
        o = r['top20_full_vs_behavioural']
        cells += [f"{o['mean_overlap']:.3f}", f"{o['changed_fraction']:.3f}",
                  f"{r['norms']['behavioural_item']:.3f}", f"{r['norms']['semantic_item']:.3f}"]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', type=Path, help='CRANE run directories')
    parser.add_argument('--output', type=Path, help='JSON file (default: '
                        '<first run>/content_diagnosis.json)')
    args = parser.parse_args(argv)
    results = [diagnose(run) for run in args.runs]
    atomic_write_json(args.output or args.runs[0] / 'content_diagnosis.json', results)
    print(to_table(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
