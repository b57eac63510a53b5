"""HAT's overlapping cross-attention block (OCAB): forward + backward, spandrel's against adaptsr's op.

``eager`` is spandrel's block as it is; every other provider is the same block switched by
``enable_fused_overlapping_attention`` with the attention core on that adaptsr backend. The shape is
HAT's (dim 180, 6 heads of 30, window 16, overlap ratio 0.5: 256 queries attend to 576 keys per
window). The whole block runs (norms, qkv, the core, proj, MLP); its input requires grad and its
weights do not, as in LoRA training with the adapters in qkv / proj / MLP.

``extra_info``: see ``benchmarks.conftest.bench_switched_module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from spandrel.architectures.HAT.__arch.HAT import HAT, OCAB

from adaptsr.nn.overlapping_cross_attention import enable_fused_overlapping_attention
from benchmarks.conftest import bench_switched_module, switched_module_cases


@dataclass(frozen=True)
class OverlapShape:
    device: str
    dtype: str
    batch: int
    size: int  # the map is size x size tokens
    dim: int = 180
    heads: int = 6
    window: int = 16
    overlap_ratio: float = 0.5

    @property
    def id(self) -> str:
        return f"hat-ocab-{self.dim}ch-w{self.window}-b{self.batch}x{self.size}x{self.size}-{self.device}"


SHAPES = (OverlapShape("cpu", "fp32", batch=1, size=32), OverlapShape("cuda", "bf16", batch=16, size=64))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EAGER_MEDIANS: dict[str, float] = {}


# the block is frozen (its bias table too): the cuda kernels take its 576 keys per window on tensor cores
CASES = switched_module_cases(SHAPES, lambda shape: f"{shape.id}-{shape.dtype}")


def _build(shape: OverlapShape, device: torch.device, dtype: torch.dtype, fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    block = OCAB(shape.dim, (shape.size, shape.size), shape.window, shape.overlap_ratio, shape.heads)
    holder = torch.nn.ModuleList([block]).to(device=device, dtype=dtype).requires_grad_(False).train()
    if fused:
        enable_fused_overlapping_attention(holder)
    return block


@pytest.mark.parametrize("shape, provider", CASES)
def test_bench_overlapping_cross_attention(shape, provider, benchmark):
    device, dtype = torch.device(shape.device), DTYPES[shape.dtype]
    # the model's relative_position_index_OCA, from spandrel's own method
    rpi = HAT.calculate_rpi_oca(SimpleNamespace(window_size=shape.window, overlap_ratio=shape.overlap_ratio))
    rpi = rpi.to(device)
    tokens = (shape.batch, shape.size * shape.size, shape.dim)
    x = torch.randn(tokens, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, device=device, dtype=dtype)
    bench_switched_module(
        benchmark, provider=provider, shape_id=shape.id, dtype_name=shape.dtype,
        build=lambda fused: _build(shape, device, dtype, fused),
        call=lambda block, x: block(x, (shape.size, shape.size), rpi),
        inputs=[x], grad_out=grad_out, eager_medians=EAGER_MEDIANS,
    )
