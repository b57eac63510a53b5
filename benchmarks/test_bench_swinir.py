"""A whole spandrel SwinIR with LoRA from ``inject_lora(preset="swinir")``: one training step.

PEFT gets exactly the layers the preset selects (attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of every
block, each residual group's conv, conv_after_body). Shapes and cases: ``benchmarks/shapes.py``.
"""

from __future__ import annotations

import pytest

from benchmarks.shapes import SWINIR_CASES


@pytest.mark.parametrize("case", SWINIR_CASES)
def test_bench_swinir(case, run_fwd_bwd):
    run_fwd_bwd(case, build=case.shape.build, preset="swinir")
