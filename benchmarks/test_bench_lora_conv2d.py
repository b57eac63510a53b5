"""LoRA on a stack of 3x3 convolutions + ReLU (an RRDB/RCAN-like body): one training step.

Targets: every conv of the stack. Shapes and cases: ``benchmarks/shapes.py``.
"""

from __future__ import annotations

import pytest
from torch import nn

from benchmarks.shapes import CONV_CASES, ConvStackShape

TARGETS = r"convs\.\d+"


class ConvStack(nn.Module):
    """``depth`` x (conv kxk C->C, padding k//2, + ReLU); its convs are named ``convs.<i>``."""

    def __init__(self, shape: ConvStackShape) -> None:
        super().__init__()
        c, k = shape.channels, shape.kernel
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2) for _ in range(shape.depth))
        self.act = nn.ReLU()

    def forward(self, x):
        for conv in self.convs:
            x = self.act(conv(x))
        return x


@pytest.mark.parametrize("case", CONV_CASES)
def test_bench_lora_conv2d(case, run_fwd_bwd):
    run_fwd_bwd(case, build=lambda: ConvStack(case.shape), targets=TARGETS)
