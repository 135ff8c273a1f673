#!/usr/bin/env python
r"""Train CRANE (or LightGCN, VBPR, FREEDOM, MGCN, LGMRec) on an MMRec-format
dataset.

Without arguments it trains CRANE on the embedded synthetic dataset (a few
minutes on two CPU cores) and prints the validation and test metrics::

    python examples/train_amazon.py

On the Amazon sets published by MMRec (https://github.com/enoche/MMRec, data
folder), e.g. ``./data/baby/{baby.inter,image_feat.npy,text_feat.npy}``::

    python examples/train_amazon.py --dataset baby --data-root ./data
    python examples/train_amazon.py --dataset baby --model freedom --seed 1
    python examples/train_amazon.py --dataset baby --model lgmrec
    python examples/train_amazon.py --dataset baby --set model.lambda_cl=0.05 \
        --set train.lr=5e-4
    python examples/train_amazon.py --dataset baby --resume   # continue a run

Outputs go to ``runs/<dataset>-<model>-seed<seed>-<hash>/`` (``--output``;
``hash`` identifies the resolved configuration): ``results.json``,
``history.jsonl``, ``curves.png``, ``config.yaml``, ``last.pt`` and
``best.pt``; a directory holding a run is refused without ``--resume`` or
``--overwrite``, and one in use by another run is refused. A ``grid:`` mapping in a ``--config`` file
trains every point and picks the best by validation Recall@20. All the logic
lives in :mod:`crane_pyg.train`; see ``--help``.
"""
import sys
from pathlib import Path

try:
    import crane_pyg  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crane_pyg.train import main

if __name__ == '__main__':
    sys.exit(main(prog='train_amazon.py'))
