r"""Datasets as PyG users expect them (``torch_geometric.datasets`` style):
:class:`MMRecDataset`, an :class:`~torch_geometric.data.InMemoryDataset` over
an MMRec-format folder (implemented in :mod:`crane_pyg.data.dataset`)."""
from crane_pyg.data.dataset import MMRecDataset

__all__ = ['MMRecDataset']
