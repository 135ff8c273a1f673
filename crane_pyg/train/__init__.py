r"""Training: configuration (layered YAML), the MMRec-protocol trainer with
atomic checkpoints and exact resume, grid search selected on validation, and
the command line of ``examples/train_amazon.py``; data-parallel training
(:mod:`~crane_pyg.train.distributed`) and sampled-subgraph mini-batches
(:mod:`~crane_pyg.models.minibatch`)."""
from .checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from .config import (CONFIG_DIR, ConfigError, DataConfig, ExperimentConfig, TrainConfig,
                     expand_grid, load_config)
from .distributed import (DistributedContext, destroy_distributed, evaluate_sharded,
                          init_distributed)
# the mini-batch forms live beside their models; re-exported here, where they are used
from crane_pyg.models.minibatch import (MiniBatchCRANE, MiniBatchLightGCN,
                                        UserItemSubgraphSampler, minibatch_loss_module)
from crane_pyg.models.semantic_cache import CachedSemanticCRANE
from .trainer import (DatasetNotFoundError, Trainer, build_parser, format_metrics_table,
                      load_dataset, main, plot_curves, run_experiment, run_grid, run_single)

__all__ = [
    'TrainConfig',
    'DataConfig',
    'ExperimentConfig',
    'ConfigError',
    'CONFIG_DIR',
    'load_config',
    'expand_grid',
    'Trainer',
    'run_experiment',
    'run_single',
    'run_grid',
    'load_dataset',
    'DatasetNotFoundError',
    'plot_curves',
    'format_metrics_table',
    'build_parser',
    'main',
    'save_checkpoint',
    'load_checkpoint',
    'CheckpointError',
    'LAST',
    'BEST',
    'DistributedContext',
    'init_distributed',
    'destroy_distributed',
    'evaluate_sharded',
    'MiniBatchLightGCN',
    'MiniBatchCRANE',
    'minibatch_loss_module',
    'UserItemSubgraphSampler',
    'CachedSemanticCRANE',
]
