r"""Mixed precision of training and evaluation (``train.precision``).

``'fp32'`` (the default) runs everything in float32. ``'bf16'`` runs the
*dense* parts (the modality encoders, RCA, the InfoNCE similarity products,
the evaluation's embeddings) under :func:`torch.autocast` with bfloat16,
while:

* the **sparse propagation stays float32**: the graph layers
  (:mod:`crane_pyg.nn.conv`) and :meth:`crane_pyg.nn.backend.Adjacency.matmul`
  run with autocast disabled on float32 inputs (:func:`float32_sparse`):
  ``torch.sparse.mm`` has no bfloat16 CPU kernel
  (``addmm_out_sparse_csr_impl_mkl``) and the propagated sums are where
  rounding would accumulate;
* the **master weights and the Adam state stay float32**: autocast casts a
  bfloat16 copy of a weight for each product; parameters, gradients and the
  optimizer state are never converted (no loss scaling is needed: bfloat16
  has float32's exponent range);
* the **ranking scores stay float32**: evaluation computes the embeddings
  under autocast, then scores every item with float32 embeddings, since
  bfloat16 scores (8-bit mantissa) would tie many items near the top-k
  cut-off.

``'tf32'`` (CUDA only) keeps float32 tensors and lets cuBLAS / cuDNN use
TensorFloat-32 for the float32 products
(``torch.backends.cuda.matmul.allow_tf32``), set around each step and
evaluation and restored afterwards.

**Hardware check** (:func:`resolve_precision`): ``bf16`` needs native
bfloat16 arithmetic: on CPU, oneDNN's bfloat16 support
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, i.e. AVX512-BF16 /
AMX, or AVX512 at least); on CUDA, :func:`torch.cuda.is_bf16_supported`
(compute capability 8.0+). ``tf32`` needs a CUDA device of compute
capability 8.0+. Where the hardware lacks it the run **falls back to
float32 with one warning** (:class:`PrecisionFallbackWarning`, naming the
key and the reason): a configuration stays valid on every machine, and
emulated bfloat16 would be slower than float32. The precision actually used
is logged and recorded in ``results.json`` (``precision``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Tuple

import torch

from crane_pyg.nn.precision import float32_sparse

__all__ = ['PRECISIONS', 'PrecisionFallbackWarning', 'resolve_precision', 'bf16_support',
           'tf32_support', 'autocast', 'float32_sparse']

#: the values of ``train.precision``
PRECISIONS = ('fp32', 'bf16', 'tf32')


class PrecisionFallbackWarning(UserWarning):
    r"""``train.precision`` asked for a format the device does not support;
    the run uses float32."""


def bf16_support(device: torch.device) -> Tuple[bool, str]:
    r"""``(supported, reason)``: whether :obj:`device` has native bfloat16
    arithmetic for autocast."""
    device = torch.device(device)
    if device.type == 'cpu':
        try:
            native = bool(torch.backends.mkldnn.is_available()
                          and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older torch / a build without oneDNN
            native = False
        return native, ('oneDNN bfloat16 kernels available' if native else
                        'this CPU has no native bfloat16 arithmetic for oneDNN (needs '
                        'AVX512-BF16, AMX or at least AVX512); bfloat16 would be '
                        'emulated, slower than float32')
    if device.type == 'cuda':
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, ('CUDA bfloat16 supported' if ok else
                    f'{torch.cuda.get_device_name(device)} has no native bfloat16 (needs '
                    f'compute capability 8.0+)')
    return False, f'bfloat16 autocast is not supported by crane_pyg on {device.type!r} devices'


def tf32_support(device: torch.device) -> Tuple[bool, str]:
    r"""``(supported, reason)``: whether :obj:`device` has TensorFloat-32."""
    device = torch.device(device)
    if device.type != 'cuda':
        return False, f'TensorFloat-32 is a CUDA format; {device.type!r} has none'
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8, (f'compute capability {major}.x' + ('' if major >= 8 else
                                                           ' (TF32 needs 8.0+)'))


def resolve_precision(precision: str, device: torch.device, warn: bool = True) -> str:
    r"""The precision a run on :obj:`device` uses for ``train.precision =
    precision``: :obj:`precision` itself, or ``'fp32'`` (with one
    :class:`PrecisionFallbackWarning` when :obj:`warn`) where the hardware
    lacks it. :class:`ValueError` for a value not in :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, "
                         f"got {precision!r}")
    if precision == 'fp32':
        return 'fp32'
    check = bf16_support if precision == 'bf16' else tf32_support
    ok, reason = check(device)
    if ok:
        return precision
    if warn:
        warnings.warn(f'train.precision = {precision!r}: {reason}; training in float32 '
                      f'instead', PrecisionFallbackWarning, stacklevel=2)
    return 'fp32'


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    r"""The context of a training step or an evaluation's embeddings at the
    (resolved, :func:`resolve_precision`) :obj:`precision`: bfloat16
    autocast for ``'bf16'``, TF32 products for ``'tf32'``, nothing for
    ``'fp32'``."""
    device = torch.device(device)
    if precision == 'bf16':
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == 'tf32':
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = cudnn
    else:
        yield
