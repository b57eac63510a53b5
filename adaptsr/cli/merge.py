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
    _is_same_file,
    _load,
    _weighted_sum,
)


def _merge(args: argparse.Namespace) -> int:
    import torch

    import adaptsr

    out = Path(args.out)
    if out.suffix.lower() not in (".safetensors", ".pth"):
        raise CommandError(f"--out {out} must end in .safetensors or .pth")
    if _is_same_file(out, Path(args.model)):
        raise CommandError(f"--out {out} is the --model checkpoint: writing it would lose the base, which the "
                           "adapter needs; write the merged model elsewhere")
    descriptor = _load(args, merge=False)
    # merges a copy in fp32, then stores it in the precision asked for; writes atomically
    dtype = getattr(torch, _DTYPES[args.precision]) if args.precision else None
    if args.layout == "spandrel":
        adaptsr.save_model(descriptor, out, dtype=dtype or torch.float32)
        notes = []
    else:
        notes = adaptsr.save_model(descriptor, out, dtype=dtype, like=args.model)
    print(f"wrote {out}: {descriptor.architecture.name} x{descriptor.scale} with "
          f"{_weighted_sum(*_adapters_and_strengths(args))} merged in"
          + (f", weights in {args.precision}" if args.precision and args.precision != "fp32" else "")
          + (f", in the layout of {args.model}" if args.layout == "base" else ", in spandrel's layout"))
    for note in notes:
        print(f"  note: {note}")
    return 0


def add_merge_command(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold an adapter into its base model: a plain checkpoint spandrel opens",
        description=(
            "Merge the LoRA adapter into the base weights and write a dense checkpoint that opens wherever the base "
            "did, at the base's inference cost: by default in the base file's own layout (its wrapper, such as "
            "BasicSR's params_ema, its key names and dtypes, with the adapted weights replaced), so the "
            "architecture's own code (Real-ESRGAN, BasicSR, the SwinIR and HAT repositories) loads it as it loaded "
            "the base, and spandrel (chaiNNer, ComfyUI, ...) too; --layout spandrel writes spandrel's module keys."
        ),
    )
    _add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="output checkpoint, .safetensors or .pth")
    p.add_argument(
        "--layout", choices=("base", "spandrel"), default="base",
        help="base: the --model file's layout, nesting dropped in a .safetensors --out (default); spandrel: "
             "spandrel's module's keys, flat",
    )
    p.add_argument(
        "--precision", choices=_PRECISIONS,
        help="store the merged floating-point weights in this precision (merged in fp32 first): fp16/bf16 halve "
             "the file, and spandrel loads them into an fp32 model as usual (default: the base file's with "
             "--layout base, fp32 with --layout spandrel)",
    )
    p.set_defaults(func=_merge, device="cpu")
