"""`adaptsr degrade`: the LR images a degradation makes of HR images, written out to look at or to share."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from adaptsr.cli._common import CommandError, _check_distinct_outputs, _is_same_file, _nonneg_int


def _degrade(args: argparse.Namespace) -> int:
    from adaptsr.data.datasets import CachedValidationSet
    from adaptsr.data.degradation_files import mixture_of
    from adaptsr.data.degradations import Degrader
    from adaptsr.data.images import image_size, list_images
    from adaptsr.io import atomic_write

    files = list_images(args.hr)  # a missing or empty folder: an error naming it
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if _is_same_file(out, Path(args.hr)):
        raise CommandError(f"--out {out} is the HR folder: the LR images would take the HR images' names; write "
                           "them to their own folder")
    _check_distinct_outputs(files, ".png", "HR images")
    config = mixture_of(args.degradation)  # unknown name or bad file: ValueError saying which
    # The LR images eval --hr makes of the same folder, degradation, scale and seed, bit for bit: its cached set
    # generates them (into a scratch folder here), so `eval --pairs OUT HR_DIR` scores exactly what it scores.
    with tempfile.TemporaryDirectory(prefix="adaptsr-degrade-") as scratch:
        made = CachedValidationSet(args.hr, args.scale, Degrader(config), degrade_id=repr(config), cache_dir=scratch,
                                   seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
        for hr_path, name, lr_path in zip(files, made.names, made.cache_paths):
            target = out / f"{name}.png"
            atomic_write(target, lambda tmp, source=lr_path: shutil.copyfile(source, tmp))
            height, width = image_size(target)
            print(f"{hr_path} -> {target} ({width}x{height})", flush=True)
    print(f"wrote {len(files)} LR image(s) to {out}; score a model on them with: "
          f"adaptsr eval --model CKPT --pairs {out} {args.hr} --out RESULTS")
    return 0


def add_degrade_command(subparsers) -> None:
    p = subparsers.add_parser(
        "degrade",
        help="write the LR images a degradation makes of HR images (to look at a camera profile, or to share a "
             "test set)",
        description=(
            "Degrade every image in HR_DIR as 'adaptsr eval --hr HR_DIR --degradation ...' does (cropped to a "
            "multiple of --scale, one draw of the degradation per image from --seed) and write <name>.png to "
            "--out: to see whether a camera profile looks like your camera's photos before adapting to it, or to "
            "hand a fixed LR/HR test set to others ('adaptsr eval --pairs OUT HR_DIR' scores the same images)."
        ),
    )
    p.add_argument("hr", metavar="HR_DIR", help="a folder of HR images (png, jpg, bmp, tif, webp)")
    p.add_argument("--degradation", action="append", required=True, metavar="PRESET|FILE",
                   help="a preset (realesrgan, mild, camera, lowlight) or a JSON file as adapt --degradation takes; "
                        "repeated, each image draws one of them")
    p.add_argument("--scale", type=int, default=4, choices=range(1, 9), metavar="N",
                   help="the downscaling factor, your SR model's scale (default: 4)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the degradation draws (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the LR images (created if missing)")
    p.set_defaults(func=_degrade)
