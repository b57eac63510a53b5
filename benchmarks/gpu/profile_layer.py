"""Where a LoRA training step spends its GPU time: torch.profiler's kernel table per op and backend.

For each op at its issue shape (conv 3x3 64->64 on 16x64x128x128 channels-last, linear 180->540 on
65,536 tokens, the SwinIR-M window-attention core: 1024 windows x 6 heads, 64 tokens, head dim 30),
the frozen layer and the LoRA layer on every backend that runs here, bf16: five forward + backward
steps, and the ten kernels that took the most GPU time. When a layer misses its target, this says
whether the dense parts (cuDNN, cuBLAS), our kernels or the launches between them are the cause.

    python benchmarks/gpu/profile_layer.py [--ops conv,linear,attention] [--backends torch,triton,cuda]

``--smoke`` runs tiny shapes on the CPU (the torch backend, CPU time), to check the script itself.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import adaptsr
from adaptsr.backend import is_available
from adaptsr.bench import sync_device
from adaptsr.ops.window_attention import window_attention

STEPS = 5


def _conv_layers(device, dtype, smoke: bool):
    batch, channels, size = (2, 8, 16) if smoke else (16, 64, 128)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    base = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    return x.requires_grad_(True), base, adaptsr.LoRAConv2d(base_layer=base, rank=8, init_lora_weights=False)


def _linear_layers(device, dtype, smoke: bool):
    tokens, features_in, features_out = (256, 12, 36) if smoke else (65536, 180, 540)
    x = torch.randn(tokens, features_in, device=device, dtype=dtype)
    base = torch.nn.Linear(features_in, features_out).to(device, dtype)
    return x.requires_grad_(True), base, adaptsr.LoRALinear(base_layer=base, rank=8, init_lora_weights=False)


def _attention_inputs(device, dtype, smoke: bool):
    windows, heads, tokens, head_dim = (4, 2, 16, 6) if smoke else (1024, 6, 64, 30)
    q, k, v = (torch.randn(windows, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    side = int(tokens ** 0.5)
    table = torch.randn((2 * side - 1) ** 2, heads, device=device, dtype=torch.float32)
    index = torch.randint(0, table.shape[0], (tokens, tokens), device=device)
    return q, k, v, table, index, head_dim ** -0.5


def _steps(op: str, backend: str | None, device, dtype, smoke: bool):
    """A function running one forward + backward of ``op`` (the frozen layer when ``backend`` is None)."""
    if op == "attention":
        q, k, v, table, index, scale = _attention_inputs(device, dtype, smoke)
        do = torch.randn_like(q)

        def step():
            with adaptsr.set_backend(backend or "torch"):
                window_attention(q, k, v, table, index, None, scale).backward(do)
        return step
    x, base, lora = (_conv_layers if op == "conv" else _linear_layers)(device, dtype, smoke)
    layer = base.requires_grad_(False) if backend is None else lora
    dy = torch.randn_like(base(x))

    def step():
        with adaptsr.set_backend(backend or "torch"):
            layer(x).backward(dy)
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="conv,linear,attention", help="comma-separated: conv, linear, attention")
    parser.add_argument("--backends", default="torch,triton,cuda",
                        help="comma-separated; those not available are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        activity, column = ProfilerActivity.CPU, "cpu_time_total"
    else:
        activity, column = ProfilerActivity.CUDA, "cuda_time_total"
    backends = [b for b in args.backends.split(",")
                if b in ("torch", "reference") or (is_available(b) and not args.smoke)]
    for op in args.ops.split(","):
        # the attention core has no frozen form: its "frozen" row is the torch backend's
        for backend in ([] if op == "attention" else [None]) + backends:
            step = _steps(op, backend, device, dtype, args.smoke)
            for _ in range(3):  # compilation, autotuning, allocator growth
                step()
            sync_device(device)
            with profile(activities=[activity]) as prof:
                for _ in range(STEPS):
                    step()
                sync_device(device)
            if backend is None:
                label = "frozen"
            else:
                label = f"backend {backend}" if op == "attention" else f"LoRA, backend {backend}"
            print(f"== {op}: {label}, {STEPS} steps of forward + backward, {str(dtype).removeprefix('torch.')}")
            print(prof.key_averages().table(sort_by=column, row_limit=10, max_name_column_width=70))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
