"""`adaptsr merge`: fold adapters into their base model, a plain checkpoint spandrel opens."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptsr.cli._common import (
    _DTYPES,
    _PRECISIONS,
    CommandError,
    _adapters_and_strengths,
    _add_model_flags,
    _load,
    _weighted_sum,
)


def _merge(args: argparse.Namespace) -> int:
    import torch

    import adaptsr

    out = Path(args.out)
    if out.suffix.lower() not in (".safetensors", ".pth"):
        raise CommandError(f"--out {out} must end in .safetensors or .pth")
    descriptor = _load(args, merge=False)
    # merges a copy in fp32, then stores it in the precision asked for; writes atomically
    adaptsr.save_model(descriptor, out, dtype=getattr(torch, _DTYPES[args.precision]))
    print(f"wrote {out}: {descriptor.architecture.name} x{descriptor.scale} with "
          f"{_weighted_sum(*_adapters_and_strengths(args))} merged in"
          + ("" if args.precision == "fp32" else f", weights in {args.precision}"))
    return 0


def add_merge_command(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold an adapter into its base model: a plain checkpoint spandrel opens",
        description=(
            "Merge the LoRA adapter into the base weights and write a dense checkpoint with the original "
            "architecture's keys, which spandrel (chaiNNer, ComfyUI, ...) opens like the original; inference "
            "costs what the base model costs."
        ),
    )
    _add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="output checkpoint, .safetensors or .pth")
    p.add_argument(
        "--precision", choices=_PRECISIONS, default="fp32",
        help="store the merged floating-point weights in this precision (merged in fp32 first): fp16/bf16 halve "
             "the file, and spandrel loads them into an fp32 model as usual (default: fp32)",
    )
    p.set_defaults(func=_merge, device="cpu")
