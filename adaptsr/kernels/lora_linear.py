r"""Triton kernels of a LoRA linear layer: the 1x1 convolution of ``adaptsr.kernels.lora_conv2d``.

With rows p of x ``[M, in]`` and dy ``[M, out]``::

    forward:   y = x W'^T + b     z = x A^T  [M, r]         (one pass over x)
    backward:  u = dy B           dA = s u^T x      dB = s dy^T z

The rows are an M x 1 x 1 "image" (a 2-D ``[M, C]`` tensor viewed as ``[M, C, 1, 1]`` with the
same strides), so the conv kernels run unchanged: one set of kernels to tune and test, not two.
Their float32 products follow the matmul TF32 setting, as torch's linear layers do, not the
convolution one.
"""

from __future__ import annotations

import torch

from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd, lora_conv2d_lowrank_grads
from adaptsr.ops._tf32 import matmul_allows_tf32

_ONE = ((1, 1), (0, 0), (1, 1), 1)  # stride, padding, dilation, groups of the 1x1 view


def _as_pixels(t2: torch.Tensor) -> torch.Tensor:
    return t2[:, :, None, None]


def lora_linear_fwd(
    x2: torch.Tensor, w_merged: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y ``[M, out]``, z ``[M, r]`` or None) from 2-D x ``[M, in]``, W' ``[out, in]`` and A ``[r, in]``."""
    a4 = None if lora_A is None else _as_pixels(lora_A)
    y, z = lora_conv2d_fwd(_as_pixels(x2.contiguous()), _as_pixels(w_merged), bias, a4, *_ONE,
                           allow_tf32=matmul_allows_tf32())
    return y[:, :, 0, 0], (None if z is None else z[:, :, 0, 0])


def lora_linear_lowrank_grads(
    x2: torch.Tensor,
    dy2: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    z2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA ``[r, in]`` and dB ``[out, r]`` from 2-D x ``[M, in]``, dy ``[M, out]`` (and z ``[M, r]``); no autograd."""
    grad_a, grad_b = lora_conv2d_lowrank_grads(
        _as_pixels(x2), _as_pixels(dy2), _as_pixels(lora_A), _as_pixels(lora_B), scaling, *_ONE,
        z=None if z2 is None else _as_pixels(z2), allow_tf32=matmul_allows_tf32(),
    )
    return grad_a.reshape(lora_A.shape), grad_b.reshape(lora_B.shape)
