"""Kernel-level GPU measurements behind the triton backend's choices, with the floors.

For each SR-training shape, with the card's measured copy bandwidth and matmul rate:

- the low-rank gradient pass alone (dA, dB from x and dy): the Triton kernels with the forward's
  saved z and without it (z recomputed), torch's thin ops (the torch backend's pass) and the full
  weight gradient (the other pass), against the floor: x, dy and z read once over the copy bandwidth;
- the forward alone: the Triton one-pass kernel (y and z), cuDNN/cuBLAS's y alone, and cuDNN's y
  plus the Triton z-only kernel, against the floor max(FLOPs / rate, bytes / bandwidth). This is
  the measurement behind ``_DENSE_FORWARD_IN_TRITON`` in ``adaptsr/ops/lora_conv2d.py``;
- whole layers' fwd+bwd (input gradient on, base frozen): frozen, torch backend, triton backend
  (both forward compositions), cuda backend, against the frozen layer's FLOP floor;
- the Swin window-attention core (``adaptsr.ops.window_attention``: relative-position bias, shift
  mask, trainable table) at the window-attention benchmark's GPU shapes, forward alone and
  forward + backward per backend, against the floor: q, k, v read and o written once (forward),
  and q, k, v, o, dO read and dq, dk, dv written once more (backward). This is the measurement
  behind ``AUTO_ON_CUDA["window_attention"]``.

The cuda columns (the CUDA C++ extension's z, u/dB and dA kernels) read "n/a" where it does not run.

Prints a markdown report; ``--out FILE`` also writes it. Run on a machine with a CUDA GPU:
``python benchmarks/gpu/kernel_roofline.py --out report.md``. ``--smoke`` runs tiny shapes on the
CPU (Triton interpreter, wall-clock timer) to check the script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time

import torch

# Run as a file (python benchmarks/gpu/kernel_roofline.py): the repository's benchmarks package from here.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# The smoke run needs the interpreter set before the kernels are imported.
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import adaptsr  # noqa: E402
from adaptsr import _cuda  # noqa: E402
from adaptsr.backend import is_available  # noqa: E402
from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd, lora_conv2d_lowrank_grads  # noqa: E402
from adaptsr.kernels.lora_linear import lora_linear_fwd, lora_linear_lowrank_grads  # noqa: E402
from adaptsr.ops._conv_geometry import ConvGeometry  # noqa: E402
from adaptsr.ops.window_attention import window_attention  # noqa: E402
from benchmarks.shapes import (  # noqa: E402
    GPU_CONV_SHAPES,
    GPU_LINEAR_SHAPES,
    GPU_RANKS,
    GPU_WINDOW_ATTENTION_SHAPES,
    WindowAttentionShape,
)

# the module, not the function of the same name that adaptsr.ops re-exports
conv_op = importlib.import_module("adaptsr.ops.lora_conv2d")
linear_op = importlib.import_module("adaptsr.ops.lora_linear")

# The CUDA C++ extension's columns, where it runs (a GPU and a built adaptsr._C); "n/a" elsewhere.
CUDA_KERNELS = torch.cuda.is_available() and is_available("cuda")
# The layer sizes of the benchmark shapes (each is listed once per dtype there).
CONV_SIZES = sorted({(s.batch, s.channels, s.height, s.width) for s in GPU_CONV_SHAPES})
LINEAR_SIZES = sorted({(s.num_tokens, s.in_features, s.out_features) for s in GPU_LINEAR_SHAPES})
SMOKE_CONV_SIZES = [(1, 16, 8, 8)]
SMOKE_LINEAR_SIZES = [(64, 16, 48)]
# The window-attention shapes, once each whatever their benchmark dtype (the report's dtypes apply).
ATTENTION_SHAPES = sorted({WindowAttentionShape(s.batch, s.tokens, s.dim, s.heads, s.window, s.shifted)
                           for s in GPU_WINDOW_ATTENTION_SHAPES}, key=lambda s: (s.window, s.shifted))
SMOKE_ATTENTION_SHAPES = [WindowAttentionShape(batch=1, tokens=8, dim=16, heads=2, window=4, shifted=True)]
ATTENTION_BACKENDS = ("reference", "torch", "triton", "cuda")


class Bench:
    """Timer, device and the card's measured rates."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.copy_bw = self._copy_bandwidth()
        self.matmul_rate = {dt: self._matmul_rate(dt) for dt in (torch.bfloat16, torch.float32)}

    def ms(self, fn) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def _copy_bandwidth(self) -> float:
        """Bytes read + written per second for a large device-to-device copy."""
        n = (256 if self.device == "cuda" else 4) * 1024 * 1024 // 4
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        return 2 * n * 4 / (self.ms(lambda: dst.copy_(src)) * 1e-3)

    def _matmul_rate(self, dtype: torch.dtype) -> float:
        n = 8192 if self.device == "cuda" else 256
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        return 2 * n**3 / (self.ms(lambda: a @ b) * 1e-3)

    def floor_ms(self, flops: float, num_bytes: float, dtype: torch.dtype) -> float:
        return max(flops / self.matmul_rate[dtype], num_bytes / self.copy_bw) * 1e3


