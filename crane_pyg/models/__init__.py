r"""Recommendation models. Every model is a :class:`Recommender` with the
same interface (``from_data``, ``on_epoch_start``, ``loss``, ``embeddings``,
``score_all_items``); :data:`MODELS` maps config names to classes. The
mini-batch (sampled-subgraph) forms of CRANE and LightGCN sit beside them in
:mod:`crane_pyg.models.minibatch`, built from the models' public pieces."""
from typing import Dict, Type

from crane_pyg.models.base import Recommender
from crane_pyg.models.crane import CRANE
from crane_pyg.models.freedom import FREEDOM
from crane_pyg.models.lgmrec import LGMRec
from crane_pyg.models.lightgcn import LightGCN
from crane_pyg.models.mgcn import MGCN
from crane_pyg.models.minibatch import (MiniBatchCRANE, MiniBatchLightGCN,
                                        UserItemSubgraphSampler, minibatch_loss_module)
from crane_pyg.models.vbpr import VBPR

#: config name -> model class
MODELS: Dict[str, Type[Recommender]] = {
    'crane': CRANE,
    'lightgcn': LightGCN,
    'vbpr': VBPR,
    'freedom': FREEDOM,
    'mgcn': MGCN,
    'lgmrec': LGMRec,
}

__all__ = ['Recommender', 'CRANE', 'LightGCN', 'VBPR', 'FREEDOM', 'MGCN', 'LGMRec', 'MODELS',
           'MiniBatchCRANE', 'MiniBatchLightGCN', 'UserItemSubgraphSampler',
           'minibatch_loss_module']
