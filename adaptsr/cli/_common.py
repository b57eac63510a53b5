"""What the commands share: the user-error type, common flags, loading a model with its adapters."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

PROG = "adaptsr"


class CommandError(Exception):
    """A user error: ``main`` prints the message on one line and exits with code 1."""


def _add_model_flags(parser: argparse.ArgumentParser, *, adapter_required: bool = False) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="base (or merged) model checkpoint, .safetensors or .pth, any architecture spandrel loads",
    )
    parser.add_argument(
        "--adapter",
        required=adapter_required,
        action="append",
        metavar="DIR",
        help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors) trained on --model"
        + ("" if adapter_required else "; omit to use the model as it is")
        + "; repeat it to apply the weighted sum of several (e.g. a PSNR-trained and a GAN-trained adapter)",
    )
    parser.add_argument(
        "--strength", type=_finite_float, action="append", metavar="S",
        help="scale the adapter's update: 1 (default) as trained, 0 the base model, in between a blend of the two "
             "(e.g. 0.7 when the adapted model overdoes it on your images); with several --adapter, one --strength "
             "each, in the same order, is required: the weights of the sum",
    )


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device to run the model on, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )


def _pattern_value(cast):
    """argparse type for ``REGEX=VALUE`` (PEFT's rank_pattern / alpha_pattern entries)."""

    def parse(text: str) -> tuple[str, float]:
        pattern, sep, value = text.rpartition("=")
        try:
            if not sep or not pattern:
                raise ValueError
            return pattern, cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not REGEX={cast.__name__.upper()}") from None

    return parse


def _add_lora_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="LoRA target preset (default: the one for the model's architecture)")
    parser.add_argument("--targets", metavar="REGEX", help="LoRA targets: a regex matched in full against layer names")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--alpha", type=float,
                        help="LoRA alpha (default: the rank, so scaling 1; sqrt(rank) with --use-rslora)")
    parser.add_argument(
        "--rank-pattern", type=_pattern_value(int), action="append", default=[], metavar="REGEX=RANK",
        help="another rank for the layers whose name ends in a match of REGEX (PEFT's rank_pattern); repeatable",
    )
    parser.add_argument(
        "--alpha-pattern", type=_pattern_value(float), action="append", default=[], metavar="REGEX=ALPHA",
        help="another alpha for the layers whose name ends in a match of REGEX (PEFT's alpha_pattern); repeatable",
    )
    parser.add_argument("--use-rslora", action="store_true", help="scaling alpha/sqrt(rank) instead of alpha/rank")
    parser.add_argument("--use-dora", action="store_true",
                        help="DoRA adapters (PEFT's use_dora): a trained magnitude per output channel on top of the "
                             "low-rank direction; merges into a dense checkpoint like LoRA")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                        help="dropout on the adapters' input while training (default: 0; above 0 the adapters run "
                             "as a second path, the reference form)")


def _lora_options(args: argparse.Namespace) -> dict:
    """inject_lora's keyword arguments from the LoRA flags."""
    return {
        "preset": args.preset, "targets": args.targets, "rank": args.rank, "alpha": args.alpha,
        "rank_pattern": dict(args.rank_pattern) or None, "alpha_pattern": dict(args.alpha_pattern) or None,
        "use_rslora": args.use_rslora, "lora_dropout": args.lora_dropout, "use_dora": args.use_dora,
    }


def _add_amp_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast (auto: on CUDA)")


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch dtype names: torch loads lazily
_PRECISIONS = tuple(_DTYPES)


def _add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", choices=_PRECISIONS, default="fp32",
        help="the model's precision: fp16/bf16 halve its memory and run faster on GPUs where the architecture "
             "supports them (an adapter is merged in fp32 first; default: fp32)",
    )


def _add_tile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tile", type=_tile_size, default="auto", metavar="N",
        help="upscale in N x N input-pixel tiles to bound memory; 0: whole images at once; auto (the default): "
             "whole images, and where the device runs out of memory, tiles of half the image's longer side, "
             "halved again until they fit",
    )
    parser.add_argument(
        "--overlap", type=_nonneg_int, default=32, metavar="N",
        help="overlap of neighbouring tiles in input pixels, blended smoothly (default: 32; at most N/2)",
    )


