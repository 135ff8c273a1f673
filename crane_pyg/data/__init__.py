r"""The data layer: MMRec files -> :class:`~torch_geometric.data.HeteroData`,
a synthetic dataset generator and the BPR triple sampler."""
from .errors import DataFormatError
from .schema import ITEM, ITEM_ITEM, ITEM_USER, USER, USER_ITEM
from .mmrec import load_mmrec
from .dataset import MMRecDataset
from .synthetic import load_synthetic, make_synthetic
from .sampler import BPRSampler

__all__ = [
    'load_mmrec',
    'MMRecDataset',
    'make_synthetic',
    'load_synthetic',
    'BPRSampler',
    'DataFormatError',
    'USER',
    'ITEM',
    'USER_ITEM',
    'ITEM_USER',
    'ITEM_ITEM',
]
