"""`adaptsr bench`: what one training step costs, per method and backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptsr.cli._common import (
    CommandError,
    _add_amp_flag,
    _add_device_flag,
    _add_lora_flags,
    _lora_options,
    _nonneg_int,
)


def add_bench_command(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time one training step: frozen, full fine-tuning and LoRA on each backend",
        description=(
            "Time the training step 'adaptsr adapt' runs (forward, L1 loss, backward, clipping, AdamW) on random "
            "batches for the frozen model, full fine-tuning and LoRA under each backend, in interleaved rounds, and "
            "print medians with their ratio to the frozen model's forward + backward (peak memory on CUDA). Every "
            "method's input requires grad, so each does at least the frozen network's work."
        ),
    )
    p.add_argument("--model", default="swinir", metavar="CKPT",
                   help="checkpoint (.safetensors/.pth) spandrel loads, or a bundled model: swinir, rrdb "
                        "(default: swinir)")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated adaptsr backends for the LoRA rows (default: torch, plus triton and cuda "
                        "where they run on --device, and auto there with ADAPTSR_AUTOTUNE=1, whose choices are "
                        "printed under the table)")
    _add_lora_flags(p)
    p.add_argument("--no-full-finetune", action="store_true", help="leave out the full fine-tuning row")
    p.add_argument("--gan", action="store_true",
                   help="add a row for adapt --gan's step on the first backend: L1 + VGG perceptual + GAN losses and "
                        "the discriminator's step (the VGG19 ImageNet weights are downloaded on first use)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--patch", type=int, default=32, help="LR patch size in pixels (default: 32)")
    p.add_argument("--micro-batch", type=_nonneg_int, default=0, metavar="N",
                   help="run each step as adapt --micro-batch N does, N crops at a time: the saved activations are "
                        "then one piece's (default: 0, the whole batch at once)")
    _add_amp_flag(p)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds, each one step of every method (default: 10)")
    p.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed steps per method first (default: 2)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    _add_device_flag(p)
    p.set_defaults(func=_bench)


def _bench_model(name_or_path: str):
    import adaptsr
    from adaptsr.demo import bundled_model_path

    path = Path(name_or_path)
    if not path.exists() and not path.suffix:  # a bare name: one of the bundled models
        try:
            path = bundled_model_path(name_or_path)
        except ValueError as err:
            raise CommandError(
                f"--model {name_or_path} is neither a checkpoint file nor a bundled model: {err}"
            ) from err
    return adaptsr.load_model(path)


def _bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from adaptsr import autotune
    from adaptsr.bench import bench_training_step, format_bench_table, rows_as_dicts
    from adaptsr.io import atomic_write

    descriptor = _bench_model(args.model)
    backends = args.backends.split(",") if args.backends else None
    rows = bench_training_step(
        descriptor, backends=backends, **_lora_options(args),
        full_finetune=not args.no_full_finetune, batch_size=args.batch_size, patch=args.patch, device=args.device,
        amp=args.amp, rounds=args.rounds, warmup=args.warmup, gan=args.gan, micro_batch=args.micro_batch,
    )
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    pieces = f" in micro-batches of {args.micro_batch}" if 0 < args.micro_batch < args.batch_size else ""
    print(f"{descriptor.architecture.name} x{descriptor.scale}, batch {args.batch_size} of {args.patch}x{args.patch} "
          f"LR patches{pieces}, LoRA rank {args.rank}, {where}, torch {torch.__version__}; medians of {args.rounds} "
          "rounds")
    print(format_bench_table(rows))
    tuned = autotune.measurements() if autotune.enabled() else []
    if tuned:  # what the "auto" row ran, op by op
        print(autotune.summary(tuned))
    if args.json:
        report = {"model": args.model, "device": where, "batch_size": args.batch_size, "patch": args.patch,
                  "micro_batch": args.micro_batch, "rank": args.rank, "amp": args.amp, "rounds": args.rounds,
                  "rows": rows_as_dicts(rows)}
        if autotune.enabled():
            report["autotune"] = tuned
        text = json.dumps(report, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0
