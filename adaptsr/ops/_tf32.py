"""Whether float32 products may run in TF32: where torch would run the same product in TF32.

torch keeps two switches: ``torch.backends.cudnn.allow_tf32`` for convolutions (on by default, so
cuDNN runs the frozen model's float32 convs in TF32) and ``torch.backends.cuda.matmul.allow_tf32``
for matmuls (off by default). The Triton and CUDA C++ kernels follow the switch of the layer they
stand in for; an explicit ``allow`` overrides it. 16-bit inputs are unaffected by either.
"""

from __future__ import annotations

import torch


def conv_allows_tf32(allow: bool | None = None) -> bool:
    """``allow``, or torch's setting for convolutions (``torch.backends.cudnn.allow_tf32``)."""
    return bool(torch.backends.cudnn.allow_tf32 if allow is None else allow)


def matmul_allows_tf32(allow: bool | None = None) -> bool:
    """``allow``, or torch's setting for matmuls (``torch.backends.cuda.matmul.allow_tf32``)."""
    return bool(torch.backends.cuda.matmul.allow_tf32 if allow is None else allow)