@contextlib.contextmanager
def _dense_forward_in_triton(flag: bool):
    """Both ops' choice of forward composition, for one measurement."""
    saved = conv_op._DENSE_FORWARD_IN_TRITON, linear_op._DENSE_FORWARD_IN_TRITON
    conv_op._DENSE_FORWARD_IN_TRITON = linear_op._DENSE_FORWARD_IN_TRITON = flag
    try:
        yield
    finally:
        conv_op._DENSE_FORWARD_IN_TRITON, linear_op._DENSE_FORWARD_IN_TRITON = saved


def _layer_fwd_bwd_ms(bench: Bench, layer: torch.nn.Module, x: torch.Tensor, backend: str, dense_in_triton=True):
    x = x.detach().requires_grad_(True)
    dy = torch.randn_like(layer(x))

    def step():
        with adaptsr.set_backend(backend), _dense_forward_in_triton(dense_in_triton):
            y = layer(x)
        y.backward(dy)

    return bench.ms(step)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure(bench, op, lora, base, x, dy, passes, forwards, flops_fwd):
    """One report row. ``passes``/``forwards``: name -> callable; ``flops_fwd``: the dense forward's FLOPs."""
    dtype = x.dtype
    z = forwards["triton_y_z"]()[1]
    y = forwards["dense_y"]()
    row = {"op": op, "rank": lora.rank, "dtype": str(dtype).split(".")[-1]}
    if CUDA_KERNELS:
        passes = {**passes, "grad_cuda": lambda: _cuda_lowrank_grads(x, dy, lora)}
    row.update({name: bench.ms(fn) for name, fn in passes.items()})
    row.update({name: bench.ms(fn) for name, fn in forwards.items()})
    row["grad_floor"] = bench.floor_ms(0, _nbytes(x, dy, z), dtype)
    row["fwd_floor"] = bench.floor_ms(flops_fwd, _nbytes(x, y, z), dtype)
    # frozen layer with input gradient: forward + dgrad, x, y, dy, dx moved once each
    row["layer_floor"] = bench.floor_ms(2 * flops_fwd, 2 * _nbytes(x, y), dtype)
    row["frozen"] = _layer_fwd_bwd_ms(bench, base, x, "torch")
    row["torch_layer"] = _layer_fwd_bwd_ms(bench, lora, x, "torch")
    row["triton_layer"] = _layer_fwd_bwd_ms(bench, lora, x, "triton", dense_in_triton=True)
    row["triton_cudnn_layer"] = _layer_fwd_bwd_ms(bench, lora, x, "triton", dense_in_triton=False)
    if CUDA_KERNELS:
        row["cuda_layer"] = _layer_fwd_bwd_ms(bench, lora, x, "cuda")
    return row


