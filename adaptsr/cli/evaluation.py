"""`adaptsr eval`: score a model (base, base + adapters, or merged) on LR/HR pairs, degraded HR images, or LR
images alone with no-reference metrics."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from adaptsr.cli._common import (
    PROG,
    CommandError,
    _add_device_flag,
    _add_model_flags,
    _add_precision_flag,
    _add_self_ensemble_flag,
    _add_tile_flags,
    _load,
    _nonneg_int,
)

# No-reference metrics real-world SR papers report; PIQE needs no weights, so one of them runs offline too.
_NO_REFERENCE_DEFAULT = "niqe,musiq,piqe"
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

    default = _NO_REFERENCE_DEFAULT if args.lr else "psnr,ssim"
    metrics = evaluate._check_names((args.metrics or default).split(","))  # unknown names fail before any work
    if args.lr is not None:
        full_reference = [name for name in metrics if not evaluate.is_no_reference(name)]
        if full_reference:
            raise CommandError(f"--lr: {', '.join(full_reference)} compare with HR images, which --lr has none of; "
                               "choose no-reference metrics (niqe, musiq, piqe, clipiqa, maniqa, ...), or give "
                               "--pairs LR_DIR HR_DIR")
        from adaptsr.data.images import list_images

        files = list_images(args.lr)  # a missing or empty folder: an error naming it
        model = _load(args, precision=args.precision)
        dataset = ((path.stem, read_image(path), None) for path in files)
    elif args.pairs is not None:
        files = _paired_files(*args.pairs)
        model = _load(args, precision=args.precision)
        dataset = ((name, read_image(lr), read_image(hr)) for name, lr, hr in files)
    else:
        if not args.degradation:
            raise CommandError("--hr needs --degradation PRESET|FILE (the degradation that makes the LR images)")
        from adaptsr.data.datasets import CachedValidationSet
        from adaptsr.data.degradation_files import mixture_of
        from adaptsr.data.degradations import Degrader

        config = mixture_of(args.degradation)  # unknown name or bad file: ValueError saying which
        model = _load(args, precision=args.precision)

        degrade_fn = Degrader(config)
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
        self_ensemble=args.self_ensemble,
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
    source.add_argument(
        "--lr", metavar="LR_DIR",
        help="a folder of LR images with no HR ones (a camera's own photos), scored with no-reference metrics "
        f"(default: {_NO_REFERENCE_DEFAULT})",
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
        help="comma-separated pyiqa metric names (default: psnr,ssim; with --lr "
        f"{_NO_REFERENCE_DEFAULT}); e.g. psnr,ssim,lpips,dists,niqe",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and metrics.csv")
    _add_tile_flags(p)
    _add_self_ensemble_flag(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="never download metric weights; metrics whose weights are missing are skipped",
    )
    _add_device_flag(p)
    _add_precision_flag(p)
    p.set_defaults(func=_eval)
