#!/usr/bin/env python
r"""Write a user subsample of an MMRec-format dataset, for tuning screens.

A seeded uniform sample of ``--fraction`` of the users keeps *all* of each
sampled user's interactions with their original split labels (``x_label``),
so every sampled user's train / valid / test history is exactly the one of the
full dataset. Items that none of the sampled users touched are dropped; the
remaining users and items are renumbered ``0..n-1`` in their original order
and the rows of every ``<modality>_feat.npy`` follow. The output is a normal
MMRec folder named after ``<output>`` (``<output>/<basename>.inter``,
``<modality>_feat.npy``) plus
``subsample.json`` (the source, fraction, seed, sizes and the original id of
every kept user and item).

The subsample is for choosing hyper-parameters cheaply, never for the
reported figures: its users are fewer, so its item graph and popularity
statistics differ from the full data's. Keep it outside the repository
(research data is read from ``../shared/data`` and never copied in)::

    python benchmarks/subsample_dataset.py ../shared/data/amazon-games \
        runs/data/amazon-games-u20 --fraction 0.2 --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HEADER = ('userID', 'itemID', 'rating', 'timestamp', 'x_label')


def subsample(source: Path, output: Path, fraction: float, seed: int) -> dict:
    source = source.resolve()
    name = source.name
    inter = source / f'{name}.inter'
    if not inter.is_file():
        raise SystemExit(f'{inter}: no such file (expected an MMRec folder <name>/<name>.inter)')
    lines = inter.read_text(encoding='utf-8').splitlines()
    header = tuple(lines[0].split('\t'))
    if header[:5] != HEADER:
        raise SystemExit(f'{inter}: line 1: header {header} is not {HEADER}')
    rows = [line.split('\t') for line in lines[1:] if line]
    users = np.array([int(r[0]) for r in rows])
    items = np.array([int(r[1]) for r in rows])
    num_users = int(users.max()) + 1
    rng = np.random.default_rng(seed)
    keep_users = np.sort(rng.choice(num_users, size=max(1, round(fraction * num_users)),
                                    replace=False))
    user_mask = np.isin(users, keep_users)
    keep_items = np.unique(items[user_mask])
    user_map = {int(u): i for i, u in enumerate(keep_users)}
    item_map = {int(v): i for i, v in enumerate(keep_items)}

    output.mkdir(parents=True, exist_ok=False)
    out_lines = ['\t'.join(header)]
    for row, kept in zip(rows, user_mask):
        if kept:
            out_lines.append('\t'.join([str(user_map[int(row[0])]), str(item_map[int(row[1])]),
                                        *row[2:]]))
    (output / f'{output.name}.inter').write_text('\n'.join(out_lines) + '\n', encoding='utf-8')
    modalities = []
    for feat in sorted(source.glob('*_feat.npy')):
        np.save(output / feat.name, np.load(feat)[keep_items])
        modalities.append(feat.name[:-len('_feat.npy')])
    labels = np.array([int(r[4]) for r, kept in zip(rows, user_mask) if kept])
    info = {'source': str(source), 'fraction': fraction, 'seed': seed,
            'users': int(keep_users.size), 'items': int(keep_items.size),
            'interactions': {split: int((labels == code).sum())
                             for code, split in enumerate(('train', 'valid', 'test'))},
            'modalities': modalities,
            'original_user_ids': keep_users.tolist(), 'original_item_ids': keep_items.tolist()}
    (output / 'subsample.json').write_text(json.dumps(info) + '\n', encoding='utf-8')
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('source', type=Path, help='MMRec dataset folder <name>/')
    parser.add_argument('output', type=Path, help='new folder (must not exist); its '
                        'basename is the new dataset name')
    parser.add_argument('--fraction', type=float, default=0.2,
                        help='fraction of users kept (default: 0.2)')
    parser.add_argument('--seed', type=int, default=0, help='sampling seed (default: 0)')
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f'--fraction must be in (0, 1], got {args.fraction}')
    info = subsample(args.source, args.output, args.fraction, args.seed)
    print(f"{args.output}: {info['users']} users, {info['items']} items, "
          f"interactions {info['interactions']}, modalities {info['modalities']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