def _cuda_lowrank_grads(x, dy, lora):
    """The CUDA C++ extension's pass (z, u/dB and dA kernels; it recomputes z) for a LoRA layer."""
    a, b = lora.lora_A.detach(), lora.lora_B.detach()
    if x.dim() == 2:
        return _cuda.lora_linear_lowrank_grads(x, dy, a, b, 1.0)
    return _cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1)


def _ms(value: float) -> str:
    """Milliseconds to three decimals; below that (floors of the smoke run's tiny shapes) in scientific
    notation, so no positive time prints as 0.000."""
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.1e}"


def _ms_or_na(row: dict, key: str, base: float | None = None) -> str:
    if key not in row:
        return "n/a"
    return _ratio(row[key], base) if base is not None else _ms(row[key])


def conv_rows(bench: Bench, dtype: torch.dtype, sizes, ranks):
    rows = []
    dev = bench.device
    for (n, c, h, w) in sizes:
        x = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        base = torch.nn.Conv2d(c, c, 3, padding=1).to(dev, dtype).to(memory_format=torch.channels_last)
        base.requires_grad_(False)
        geometry = ConvGeometry.of(base)
        dy = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        geo = ((1, 1), (1, 1), (1, 1), 1)
        for rank in ranks:
            lora = adaptsr.LoRAConv2d(base_layer=base, rank=rank, init_lora_weights=False)
            a, b = lora.lora_A.detach(), lora.lora_B.detach()
            w_merged = (base.weight + lora.get_delta_weight()).detach()
            z = lora_conv2d_fwd(x, None, None, a, *geo)[1]

            def full():
                return conv_op._full_wgrad_to_lora(conv_op._weight_grad(x, dy, w_merged, geometry, 1), a, b, 1.0)

            passes = {
                "grad_saved_z": lambda: lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, *geo, z=z),
                "grad_recompute_z": lambda: lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, *geo),
                "grad_thin_torch": lambda: conv_op._low_rank_grads(x, dy, a, b, 1.0, geometry),
                "grad_full_wgrad": full,
            }
            forwards = {
                "triton_y_z": lambda: lora_conv2d_fwd(x, w_merged, base.bias, a, *geo),
                "dense_y": lambda: geometry.conv(x, w_merged, base.bias),
                "dense_y_triton_z": lambda: (
                    geometry.conv(x, w_merged, base.bias), lora_conv2d_fwd(x, None, None, a, *geo)
                ),
            }
            flops = 2 * n * h * w * c * c * 9
            op = f"conv3x3 {c}->{c} on {n}x{c}x{h}x{w}"
            rows.append(_measure(bench, op, lora, base, x, dy, passes, forwards, flops))
    return rows


def linear_rows(bench: Bench, dtype: torch.dtype, sizes, ranks):
    rows = []
    dev = bench.device
    for (tokens, fin, fout) in sizes:
        x = torch.randn(tokens, fin, device=dev, dtype=dtype)
        base = torch.nn.Linear(fin, fout).to(dev, dtype)
        base.requires_grad_(False)
        dy = torch.randn(tokens, fout, device=dev, dtype=dtype)
        for rank in ranks:
            lora = adaptsr.LoRALinear(base_layer=base, rank=rank, init_lora_weights=False)
            a, b = lora.lora_A.detach(), lora.lora_B.detach()
            w_merged = (base.weight + lora.get_delta_weight()).detach()
            z = x @ a.t()
            passes = {
                "grad_saved_z": lambda: lora_linear_lowrank_grads(x, dy, a, b, 1.0, z),
                "grad_recompute_z": lambda: lora_linear_lowrank_grads(x, dy, a, b, 1.0),
                "grad_thin_torch": lambda: ((dy @ b).t() @ x, dy.t() @ (x @ a.t())),
                "grad_full_wgrad": lambda: (lambda gw: (b.t() @ gw, gw @ a.t()))(dy.t() @ x),
            }
            forwards = {
                "triton_y_z": lambda: lora_linear_fwd(x, w_merged, base.bias, a),
                "dense_y": lambda: torch.nn.functional.linear(x, w_merged, base.bias),
                "dense_y_triton_z": lambda: (torch.nn.functional.linear(x, w_merged, base.bias), x @ a.t()),
            }
            flops = 2 * tokens * fin * fout
            rows.append(_measure(bench, f"linear {fin}->{fout} on {tokens} tokens", lora, base, x, dy, passes, forwards,
                                 flops))
    return rows


