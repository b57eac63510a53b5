r"""Triton low-rank gradient pass of a LoRA linear layer.

With rows p of x ``[M, in]`` and dy ``[M, out]``::

    u = dy B      z = x A^T      dA = s u^T x      dB = s dy^T z

This is the 1x1 convolution over an M x 1 x 1 "image", so it runs the conv kernel of
``adaptsr.kernels.lora_conv2d`` (one kernel to tune and test, not two).
"""

from __future__ import annotations

import torch

from adaptsr.kernels.lora_conv2d import lora_conv2d_lowrank_grads


def lora_linear_lowrank_grads(
    x2: torch.Tensor, dy2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA ``[r, in]`` and dB ``[out, r]`` from 2-D x ``[M, in]`` and dy ``[M, out]``; no autograd."""
    grad_a, grad_b = lora_conv2d_lowrank_grads(
        x2[:, :, None, None], dy2[:, :, None, None], lora_A[:, :, None, None], lora_B[:, :, None, None],
        scaling, (1, 1), (0, 0), (1, 1), 1,
    )
    return grad_a.reshape(lora_A.shape), grad_b.reshape(lora_B.shape)
