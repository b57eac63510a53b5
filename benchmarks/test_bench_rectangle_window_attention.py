"""DAT's rectangle-window attention (Spatial_Attention): forward + backward, spandrel's against adaptsr's op.

``eager`` is spandrel's module as it is; every other provider is the same module switched by
``enable_fused_rectangle_attention`` with the attention core on that adaptsr backend. The shape is
one of DAT's two spatial attentions: the block's dim 180 split in half (90 channels, 3 heads of 30),
8 x 32 windows (256 tokens; ``attns.0``), on a 64 x 64 map. Its inputs (the parent's q, k, v)
require grad, its weights (the position-bias MLP) do not, as in LoRA training with the adapters in
the parent's qkv / proj.

``extra_info``: see ``benchmarks.conftest.bench_switched_module``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from spandrel.architectures.DAT.__arch.DAT import Spatial_Attention

from adaptsr.nn.rectangle_window_attention import enable_fused_rectangle_attention
from benchmarks.conftest import bench_switched_module, switched_module_cases


@dataclass(frozen=True)
class RectangleShape:
    device: str
    dtype: str
    batch: int
    size: int = 64  # the map is size x size
    dim: int = 90
    heads: int = 3
    split: tuple[int, int] = (8, 32)

    @property
    def id(self) -> str:
        return f"dat-spatial-{self.dim}ch-{self.split[0]}x{self.split[1]}-b{self.batch}-{self.device}"


SHAPES = (RectangleShape("cpu", "fp32", batch=2), RectangleShape("cuda", "bf16", batch=16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EAGER_MEDIANS: dict[str, float] = {}


CASES = switched_module_cases(SHAPES, lambda shape: f"{shape.id}-{shape.dtype}")


def _build(shape: RectangleShape, device: torch.device, dtype: torch.dtype, fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    attention = Spatial_Attention(shape.dim, 0, split_size=list(shape.split), num_heads=shape.heads)
    holder = torch.nn.ModuleList([attention]).to(device=device, dtype=dtype).requires_grad_(False).train()
    if fused:
        enable_fused_rectangle_attention(holder)
    return attention


@pytest.mark.parametrize("shape, provider", CASES)
def test_bench_rectangle_window_attention(shape, provider, benchmark):
    device, dtype = torch.device(shape.device), DTYPES[shape.dtype]
    qkv = torch.randn(3, shape.batch, shape.size * shape.size, shape.dim, device=device, dtype=dtype,
                      requires_grad=True)
    grad_out = torch.randn(shape.batch, shape.size, shape.size, shape.dim, device=device, dtype=dtype)
    bench_switched_module(
        benchmark, provider=provider, shape_id=shape.id, dtype_name=shape.dtype,
        build=lambda fused: _build(shape, device, dtype, fused),
        call=lambda module, qkv: module(qkv, shape.size, shape.size),
        inputs=[qkv], grad_out=grad_out, eager_medians=EAGER_MEDIANS,
    )