def attention_rows(bench: Bench, dtype: torch.dtype, shapes):
    """Window-attention core per backend: forward (no grad) and forward + backward, ms, with the floors."""
    rows = []
    dev = bench.device
    for shape in shapes:
        module = shape.build().to(dev)
        windows, n = shape.batch * shape.windows_per_image, shape.window * shape.window
        d = shape.dim // shape.heads
        q, k, v = (torch.randn(windows, shape.heads, n, d, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        table = module.relative_position_bias_table.detach().to(dtype).requires_grad_(True)
        index = module.relative_position_index
        mask = shape.mask()
        mask = mask.to(dev, dtype) if mask is not None else None
        scale = d**-0.5
        do = torch.randn_like(q)

        def forward(backend):
            def run():
                with adaptsr.set_backend(backend), torch.no_grad():
                    window_attention(q, k, v, table, index, mask, scale)
            return run

        def forward_backward(backend):
            def run():
                with adaptsr.set_backend(backend):
                    o = window_attention(q, k, v, table, index, mask, scale)
                torch.autograd.grad(o, (q, k, v, table), do)
            return run

        row = {"shape": f"{windows} windows x {shape.heads} heads, N {n}, d {d}, "
                        f"{'shifted' if shape.shifted else 'unshifted'}",
               "dtype": str(dtype).split(".")[-1]}
        for backend in ATTENTION_BACKENDS:
            if backend == "cuda" and not CUDA_KERNELS:
                continue
            row[f"fwd_{backend}"] = bench.ms(forward(backend))
            row[f"fwd_bwd_{backend}"] = bench.ms(forward_backward(backend))
        # S = q k^T and o = P v: 2 N^2 d FLOPs each per window and head; the backward recomputes S and
        # adds dP, dv, dq and dk (five products)
        products = 2 * windows * shape.heads * n * n * d
        qkv_bytes = _nbytes(q)
        row["fwd_floor"] = bench.floor_ms(2 * products, 4 * qkv_bytes, dtype)
        row["fwd_bwd_floor"] = bench.floor_ms(7 * products, 12 * qkv_bytes, dtype)
        rows.append(row)
    return rows


def render_attention(rows) -> str:
    lines = [
        "",
        "Window-attention core (adaptsr.ops.window_attention), ms; floor: max(FLOPs / rate, bytes / bandwidth), "
        "the bytes q, k, v read and o written (forward), and q, k, v, o, dO read and dq, dk, dv written (backward):",
        "",
        "| shape | dtype | pass | " + " | ".join(ATTENTION_BACKENDS) + " | floor | fastest |",
        "|---|---|---|" + "---|" * (len(ATTENTION_BACKENDS) + 2),
    ]
    for r in rows:
        for label, key in (("forward", "fwd"), ("forward + backward", "fwd_bwd")):
            timed = {b: r[f"{key}_{b}"] for b in ATTENTION_BACKENDS if f"{key}_{b}" in r}
            cells = [_ms_or_na(r, f"{key}_{b}") for b in ATTENTION_BACKENDS]
            lines.append(f"| {r['shape']} | {r['dtype']} | {label} | " + " | ".join(cells)
                         + f" | {_ms(r[f'{key}_floor'])} | {min(timed, key=timed.get)} |")
    return "\n".join(lines) + "\n"


def _ratio(value: float, base: float) -> str:
    return f"{value:.3f} ({value / base:.2f}x)"


def render(rows, bench: Bench) -> str:
    name = torch.cuda.get_device_name() if bench.device == "cuda" else "CPU (smoke run: numbers mean nothing)"
    lines = [
        f"Device: {name}; torch {torch.__version__}; measured copy bandwidth {bench.copy_bw / 1e12:.2f} TB/s "
        f"(read + write), matmul {bench.matmul_rate[torch.bfloat16] / 1e12:.0f} TFLOP/s bf16, "
        f"{bench.matmul_rate[torch.float32] / 1e12:.0f} TFLOP/s fp32 (TF32 as torch has it)",
        "",
        "Low-rank gradient pass alone (dA, dB from x and dy), ms; floor: x, dy and z read once over the copy bandwidth:",
        "",
        "| op | r | dtype | triton, saved z | % of floor | triton, z recomputed | cuda (z recomputed) | torch thin ops "
        "| full wgrad | floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['rank']} | {r['dtype']} | {r['grad_saved_z']:.3f} | {100 * r['grad_floor'] / r['grad_saved_z']:.0f}% "
            f"| {r['grad_recompute_z']:.3f} | {_ms_or_na(r, 'grad_cuda')} | {r['grad_thin_torch']:.3f} "
            f"| {r['grad_full_wgrad']:.3f} | {_ms(r['grad_floor'])} |"
        )
    lines += [
        "",
        "Forward alone, ms (the choice of `_DENSE_FORWARD_IN_TRITON`); floor: max(FLOPs / rate, bytes / bandwidth):",
        "",
        "| op | r | dtype | triton y+z, one pass | cuDNN/cuBLAS y alone | cuDNN/cuBLAS y + z (triton conv z, cuBLAS linear z) | floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['rank']} | {r['dtype']} | {r['triton_y_z']:.3f} | {r['dense_y']:.3f} | "
            f"{r['dense_y_triton_z']:.3f} | {_ms(r['fwd_floor'])} |"
        )
    lines += [
        "",
        "Whole layer fwd+bwd (base frozen, input gradient on), ms and ratio to the frozen layer; floor: the frozen "
        "layer's forward + input-gradient FLOPs over the rate:",
        "",
        "| op | r | dtype | frozen | torch backend | triton (one-pass fwd) | triton (cuDNN/cuBLAS fwd) | cuda backend "
        "| frozen floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['rank']} | {r['dtype']} | {r['frozen']:.3f} | {_ratio(r['torch_layer'], r['frozen'])} | "
            f"{_ratio(r['triton_layer'], r['frozen'])} | {_ratio(r['triton_cudnn_layer'], r['frozen'])} | "
            f"{_ms_or_na(r, 'cuda_layer', r['frozen'])} | {_ms(r['layer_floor'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated dtypes to measure (bf16, fp32)")
    parser.add_argument("--ranks", default=",".join(map(str, GPU_RANKS)), help="comma-separated LoRA ranks")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        device, conv_sizes, linear_sizes, ranks, dtypes = "cpu", SMOKE_CONV_SIZES, SMOKE_LINEAR_SIZES, (4,), "fp32"
        attention_shapes = SMOKE_ATTENTION_SHAPES
    elif torch.cuda.is_available():
        device, conv_sizes, linear_sizes, dtypes = "cuda", CONV_SIZES, LINEAR_SIZES, args.dtypes
        ranks = tuple(int(r) for r in args.ranks.split(","))
        attention_shapes = ATTENTION_SHAPES
    else:
        print("kernel_roofline.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = Bench(device)
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rows, attention = [], []
    for dtype in (names[name] for name in dtypes.split(",")):
        rows += conv_rows(bench, dtype, conv_sizes, ranks) + linear_rows(bench, dtype, linear_sizes, ranks)
        attention += attention_rows(bench, dtype, attention_shapes)
    report = render(rows, bench) + render_attention(attention)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
