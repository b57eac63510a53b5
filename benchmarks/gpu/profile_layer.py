"""Where a LoRA conv layer's training step spends its GPU time: torch.profiler's kernel table.

``python benchmarks/gpu/profile_layer.py [--backend torch|triton] [--channels 64]``
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import adaptsr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    c, s = args.channels, args.size
    x = torch.randn(16, c, s, s, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    base = torch.nn.Conv2d(c, c, 3, padding=1).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    layers = {"frozen": base.requires_grad_(False),
              "lora": adaptsr.LoRAConv2d(base_layer=base, rank=8, init_lora_weights=False)}
    dy = torch.randn_like(base(x))
    for name, layer in layers.items():
        def step():
            with adaptsr.set_backend(args.backend):
                layer(x).backward(dy)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== {name} ({args.backend}), 5 steps, {c} channels")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=70))


if __name__ == "__main__":
    main()
