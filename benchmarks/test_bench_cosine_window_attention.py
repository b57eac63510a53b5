"""Swin2SR's cosine window attention: forward + backward, spandrel's against adaptsr's op.

``eager`` is spandrel's Swin2SR ``WindowAttention`` as it is; every other provider is the same module
switched by ``enable_fused_cosine_attention`` with the attention core on that adaptsr backend. The
shapes are the window-attention benchmark's at window 8 (SwinIR-M's dim 180, 6 heads; unshifted and
shifted), the whole module (qkv, core, proj) with its input requiring grad and its weights not, as
in LoRA training.

``extra_info``: see ``benchmarks.conftest.bench_switched_module``.
"""

from __future__ import annotations

import pytest
import torch
from spandrel.architectures.Swin2SR.__arch.Swin2SR import WindowAttention

from adaptsr.nn.cosine_window_attention import enable_fused_cosine_attention
from benchmarks.conftest import bench_switched_module, switched_module_cases
from benchmarks.shapes import (
    CPU_WINDOW_ATTENTION_SHAPES,
    GPU_WINDOW_ATTENTION_SHAPES,
    WindowAttentionShape,
)

SHAPES = CPU_WINDOW_ATTENTION_SHAPES + tuple(s for s in GPU_WINDOW_ATTENTION_SHAPES if s.window == 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EAGER_MEDIANS: dict[str, float] = {}


CASES = switched_module_cases(SHAPES, lambda shape: f"swin2sr-{shape.id}-{shape.dtype}")


def _build(shape: WindowAttentionShape, device: torch.device, dtype: torch.dtype, fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    attention = WindowAttention(shape.dim, (shape.window, shape.window), shape.heads)
    holder = torch.nn.ModuleList([attention]).to(device=device, dtype=dtype).requires_grad_(False).train()
    if fused:
        enable_fused_cosine_attention(holder)
    return attention


@pytest.mark.parametrize("shape, provider", CASES)
def test_bench_cosine_window_attention(shape, provider, benchmark):
    device, dtype = torch.device(shape.device), DTYPES[shape.dtype]
    mask = shape.mask()
    mask = None if mask is None else mask.to(device)  # float32, as the block keeps it
    x = torch.randn(shape.input_shape, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape.input_shape, device=device, dtype=dtype)
    bench_switched_module(
        benchmark, provider=provider, shape_id=f"swin2sr-{shape.id}", dtype_name=shape.dtype,
        build=lambda fused: _build(shape, device, dtype, fused),
        call=lambda attention, x: attention(x, mask),
        inputs=[x], grad_out=grad_out, eager_medians=EAGER_MEDIANS,
    )
