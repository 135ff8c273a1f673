r"""Reusable layers of crane_pyg: sparse backends, propagation layers, user
profiles, Recursive Cross-Modal Attention and losses. Every layer works on
plain tensors and ``edge_index`` (no crane_pyg data object needed)."""
from crane_pyg.nn.backend import (
    BACKEND_ENV_VAR,
    BACKEND_PREFERENCE,
    Adjacency,
    available_backends,
    gcn_norm_bipartite,
    resolve_backend,
    sym_norm,
)
from crane_pyg.nn.conv import ItemItemConv, LayerCombination, UserItemConv
from crane_pyg.nn.loss import BPRLoss, EmbeddingL2, InfoNCE
from crane_pyg.nn.profile import UserProfileAggregation
from crane_pyg.nn.rca import CrossModalAttentionBlock, RecursiveCrossModalAttention

__all__ = [
    'BACKEND_ENV_VAR',
    'BACKEND_PREFERENCE',
    'Adjacency',
    'available_backends',
    'resolve_backend',
    'gcn_norm_bipartite',
    'sym_norm',
    'UserItemConv',
    'ItemItemConv',
    'LayerCombination',
    'UserProfileAggregation',
    'CrossModalAttentionBlock',
    'RecursiveCrossModalAttention',
    'BPRLoss',
    'InfoNCE',
    'EmbeddingL2',
]
