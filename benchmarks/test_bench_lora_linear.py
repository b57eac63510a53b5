"""LoRA on one linear layer over a batch of tokens (SwinIR's qkv / MLP shapes): one training step.

Shapes and cases: ``benchmarks/shapes.py``.
"""

from __future__ import annotations

import pytest
from torch import nn

from benchmarks.shapes import LINEAR_CASES, LinearShape

TARGETS = ["fc"]


class OneLinear(nn.Module):
    def __init__(self, shape: LinearShape) -> None:
        super().__init__()
        self.fc = nn.Linear(shape.in_features, shape.out_features)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_bench_lora_linear(case, run_fwd_bwd):
    run_fwd_bwd(case, build=lambda: OneLinear(case.shape), targets=TARGETS)
