"""Command-line interface: ``adaptsr <command>``.

Each command is added by an ``add_<name>_command(subparsers)`` function that creates its parser
and sets ``func`` (``args -> exit code``) as a default. Errors a user can cause (a missing file, an
adapter for another model, an unreadable image, an unknown metric) are raised as ValueError /
OSError / MissingWeightsError and reported by ``main`` as one line on stderr with exit code 1;
outputs are written atomically, so a failed run leaves no half-written file. Heavy imports
(pyiqa, the model code) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from pathlib import Path

PROG = "adaptsr"


class CommandError(Exception):
    """A user error: ``main`` prints the message on one line and exits with code 1."""


# -- shared helpers --


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
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, so scaling 1)")
    parser.add_argument(
        "--rank-pattern", type=_pattern_value(int), action="append", default=[], metavar="REGEX=RANK",
        help="another rank for the layers whose name ends in a match of REGEX (PEFT's rank_pattern); repeatable",
    )
    parser.add_argument(
        "--alpha-pattern", type=_pattern_value(float), action="append", default=[], metavar="REGEX=ALPHA",
        help="another alpha for the layers whose name ends in a match of REGEX (PEFT's alpha_pattern); repeatable",
    )
    parser.add_argument("--use-rslora", action="store_true", help="scaling alpha/sqrt(rank) instead of alpha/rank")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                        help="dropout on the adapters' input while training (default: 0; above 0 the adapters run "
                             "as a second path, the reference form)")


def _lora_options(args: argparse.Namespace) -> dict:
    """inject_lora's keyword arguments from the LoRA flags."""
    return {
        "preset": args.preset, "targets": args.targets, "rank": args.rank, "alpha": args.alpha,
        "rank_pattern": dict(args.rank_pattern) or None, "alpha_pattern": dict(args.alpha_pattern) or None,
        "use_rslora": args.use_rslora, "lora_dropout": args.lora_dropout,
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
        "--tile", type=_nonneg_int, default=0, metavar="N",
        help="upscale in N x N input-pixel tiles to bound memory (0, the default: whole images at once)",
    )
    parser.add_argument(
        "--overlap", type=_nonneg_int, default=32, metavar="N",
        help="overlap of neighbouring tiles in input pixels, blended smoothly (default: 32; at most N/2)",
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


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


# -- demo --


def _demo(args: argparse.Namespace) -> int:
    from adaptsr.demo import run_demo

    run_demo(model=args.model, profile=args.profile, steps=args.steps, rank=args.rank, out=args.out, seed=args.seed,
             quick=args.quick, device=args.device)
    return 0


def add_demo_command(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="adapt the bundled model to a degraded camera profile and report",
        description=(
            "Degrade the bundled held-out photos with a camera profile, score the bundled bicubic-trained model "
            "on them, adapt it with LoRA on the bundled train photos for a few minutes, merge, score again, and "
            "print the table. Nothing is downloaded."
        ),
    )
    demo.add_argument("--model", default="swinir", help="bundled base model: swinir (default) or rrdb")
    demo.add_argument("--profile", default="lowlight", metavar="PRESET|FILE",
                      help="degradation to adapt to: lowlight (default), camera, mild, realesrgan, or a JSON file as "
                           "adapt --degradation takes")
    demo.add_argument("--steps", type=int, help="training steps (default: 300 on a CPU, 2000 on a GPU)")
    demo.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    demo.add_argument("--out", default="adaptsr-demo", help="output folder (default: ./adaptsr-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the degradations and the training (default: 0)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run on crops (what the tests run)")
    demo.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    demo.set_defaults(func=_demo)


# -- eval --


_STEM_TAGS = re.compile(r"([_\-.]?(lr|hr)\d*|[_\-.]?x\d+)$", re.IGNORECASE)


def _pair_key(path: Path) -> str:
    """The name an LR and its HR image share: the stem without _LR4 / _HR / x4 style tags (RealSR naming)."""
    stem = path.stem
    while True:
        shorter = _STEM_TAGS.sub("", stem)
        if shorter == stem or not shorter:
            return stem.lower()
        stem = shorter


def _paired_files(lr_dir: str, hr_dir: str) -> list[tuple[str, Path, Path]]:
    from adaptsr.data.images import list_images

    for d, what in ((lr_dir, "LR"), (hr_dir, "HR")):
        if not Path(d).is_dir():
            raise CommandError(
                f"{what} folder {d} does not exist" if not Path(d).exists() else f"{what} path {d} is not a folder"
            )
    lrs, hrs = list_images(lr_dir), list_images(hr_dir)
    by_key: dict[str, Path] = {}
    for hr in hrs:
        key = _pair_key(hr)
        if key in by_key:
            raise CommandError(f"HR images {by_key[key].name} and {hr.name} in {hr_dir} have the same name")
        by_key[key] = hr
    pairs = []
    for lr in lrs:
        hr = by_key.get(_pair_key(lr))
        if hr is None:
            raise CommandError(f"LR image {lr} has no HR image of the same name in {hr_dir}")
        pairs.append((lr.stem, lr, hr))
    return pairs


def _eval(args: argparse.Namespace) -> int:
    from adaptsr import evaluate
    from adaptsr.data.images import read_image

    metrics = evaluate._check_names(args.metrics.split(","))  # unknown names fail before any work
    if args.pairs is not None:
        files = _paired_files(*args.pairs)
        model = _load(args, precision=args.precision)
        dataset = ((name, read_image(lr), read_image(hr)) for name, lr, hr in files)
    else:
        if not args.degradation:
            raise CommandError("--hr needs --degradation PRESET|FILE (the degradation that makes the LR images)")
        from adaptsr.data.datasets import CachedValidationSet
        from adaptsr.data.degradation_files import mixture_of
        from adaptsr.data.degradations import degrade

        config = mixture_of(args.degradation)  # unknown name or bad file: ValueError saying which
        model = _load(args, precision=args.precision)

        def degrade_fn(hr, scale, generator):
            return degrade(hr, scale, config, generator)

        cache = Path(args.cache) if args.cache else Path(args.out) / "lr-cache"
        validation = CachedValidationSet(
            args.hr,
            model.scale,
            degrade_fn,
            degrade_id=f"{','.join(args.degradation)}:{config!r}",
            cache_dir=cache,
            seed=args.seed,
        )
        dataset = ((name, *validation[i]) for i, name in enumerate(validation.names))
    result = evaluate.evaluate_pairs(
        metrics=metrics,
        model=model,
        dataset=dataset,
        tile=args.tile or None,
        overlap=args.overlap,
        device=args.device,
        download=not args.offline,
    )
    if not result["metrics"]:
        for reason in result["skipped"].values():
            print(f"{PROG} eval: {reason}", file=sys.stderr)
        raise CommandError("none of the requested metrics could run (see above)")
    json_path, csv_path = evaluate.write_results(result, args.out)
    print(evaluate.format_table(result))
    print(f"wrote {json_path} and {csv_path}")
    for name in result["skipped"]:
        print(f"{PROG} eval: warning: {name} was skipped (reason in the table above)", file=sys.stderr)
    return 0


def add_eval_command(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model (base, base + adapter, or merged) with PSNR/SSIM and any pyiqa metric",
        description=(
            "Upscale every LR image, score it against its HR image and print a table; write metrics.json "
            "and metrics.csv to --out. psnr and ssim follow the SR convention: Y channel of YCbCr, border of "
            "<scale> pixels cropped. Other pyiqa metrics by name (lpips, dists, niqe, musiq, ...); one whose "
            "weights cannot be found or downloaded is skipped with a message saying which file to put where."
        ),
    )
    _add_model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--pairs",
        nargs=2,
        metavar=("LR_DIR", "HR_DIR"),
        help="two folders of LR and HR images matched by name (a.png / a.png, or RealSR's a_LR4.png / a_HR.png)",
    )
    source.add_argument(
        "--hr", metavar="HR_DIR", help="a folder of HR images, degraded into LR images with --degradation"
    )
    p.add_argument(
        "--degradation",
        action="append",
        metavar="PRESET|FILE",
        help="degradation that makes the LR images from --hr: a preset (realesrgan, mild, camera, lowlight) or a "
        "JSON file (e.g. {\"camera_profile\": {\"blur_sigma\": 1.0, \"noise\": 15, \"jpeg_quality\": 70}}); "
        "repeated, each image draws one of them; the LR images are generated once from --seed and cached, so "
        "every evaluation of the set is comparable",
    )
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the --hr degradation (default: 0)")
    p.add_argument(
        "--cache", metavar="DIR", help="folder for the cached degraded LR images of --hr (default: <out>/lr-cache)"
    )
    p.add_argument(
        "--metrics",
        default="psnr,ssim",
        help="comma-separated pyiqa metric names (default: psnr,ssim); e.g. psnr,ssim,lpips,dists,niqe",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and metrics.csv")
    _add_tile_flags(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="never download metric weights; metrics whose weights are missing are skipped",
    )
    _add_device_flag(p)
    _add_precision_flag(p)
    p.set_defaults(func=_eval)


# -- upscale --


def _upscale_alpha(alpha, size):
    """A transparency channel at the output size: bicubic, not the SR model, which was trained on colour
    (and a second model pass would double the time for a channel that is mostly flat)."""
    import torch.nn.functional as F

    return F.interpolate(alpha, size=tuple(size), mode="bicubic", align_corners=False).clamp(0, 1)


def _upscale(args: argparse.Namespace) -> int:
    import torch

    from adaptsr.data.images import image_size, read_image, write_png
    from adaptsr.infer import upscale

    files = _input_images(args.input)
    for path in files:  # catch an unreadable file (from its header) before spending time on the others
        image_size(path)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        dupes = sorted({s for s in stems if stems.count(s) > 1})
        raise CommandError(f"several inputs would write {dupes[0]}.png; rename them")
    model = _load(args, precision=args.precision)
    for path in files:
        image = read_image(path, alpha=True).unsqueeze(0)
        result = upscale(model, image[:, :3], tile=args.tile or None, overlap=args.overlap)
        if image.shape[1] == 4:
            result = torch.cat([result, _upscale_alpha(image[:, 3:], result.shape[-2:])], dim=1)
        target = out / f"{path.stem}.png"
        write_png(result[0], target)
        print(f"{path} -> {target} ({result.shape[-1]}x{result.shape[-2]})")
    return 0


def add_upscale_command(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="upscale an image or a folder of images to PNGs",
        description=(
            "Upscale INPUT (an image file, or every image in a folder) with the model (base, base + adapter, "
            "or merged) and write <name>.png to --out. --tile bounds memory on large images: tiles overlap and "
            "are blended, so no seams show. Transparent images stay transparent: the model upscales the colour, "
            "bicubic interpolation the alpha channel."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="an image file (png, jpg, bmp, tif, webp) or a folder of them")
    _add_model_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the upscaled PNGs (created if missing)")
    _add_tile_flags(p)
    _add_device_flag(p)
    _add_precision_flag(p)
    p.set_defaults(func=_upscale)


# -- merge --


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


# -- combine --


def _combine(args: argparse.Namespace) -> int:
    import adaptsr

    adapters, strengths = _adapters_and_strengths(args)
    out = Path(args.out)
    if any(Path(a).resolve() == out.resolve() for a in adapters):
        raise CommandError(f"--out {out} is one of the --adapter directories; write the combination elsewhere")
    descriptor = adaptsr.load_model(args.model)
    try:
        summary = adaptsr.combine_adapters(descriptor, adapters, strengths, rank=args.rank)
    except ValueError as err:
        raise CommandError(f"{_which_adapters(adapters)} not fit model {args.model}: {err}") from err
    adaptsr.save_adapter(descriptor, out)  # atomically, file by file
    ranks = sorted(set(summary.layers.values()))
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    print(f"wrote {out}: {_weighted_sum(adapters, strengths)} as one adapter on {len(summary.layers)} layers "
          f"({rank}, {summary.trainable_params:,} parameters)")
    return 0


def add_combine_command(subparsers) -> None:
    p = subparsers.add_parser(
        "combine",
        help="one adapter that applies the weighted sum of several trained on the same model",
        description=(
            "Write one adapter whose update is the weighted sum of the --adapter updates (one --strength each, "
            "in the same order): e.g. 0.7 x a PSNR-trained adapter + 0.3 x a GAN-trained one, ESRGAN's network "
            "interpolation between fidelity and texture, or a blend of two cameras' adapters. "
            "Exact: the factors are concatenated along the rank (PEFT's add_weighted_adapter 'cat'), so its rank "
            "is the sum of theirs, at most what each layer allows; --rank caps it, keeping the sum's best "
            "approximation of that rank (SVD; with one --adapter, a smaller copy of it). eval, upscale and merge "
            "take several --adapter directly; this writes the combination as a PEFT LoRA adapter of its own."
        ),
    )
    _add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the combined adapter")
    p.add_argument("--rank", type=_positive_int, metavar="R",
                   help="at most this rank per layer: a layer whose combination needs more keeps its best rank-R "
                        "approximation (lossy, smaller; default: exact, the ranks' sum)")
    p.set_defaults(func=_combine)


# -- estimate --


def _estimate(args: argparse.Namespace) -> int:
    from adaptsr.data.estimate import estimate_camera_profile

    paths = _input_images(args.input)  # an empty folder: ValueError naming it
    estimate = estimate_camera_profile(paths, blur_sigma=args.blur_sigma)
    rows = [("image", "JPEG quality", "measured noise")]
    for image in estimate.images:
        quality = "none" if image["jpeg_quality"] is None else (
            f"{image['jpeg_quality']}" + ("" if image["ijg_exact"] else " (nearest IJG)"))
        rows.append((image["name"], quality, f"{image['measured_noise']:.2f}"))
    _print_columns(rows, left=1)
    _write_profile(estimate, args.out)
    print(f"camera profile: blur sigma {estimate.blur_sigma:g} (given, not measured), noise {estimate.noise:.1f} "
          f"(8-bit sigma before JPEG, calibrated), JPEG quality {estimate.jpeg_quality}"
          + ("" if any(i["jpeg_quality"] is not None for i in estimate.images) else " (no JPEG tables: uncompressed)")
          + f"; wrote {args.out} (adaptsr adapt --degradation {args.out})")
    return 0


def _write_profile(estimate, path) -> None:
    """The estimate in the short camera-profile form a person reads and edits (atomically)."""
    import json

    from adaptsr.io import atomic_write

    text = json.dumps(estimate.to_dict(), indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def add_estimate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="estimate a camera profile (noise, JPEG quality) from a camera's LR images, as a degradation file",
        description=(
            "Read the JPEG quality from the files' quantisation tables and estimate the noise added before JPEG "
            "(a wavelet estimate, calibrated on the bundled photos at that quality), and write a camera-profile "
            "degradation file for 'adaptsr adapt --degradation FILE': adapting to a camera from its own photos, "
            "with no HR pairs. Blur is not measured (--blur-sigma)."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="an image file or a folder of images from one camera")
    p.add_argument("--out", required=True, metavar="FILE", help="the degradation file to write (JSON)")
    p.add_argument("--blur-sigma", type=_finite_float, default=1.2, metavar="S",
                   help="the profile's Gaussian blur in HR pixels, which images alone cannot tell apart from soft "
                        "scenes (default: 1.2, the camera presets')")
    p.set_defaults(func=_estimate)


# -- layers --


def _layer_shape(layer) -> str:
    """``in -> out`` and, for a conv, its kernel and the options that differ from the default."""
    if not hasattr(layer, "kernel_size"):
        return f"{layer.in_features} -> {layer.out_features}"
    text = f"{layer.in_channels} -> {layer.out_channels}, {'x'.join(map(str, layer.kernel_size))}"
    for option, default in (("stride", (1, 1)), ("output_padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1)):
        value = getattr(layer, option, default)
        if value != default:
            text += f", {option} {'x'.join(map(str, value)) if isinstance(value, tuple) else value}"
    return text


def _layers(args: argparse.Namespace) -> int:
    import adaptsr
    from adaptsr.inject import _WRAPPERS
    from adaptsr.presets import ARCHITECTURE_PRESETS

    descriptor = adaptsr.load_model(args.model)
    architecture = descriptor.architecture
    # the names and shapes before injection: a wrapped layer keeps its name, its base layer moves one level down
    plain = [(name, m) for name, m in descriptor.model.named_modules() if type(m) in _WRAPPERS]
    options = _lora_options(args)
    if options["preset"] is None and options["targets"] is None:
        options["preset"] = ARCHITECTURE_PRESETS.get(architecture.id)
    adapted: dict[str, tuple[int, int]] = {}  # name -> (rank, adapter parameters)
    if options["preset"] is None and options["targets"] is None:
        headline = (f"no LoRA preset for {architecture.name}: choose layers with --targets REGEX (a regex matched "
                    "in full against the names below)")
    else:
        summary = adaptsr.inject_lora(descriptor, **options)
        for name, layer in adaptsr.lora_layers(descriptor.model):
            adapted[name] = (layer.rank, layer.lora_A.numel() + layer.lora_B.numel())
        chosen = f"preset {options['preset']}" if options["preset"] else ""
        if options["targets"]:
            chosen += (" and " if chosen else "") + f"--targets {options['targets']}"
        headline = f"{chosen}: {summary}"
    print(f"{architecture.name} x{descriptor.scale} ({args.model}), {len(plain)} layers LoRA can wrap; {headline}")

    rows = [("layer", "type", "shape", "rank", "adapter params")]
    for name, layer in plain:
        if args.adapted and name not in adapted:
            continue
        rank, size = adapted.get(name, (None, None))
        rows.append((name, type(layer).__name__, _layer_shape(layer), "-" if rank is None else str(rank),
                     "-" if size is None else f"{size:,}"))
    _print_columns(rows, left=3)
    return 0


def add_layers_command(subparsers) -> None:
    p = subparsers.add_parser(
        "layers",
        help="list the model's conv and linear layers and the ones LoRA adapts",
        description=(
            "A dry run of the adapters 'adaptsr adapt' would train: every Conv2d, ConvTranspose2d and Linear layer "
            "of the model (the layer types LoRA wraps) with its shape, and the rank and adapter size of those the "
            "preset or --targets selects. Use it to check a preset, or to write --targets for an architecture "
            "without one."
        ),
    )
    p.add_argument("--model", required=True, metavar="CKPT",
                   help="model checkpoint, .safetensors or .pth, any architecture spandrel loads")
    _add_lora_flags(p)
    p.add_argument("--adapted", action="store_true", help="list only the layers that get an adapter")
    p.set_defaults(func=_layers)


# -- adapt --

# The architectures whose spandrel forward runs torch's checkpoint where use_checkpoint is set.
_CHECKPOINTING_ARCHITECTURES = ("SwinIR",)


def add_adapt_command(subparsers) -> None:
    p = subparsers.add_parser(
        "adapt",
        help="train LoRA adapters (or the whole model) for a degradation or a set of real LR/HR pairs",
        description=(
            "Adapt a pretrained SR model: inject LoRA (or unfreeze everything with --full-finetune), train on "
            "HR images degraded online (--hr with --degradation) or on real LR/HR pairs (--pairs), and write a "
            "run folder with the adapter, the merged model, config.json, metrics.json and checkpoint.pt. "
            "Run under torchrun for several GPUs or processes."
        ),
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="base checkpoint (.safetensors/.pth) spandrel loads")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--hr", metavar="DIR",
                      help="folder of HR images, degraded online with --degradation; 'bundled' for the seven "
                           "bundled photos (no HR images of your own needed: the camera is in --degradation)")
    data.add_argument("--pairs", nargs=2, metavar=("LR_DIR", "HR_DIR"), help="real LR/HR pairs in two folders")
    p.add_argument("--degradation", action="append", metavar="PRESET|FILE",
                   help="degradation for --hr and --val-hr: a preset (camera, the default; lowlight, mild, "
                        "realesrgan) or a JSON file describing your camera, e.g. {\"camera_profile\": "
                        "{\"blur_sigma\": 1.0, \"noise\": 15, \"jpeg_quality\": 70}} (README: custom "
                        "degradations); repeat it to train one adapter on their mixture (each crop draws one); "
                        "recorded in RUN_DIR/degradation.json")
    p.add_argument("--val-hr", metavar="DIR",
                   help="validation HR folder, degraded once (fixed seed) and cached; 'bundled' for the three "
                        "bundled held-out photos")
    p.add_argument("--val-pairs", nargs=2, metavar=("LR_DIR", "HR_DIR"), help="validation LR/HR pairs")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; reused with --resume)")
    _add_lora_flags(p)
    p.add_argument("--allocate-ranks", action="store_true",
                   help="rank-aware allocation: per-layer ranks from the L1 gradients of the first training batches, "
                        "within the parameters of --rank on every layer (written to RUN_DIR/rank_allocation.json)")
    p.add_argument("--allocation-batches", type=int, default=8, metavar="N",
                   help="training batches the rank allocation measures the gradients on (default: 8)")
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of adapters (baseline)")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each Swin block's activations in the backward instead of keeping them (spandrel's "
                        "use_checkpoint; SwinIR): less memory for a slower step")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size, split over processes (default: 8)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps before the cosine decay")
    p.add_argument("--ema-decay", type=_nonneg_float, default=0.0, metavar="D",
                   help="validate and save an exponential moving average of the trained weights with this decay "
                        "(e.g. 0.999, BasicSR's; warmed up over the first steps; default: 0, none)")
    p.add_argument("--patch", type=int, default=32, help="LR patch size of the training crops (default: 32)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between validations (default: only at the end); the best-scoring weights so far are "
                        "kept in RUN_DIR/adapter_best (model_best.safetensors with --full-finetune)")
    p.add_argument("--val-tile", type=_nonneg_int, default=0, metavar="N",
                   help="validate in N x N LR-pixel tiles, overlapping by min(32, N/4) and blended as upscale --tile "
                        "blends them, to bound memory on large validation images (default: whole images)")
    loss = p.add_argument_group("loss (adversarial adaptation, AdaptSR-GAN)")
    loss.add_argument("--gan", action="store_true",
                      help="Real-ESRGAN's recipe: L1 + VGG perceptual loss (weight 1) + GAN loss (weight 0.1) "
                           "against a U-Net discriminator trained alongside; the weights below override it")
    loss.add_argument("--pixel-weight", type=_nonneg_float, default=1.0, metavar="W", help="L1 weight (default: 1)")
    loss.add_argument("--perceptual-weight", type=_nonneg_float, metavar="W",
                      help="VGG19 perceptual loss weight (default: 1 with --gan, else 0); its ImageNet weights are "
                           "downloaded on first use")
    loss.add_argument("--gan-weight", type=_nonneg_float, metavar="W",
                      help="GAN loss weight (default: 0.1 with --gan, else 0)")
    loss.add_argument("--discriminator", metavar="CKPT",
                      help="start the discriminator from these weights (.pth or .safetensors; e.g. Real-ESRGAN's "
                           "RealESRGAN_x4plus_netD.pth, or a run's discriminator.safetensors) instead of a fresh one")
    loss.add_argument("--discriminator-lr", type=float, default=1e-4, metavar="LR",
                      help="the discriminator's Adam learning rate (default: 1e-4)")
    _add_amp_flag(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the adapters' initialisation, crops, degradations and batches (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_adapt)


def _allocated_rank_pattern(args, descriptor, train_set, config, options) -> dict[str, int]:
    """The rank_pattern of --allocate-ranks: measured on the first training batches, or read back from the run
    folder on --resume (the checkpoint holds adapters of those ranks). Under torchrun rank 0 measures and the
    others take its ranks, so every process builds the same adapters."""
    import json

    import torch.distributed as dist

    from adaptsr.io import atomic_write
    from adaptsr.rank_allocation import allocate_ranks, rank_pattern, training_batches
    from adaptsr.train import _init_distributed

    if args.rank_pattern:
        raise CommandError("--allocate-ranks sets every layer's rank: leave out --rank-pattern")
    if args.allocation_batches < 1:
        raise CommandError(f"--allocation-batches must be at least 1, got {args.allocation_batches}")
    path = Path(args.out) / "rank_allocation.json"
    if args.resume and path.is_file():
        print(f"rank allocation read from {path}", flush=True)
        return rank_pattern(json.loads(path.read_text())["ranks"])
    process, world, device = _init_distributed(args.device)
    message = [None]
    if process == 0:
        descriptor.model.to(device)
        allocation = allocate_ranks(
            descriptor, training_batches(train_set, config, args.allocation_batches), rank=args.rank,
            preset=options["preset"], targets=options["targets"],
        )
        print(allocation, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(allocation.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        message = [allocation.rank_pattern()]
    if world > 1:
        dist.broadcast_object_list(message, src=0)
    return message[0]


_BUNDLED = "bundled"


def _hr_folder(spec: str, split: str, run_dir: str) -> Path:
    """--hr / --val-hr: a folder, or 'bundled' for the bundled photos of ``split`` ("train" or "held-out"),
    written into the run folder: a camera's adapter needs its degradation, not HR photos of its own."""
    if spec != _BUNDLED or Path(spec).exists():
        return Path(spec)
    from adaptsr.data.bundled import HELD_OUT, TRAIN, write_photos

    return write_photos(TRAIN if split == "train" else HELD_OUT, Path(run_dir) / f"bundled-{split}")


_DEGRADATION_RECORD = "degradation.json"


def _run_degradation(args: argparse.Namespace):
    """--degradation (a preset or a JSON file); on --resume, the one the run started with (its degradation.json)."""
    from adaptsr.data.degradation_files import degradation_to_dict, load_degradation, mixture_of

    degradation = mixture_of(args.degradation or ["camera"])
    recorded_path = Path(args.out) / _DEGRADATION_RECORD
    if args.resume and recorded_path.is_file():
        recorded = load_degradation(recorded_path)
        if recorded != degradation:
            now, then = degradation_to_dict(degradation), degradation_to_dict(recorded)
            changed = sorted(key for key in now.keys() | then.keys() if now.get(key) != then.get(key))
            given = " ".join(f"--degradation {spec}" for spec in args.degradation or ["camera"])
            raise CommandError(f"--resume: the run in {args.out} trained on the degradation in {recorded_path}, and "
                               f"{given} differs ({', '.join(changed)}); resume with the "
                               "run's own degradation (--degradation with that file) or start a new run")
    return degradation


def _record_degradation(args: argparse.Namespace, degradation) -> None:
    """Every field of the run's degradation in RUN_DIR/degradation.json, written once everything else checked out
    (a refused command leaves no run folder behind), by one process under torchrun."""
    import os

    from adaptsr.data.degradation_files import save_degradation

    if degradation is not None and int(os.environ.get("RANK", "0")) == 0:
        save_degradation(degradation, Path(args.out) / _DEGRADATION_RECORD)


def _adapt(args: argparse.Namespace) -> int:
    import torch

    import adaptsr
    from adaptsr.data import degrade
    from adaptsr.data.datasets import CachedValidationSet, HRFolderDataset, PairedFolderDataset
    from adaptsr.discriminator import load_discriminator
    from adaptsr.presets import preset_for_architecture
    from adaptsr.train import TrainConfig, adapt

    descriptor = adaptsr.load_model(args.model)
    scale = descriptor.scale
    degradation = _run_degradation(args) if args.hr or args.val_hr else None

    def degrade_fn(hr, s, generator):
        return degrade(hr, s, degradation, generator)

    if args.hr:
        train_set = HRFolderDataset(_hr_folder(args.hr, "train", args.out), scale, args.patch, degrade_fn,
                                    seed=args.seed)
    else:
        train_set = PairedFolderDataset(args.pairs[0], args.pairs[1], scale=scale, lr_patch=args.patch, seed=args.seed)
    # an epoch of at least one batch: a few photos (or pairs) give several crops each (item i crops photo i mod n)
    train_set.samples_per_epoch = max(train_set.samples_per_epoch, args.batch_size)
    val_set = None
    if args.val_hr:
        val_set = CachedValidationSet(
            _hr_folder(args.val_hr, "held-out", args.out), scale, degrade_fn, degrade_id=repr(degradation),
            cache_dir=Path(args.out) / "val_cache",
            seed=args.seed,
        )
    elif args.val_pairs:
        val_set = PairedFolderDataset(args.val_pairs[0], args.val_pairs[1], scale=scale)

    perceptual_weight = args.perceptual_weight if args.perceptual_weight is not None else (1.0 if args.gan else 0.0)
    gan_weight = args.gan_weight if args.gan_weight is not None else (0.1 if args.gan else 0.0)
    discriminator = None
    if args.discriminator:
        if gan_weight == 0:
            raise CommandError("--discriminator: the run has no GAN loss; add --gan (or --gan-weight W)")
        discriminator = load_discriminator(args.discriminator, descriptor.output_channels)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every, val_every=args.val_every, seed=args.seed, amp=args.amp,
        val_tile=args.val_tile, pixel_weight=args.pixel_weight, perceptual_weight=perceptual_weight,
        gan_weight=gan_weight, discriminator_lr=args.discriminator_lr, ema_decay=args.ema_decay,
    )
    if args.full_finetune:
        if args.allocate_ranks:
            raise CommandError("--allocate-ranks sets the adapters' ranks; --full-finetune trains no adapters")
        descriptor.model.requires_grad_(True)
    else:
        options = _lora_options(args)
        if options["preset"] is None and options["targets"] is None:
            options["preset"] = preset_for_architecture(descriptor.architecture.id)
        if args.allocate_ranks:
            options["rank_pattern"] = _allocated_rank_pattern(args, descriptor, train_set, config, options)
        torch.manual_seed(args.seed)  # the adapters' initial A: the same --seed, the same run
        summary = adaptsr.inject_lora(descriptor, **options)
        print(summary, flush=True)

    if args.checkpointing:
        # spandrel's HAT (and others) carry a use_checkpoint flag that their forward ignores: only the
        # architectures listed here checkpoint when it is set, and the flag must not promise memory it does not save.
        if descriptor.architecture.id not in _CHECKPOINTING_ARCHITECTURES:
            supported = ", ".join(_CHECKPOINTING_ARCHITECTURES)
            raise ValueError(f"--checkpointing: spandrel checkpoints the blocks of {supported} only, "
                             f"not {descriptor.architecture.name}")
        for block in descriptor.model.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = True

    _record_degradation(args, degradation)
    metrics = adapt(descriptor, train_set, args.out, config, val_set=val_set, resume=args.resume, device=args.device,
                    discriminator=discriminator)
    val = metrics["val"][-1] if metrics["val"] else None
    psnr = f", validation PSNR {val['psnr']:.2f} dB / SSIM {val['ssim']:.4f} (Y)" if val else ""
    print(f"adapted in {metrics['train_seconds']:.0f} s, final loss {metrics['final_loss']:.4f}{psnr}; "
          f"wrote {args.out}")
    best = metrics["best_val"]
    if args.val_every and best is not None:
        from adaptsr.train import BEST_ADAPTER, BEST_MODEL

        kept = Path(args.out) / (BEST_MODEL if args.full_finetune else BEST_ADAPTER)
        print(f"best validation PSNR {best['psnr']:.2f} dB / SSIM {best['ssim']:.4f} at step {best['step']}: {kept}")
    return 0


# -- bench --


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
                        "where they run on --device)")
    _add_lora_flags(p)
    p.add_argument("--no-full-finetune", action="store_true", help="leave out the full fine-tuning row")
    p.add_argument("--gan", action="store_true",
                   help="add a row for adapt --gan's step on the first backend: L1 + VGG perceptual + GAN losses and "
                        "the discriminator's step (the VGG19 ImageNet weights are downloaded on first use)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--patch", type=int, default=32, help="LR patch size in pixels (default: 32)")
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

    from adaptsr.bench import bench_training_step, format_bench_table, rows_as_dicts
    from adaptsr.io import atomic_write

    descriptor = _bench_model(args.model)
    backends = args.backends.split(",") if args.backends else None
    rows = bench_training_step(
        descriptor, backends=backends, **_lora_options(args),
        full_finetune=not args.no_full_finetune, batch_size=args.batch_size, patch=args.patch, device=args.device,
        amp=args.amp, rounds=args.rounds, warmup=args.warmup, gan=args.gan,
    )
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{descriptor.architecture.name} x{descriptor.scale}, batch {args.batch_size} of {args.patch}x{args.patch} "
          f"LR patches, LoRA rank {args.rank}, {where}, torch {torch.__version__}; medians of {args.rounds} rounds")
    print(format_bench_table(rows))
    if args.json:
        text = json.dumps({"model": args.model, "device": where, "batch_size": args.batch_size, "patch": args.patch,
                           "rank": args.rank, "amp": args.amp, "rounds": args.rounds, "rows": rows_as_dicts(rows)},
                          indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Adapt super-resolution models with LoRA. Run 'adaptsr COMMAND --help' for a command's flags.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(commands)
    add_adapt_command(commands)
    add_eval_command(commands)
    add_upscale_command(commands)
    add_merge_command(commands)
    add_combine_command(commands)
    add_estimate_command(commands)
    add_layers_command(commands)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # spandrel's Swin architectures call torch.meshgrid without indexing=: noise, not the user's problem
    warnings.filterwarnings("ignore", message="torch.meshgrid")

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
