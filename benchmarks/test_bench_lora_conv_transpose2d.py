"""LoRA on transposed convolutions: a stack of (up-sampling transposed conv, ReLU, strided conv back down), the
layers Real-CUGAN's U-Nets up-sample with; one training step.

Targets: the transposed convs only (the down convs stay frozen for every provider). Shapes and cases:
``benchmarks/shapes.py``.
"""

from __future__ import annotations

import pytest
from torch import nn

from benchmarks.shapes import CONV_TRANSPOSE_CASES, UpDownStackShape

TARGETS = r"ups\.\d+"


class UpDownStack(nn.Module):
    """``depth`` x (ConvTranspose2d k x k stride k, ReLU, Conv2d k x k stride k): the size in is the size out."""

    def __init__(self, shape: UpDownStackShape) -> None:
        super().__init__()
        c, k = shape.channels, shape.kernel
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c, k, stride=k) for _ in range(shape.depth))
        self.downs = nn.ModuleList(nn.Conv2d(c, c, k, stride=k) for _ in range(shape.depth))
        self.act = nn.ReLU()

    def forward(self, x):
        for up, down in zip(self.ups, self.downs):
            x = down(self.act(up(x)))
        return x


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES)
def test_bench_lora_conv_transpose2d(case, run_fwd_bwd):
    run_fwd_bwd(case, build=lambda: UpDownStack(case.shape), targets=TARGETS)