def _add_self_ensemble_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--self-ensemble", action="store_true",
        help="upscale each image (or tile) in its 8 flips and quarter turns and average the results, turned "
             "back: the papers' \"+\" scores (SwinIR+, HAT-L+); 8 times the time, usually a little more PSNR",
    )


def _adapters_and_strengths(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """The --adapter directories and one strength each (1 where none is given)."""
    adapters = getattr(args, "adapter", None) or []
    strengths = getattr(args, "strength", None) or []
    if not adapters and strengths:
        raise CommandError(f"--strength {strengths[0]:g} scales an adapter: pass --adapter DIR")
    if len(adapters) > 1 and not strengths:  # a blend and a stack are both common: make the user say which
        raise CommandError(f"{len(adapters)} --adapter need one --strength each, in the same order: e.g. 0.5 and 0.5 "
                           "to blend two adapters, 1 and 1 to apply both in full")
    if strengths and len(strengths) != len(adapters):
        raise CommandError(f"{len(adapters)} --adapter and {len(strengths)} --strength: give one --strength per "
                           "--adapter, in the same order")
    return adapters, strengths or [1.0]


def _which_adapters(adapters: list[str]) -> str:
    """'adapter A does' / 'adapters A, B do', for an error message."""
    return f"adapter {adapters[0]} does" if len(adapters) == 1 else f"adapters {', '.join(adapters)} do"


def _weighted_sum(adapters: list[str], strengths: list[float]) -> str:
    """'the adapter', 'the adapter at strength 0.5' or '0.6 x A + 0.4 x B'."""
    if len(adapters) == 1:
        return "the adapter" + ("" if strengths[0] == 1.0 else f" at strength {strengths[0]:g}")
    return " + ".join(f"{w:g} x {a}" for a, w in zip(adapters, strengths))


def _load(args: argparse.Namespace, *, merge: bool = True, precision: str = "fp32"):
    """The model (spandrel descriptor) with the adapter loaded and, by default, merged for speed, in
    ``precision`` (one of ``_PRECISIONS``)."""
    import torch

    import adaptsr

    descriptor = adaptsr.load_model(args.model)
    adapters, strengths = _adapters_and_strengths(args)
    try:
        if len(adapters) == 1:
            adaptsr.load_adapter(descriptor, adapters[0])
            adaptsr.set_adapter_strength(descriptor, strengths[0])
        elif adapters:
            adaptsr.combine_adapters(descriptor, adapters, strengths)
    except ValueError as err:
        raise CommandError(f"{_which_adapters(adapters)} not fit model {args.model}: {err}") from err
    if adapters and merge:
        adaptsr.merge_lora(descriptor)
    if precision != "fp32":
        # spandrel records per architecture whether it runs in 16 bits (some overflow or call fp32-only ops)
        supported = {"fp32": True, "fp16": descriptor.supports_half, "bf16": descriptor.supports_bfloat16}
        if not supported[precision]:
            usable = " or ".join(name for name, ok in supported.items() if ok)
            raise CommandError(f"{descriptor.architecture.name} ({args.model}) does not run in {precision}: spandrel "
                               f"marks it unsupported; use --precision {usable}")
        descriptor.to(getattr(torch, _DTYPES[precision]))
    return descriptor.to(args.device).eval()


def _check_distinct_outputs(files: list[Path], extension: str, what: str) -> None:
    """Each input writes <stem><extension>: two inputs with one stem (a.png, a.jpg) would write one file."""
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        raise CommandError(f"several {what} would write {dupes[0]}{extension}; rename them")


def _is_same_file(a: Path, b: Path) -> bool:
    """Whether writing ``a`` would replace ``b``: the same path, a symbolic or a hard link to it."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _input_images(path: str) -> list[Path]:
    """A file, or the image files in a folder."""
    from adaptsr.data.images import list_images

    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise CommandError(f"input {p} does not exist")
    return list_images(p)


def _print_columns(rows: list[tuple[str, ...]], *, left: int) -> None:
    """``rows`` (the header first) in aligned columns: the first ``left`` to the left, the rest (numbers) right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) if i < left else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def _nonneg_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = _nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a positive number")
    return value


def _tile_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels (0: whole images) nor auto") \
            from None


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value
