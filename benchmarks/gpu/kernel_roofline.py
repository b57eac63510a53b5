"""Kernel-level GPU measurements behind the triton backend's choices, with the floors.

For each SR-training shape: the measured copy bandwidth and bf16 matmul rate of the card; the
fused low-rank gradient kernel alone against its floor (bytes of x and dy read once over the
copy bandwidth); the same gradients through torch's thin ops (the torch backend's low-rank
pass) and through the full weight gradient (the other pass); and whole LoRA layers' fwd+bwd
against the frozen layer's. Prints a markdown report; `--out FILE` also writes it.

Run on a machine with a CUDA GPU: ``python benchmarks/gpu/kernel_roofline.py --out report.md``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from triton.testing import do_bench

import adaptsr
from adaptsr.kernels.lora_conv2d import lora_conv2d_lowrank_grads
from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import _full_wgrad_to_lora, _low_rank_grads, _weight_grad
from benchmarks.shapes import GPU_CONV_SHAPES, GPU_LINEAR_SHAPES, GPU_RANKS

# The layer sizes of the benchmark shapes (each is listed once per dtype there).
CONV_SIZES = sorted({(s.batch, s.channels, s.height, s.width) for s in GPU_CONV_SHAPES})
LINEAR_SIZES = sorted({(s.num_tokens, s.in_features, s.out_features) for s in GPU_LINEAR_SHAPES})


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_copy_bandwidth() -> float:
    """Bytes read + written per second for a large device-to-device copy."""
    src = torch.randn(256 * 1024 * 1024 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_bf16_matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def _layer_fwd_bwd_ms(layer: torch.nn.Module, x: torch.Tensor, backend: str) -> float:
    x = x.detach().requires_grad_(True)
    dy = torch.randn_like(layer(x))

    def step():
        with adaptsr.set_backend(backend):
            y = layer(x)
        y.backward(dy)

    return _median_ms(step)


def _row(op: str, lora, x, dy, copy_bw: float, fused: float, thin: float, full_ms: float, frozen: float) -> dict:
    """One report row: the three gradient passes against the floor (x and dy read once), and the layers."""
    floor = (x.numel() + dy.numel()) * x.element_size() / copy_bw * 1e3
    return {
        "op": op, "rank": lora.rank, "dtype": str(x.dtype).split(".")[-1],
        "fused_ms": fused, "thin_torch_ms": thin, "full_wgrad_ms": full_ms, "floor_ms": floor,
        "bw_pct": 100 * floor / fused,
        "frozen_fwd_bwd_ms": frozen,
        "triton_fwd_bwd_ms": _layer_fwd_bwd_ms(lora, x, "triton"),
        "torch_fwd_bwd_ms": _layer_fwd_bwd_ms(lora, x, "torch"),
    }


def conv_rows(copy_bw: float, dtype: torch.dtype):
    rows = []
    for (n, c, h, w) in CONV_SIZES:
        x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        base = torch.nn.Conv2d(c, c, 3, padding=1).to("cuda", dtype).to(memory_format=torch.channels_last)
        base.requires_grad_(False)
        frozen = _layer_fwd_bwd_ms(base, x, "torch")
        geometry = ConvGeometry.of(base)
        dy = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        for rank in GPU_RANKS:
            lora = adaptsr.LoRAConv2d(base_layer=base, rank=rank, init_lora_weights=False)
            a, b = lora.lora_A.detach(), lora.lora_B.detach()
            fused = _median_ms(lambda: lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1))
            thin = _median_ms(lambda: _low_rank_grads(x, dy, a, b, 1.0, geometry))

            def full():
                w_merged = base.weight + lora.get_delta_weight()
                return _full_wgrad_to_lora(_weight_grad(x, dy, w_merged, geometry, 1), a, b, 1.0)

            full_ms = _median_ms(full)
            rows.append(_row(f"conv3x3 {c}->{c} on {n}x{c}x{h}x{w}", lora, x, dy, copy_bw, fused, thin, full_ms, frozen))
    return rows


def linear_rows(copy_bw: float, dtype: torch.dtype):
    rows = []
    for (tokens, fin, fout) in LINEAR_SIZES:
        x = torch.randn(tokens, fin, device="cuda", dtype=dtype)
        base = torch.nn.Linear(fin, fout).to("cuda", dtype)
        base.requires_grad_(False)
        frozen = _layer_fwd_bwd_ms(base, x, "torch")
        dy = torch.randn(tokens, fout, device="cuda", dtype=dtype)
        from adaptsr.kernels.lora_linear import lora_linear_lowrank_grads

        for rank in GPU_RANKS:
            lora = adaptsr.LoRALinear(base_layer=base, rank=rank, init_lora_weights=False)
            a, b = lora.lora_A.detach(), lora.lora_B.detach()
            fused = _median_ms(lambda: lora_linear_lowrank_grads(x, dy, a, b, 1.0))
            thin = _median_ms(lambda: ((dy @ b).t() @ x, dy.t() @ (x @ a.t())))
            full_ms = _median_ms(lambda: (lambda gw: (b.t() @ gw, gw @ a.t()))(dy.t() @ x))
            rows.append(_row(f"linear {fin}->{fout} on {tokens} tokens", lora, x, dy, copy_bw, fused, thin, full_ms, frozen))
    return rows


def render(rows, copy_bw: float, matmul_rate: float) -> str:
    lines = [
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"measured copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write), bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s",
        "",
        "Low-rank gradient pass alone (dA, dB from x and dy), and whole-layer fwd+bwd:",
        "",
        "| op | r | dtype | fused triton ms | torch thin ops ms | full wgrad ms | floor ms (x+dy once) | % of copy BW "
        "| frozen fwd+bwd ms | triton layer fwd+bwd ms (x frozen) | torch layer fwd+bwd ms (x frozen) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['rank']} | {r['dtype']} | {r['fused_ms']:.3f} | {r['thin_torch_ms']:.3f} | "
            f"{r['full_wgrad_ms']:.3f} | {r['floor_ms']:.3f} | {r['bw_pct']:.0f}% | {r['frozen_fwd_bwd_ms']:.3f} | "
            f"{r['triton_fwd_bwd_ms']:.3f} ({r['triton_fwd_bwd_ms'] / r['frozen_fwd_bwd_ms']:.2f}x) | "
            f"{r['torch_fwd_bwd_ms']:.3f} ({r['torch_fwd_bwd_ms'] / r['frozen_fwd_bwd_ms']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated dtypes to measure (bf16, fp32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_roofline.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    copy_bw, matmul_rate = measure_copy_bandwidth(), measure_bf16_matmul_rate()
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for dtype in (dtypes[name] for name in args.dtypes.split(",")):
        rows += conv_rows(copy_bw, dtype) + linear_rows(copy_bw, dtype)
    report = render(rows, copy_bw, matmul_rate)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
