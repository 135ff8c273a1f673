"""Transforms that add derived structure to a crane_pyg ``HeteroData``."""
from crane_pyg.transforms.item_knn import ItemKNNGraph, knn_adjacency

__all__ = ['ItemKNNGraph', 'knn_adjacency']
