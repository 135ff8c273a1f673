"""crane_pyg: CRANE multimodal graph recommendation on PyTorch Geometric."""

__version__ = '0.1.0'
