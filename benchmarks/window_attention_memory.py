"""Activation memory of one SwinIR-M window-attention module per provider, measured on any machine.

What autograd saves for the backward depends on the shapes and the code path, not on the device:
counted here (``adaptsr.bench.saved_activation_bytes``: unique storages saved in one step,
parameters excluded) with the Triton kernels under the interpreter when there is no GPU, on one
and two images of the SwinIR-M block shape (dim 180, 6 heads, window 8, 64x64 tokens: 64 windows
per image). The difference is the per-image part; what is left (the shift mask, shared by the
images, float32 in the fused paths) is fixed, so the benchmark's batch of 16 is extrapolated
exactly: fixed + 16 x per image. Issue 6's target: at most half of eager's activation memory.

    python benchmarks/window_attention_memory.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# Run as a file (python benchmarks/window_attention_memory.py): the repository's benchmarks package from here.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from adaptsr.backend import is_available  # noqa: E402
from adaptsr.bench import saved_activation_bytes  # noqa: E402
from benchmarks.shapes import Case, WindowAttentionShape  # noqa: E402
from benchmarks.test_bench_window_attention import PROVIDER_CONTEXTS, _build, _mask  # noqa: E402

PROVIDERS = ("eager", "sdpa", "matmul", "triton", "triton_single_pass")
BATCH = 16  # the benchmark's (benchmarks/shapes.py GPU_WINDOW_ATTENTION_SHAPES)


def measure(shifted: bool, dtype_name: str, batch: int) -> dict[str, int]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = WindowAttentionShape(batch=batch, tokens=64, dim=180, heads=6, shifted=shifted, dtype=dtype_name,
                                 device=device.type)
    out = {}
    for provider in PROVIDERS:
        if provider.startswith("triton") and not is_available("triton"):
            continue
        case = Case(shape, provider, None)
        module = _build(case, device, case.dtype)
        mask = _mask(shape, device, case.dtype)
        x = torch.randn(shape.input_shape, device=device, dtype=case.dtype, requires_grad=True)
        context = PROVIDER_CONTEXTS[provider]

        def forward():
            if context is None:
                return module(x, mask)
            with context():
                return module(x, mask)

        out[provider] = saved_activation_bytes(forward, torch.randn_like(x), module)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    lines = [
        "Saved activation bytes of one forward + backward of a SwinIR-M WindowAttention module (qkv, core, "
        f"proj; 64x64 tokens per image, 64 windows), per provider, for a batch of {BATCH} images (fixed + "
        f"{BATCH} x per image, from runs on 1 and 2 images), and the ratio to eager:",
        "",
        "| dtype | block | " + " | ".join(PROVIDERS) + " |",
        "|---|---|" + "---|" * len(PROVIDERS),
    ]
    for dtype_name in ("fp32", "bf16"):
        for shifted in (False, True):
            one, two = measure(shifted, dtype_name, 1), measure(shifted, dtype_name, 2)
            saved = {p: (one[p] - (two[p] - one[p])) + BATCH * (two[p] - one[p]) for p in one}
            eager = saved["eager"]
            cells = [f"{saved[p] / 2**20:.1f} MB ({saved[p] / eager:.2f}x)" if p in saved else "-" for p in PROVIDERS]
            lines.append(f"| {dtype_name} | {'shifted' if shifted else 'unshifted'} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
