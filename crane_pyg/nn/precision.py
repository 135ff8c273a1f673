r"""Float32 sparse products inside a mixed-precision step
(``train.precision``, :mod:`crane_pyg.train.precision`)."""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch

__all__ = ['float32_sparse']


def float32_sparse(x: torch.Tensor) -> Tuple[torch.Tensor, contextlib.AbstractContextManager]:
    r"""``(x in float32, context)`` for a sparse product: inside the context
    autocast is off, so the product runs in float32 even in a bfloat16 step
    (lower-precision inputs, e.g. a bfloat16 encoder output, are upcast;
    ``torch.sparse.mm`` has no bfloat16 CPU kernel). Outside autocast and for
    float32 / float64 inputs this is ``(x, no-op)``."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    if not low and not torch.is_autocast_enabled(x.device.type):
        return x, contextlib.nullcontext()
    return (x.float() if low else x), torch.autocast(x.device.type, enabled=False)
