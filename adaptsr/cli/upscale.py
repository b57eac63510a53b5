"""`adaptsr upscale`: upscale an image or a folder of images to PNGs (or JPEG, WebP)."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adaptsr.cli._common import (
    CommandError,
    _add_device_flag,
    _add_model_flags,
    _add_precision_flag,
    _add_self_ensemble_flag,
    _add_tile_flags,
    _check_distinct_outputs,
    _input_images,
    _is_same_file,
    _load,
    _nonneg_int,
)


def _resize(image, size):
    """An image (a transparency channel; the model's output for --outscale) at another size: bicubic, not the SR
    model, which was trained on colour (and a second model pass would double the time for a channel that is
    mostly flat); antialiased where it shrinks, so detail is averaged rather than aliased."""
    import torch.nn.functional as F

    shrinks = any(new < old for new, old in zip(size, image.shape[-2:]))
    return F.interpolate(image, size=tuple(size), mode="bicubic", align_corners=False, antialias=shrinks).clamp(0, 1)


def _to_grey(rgb):
    """The model's RGB output of a grey input as one channel: ITU-R BT.601 luma, the weights Pillow and
    OpenCV convert to grey with (kornia's rgb_to_grayscale)."""
    from kornia.color import rgb_to_grayscale

    return rgb_to_grayscale(rgb)


def _finish(in_flight) -> None:
    """Wait for a background write (raising its error), then report it."""
    if in_flight is not None:
        write, message = in_flight
        write.result()
        print(message, flush=True)


def _upscale(args: argparse.Namespace) -> int:
    import torch

    from adaptsr.data.images import image_bit_depth, image_is_grey, image_size, read_image, write_image
    from adaptsr.infer import upscale

    files = _input_images(args.input)
    for path in files:  # catch an unreadable file (from its header) before spending time on the others
        image_size(path)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    extension = f".{args.format}"
    _check_distinct_outputs(files, extension, "inputs")
    # with --format jpg, a transparent image goes to PNG (below)
    extensions = {extension, ".png"} if extension == ".jpg" else {extension}
    for path in files:
        if any(_is_same_file(out / f"{path.stem}{ext}", path) for ext in extensions):
            raise CommandError(f"--out {out} would overwrite the input {path} with its upscaled image; "
                               "write to another folder")
    model = _load(args, precision=args.precision)
    # Each image is encoded in a thread while the model upscales the next image: at Pillow's default compression
    # a 2048x2048 result takes about 1 s to encode on a 2-core CPU (benchmarks/test_bench_data.py), longer than a
    # GPU takes to upscale it. At most one write is in flight, so memory holds one result more than before, and
    # errors surface in input order.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptsr-write") as writer:
        in_flight = None
        try:
            for path in files:
                image = read_image(path, alpha=True).unsqueeze(0)
                result = upscale(model, image[:, :3], tile=args.tile or None, overlap=args.overlap,
                                 self_ensemble=args.self_ensemble)
                if args.outscale is not None:
                    size = [max(1, round(side * args.outscale)) for side in image.shape[-2:]]
                    if size != list(result.shape[-2:]):
                        result = _resize(result, size)
                grey = image_is_grey(path)  # the model sees grey replicated to RGB; its output goes back to grey
                if grey:
                    result = _to_grey(result)
                if image.shape[1] == 4:
                    result = torch.cat([result, _resize(image[:, 3:], result.shape[-2:])], dim=1)
                # JPEG holds no transparency: as Real-ESRGAN does, a transparent image is written as PNG instead
                suffix = ".png" if image.shape[1] == 4 and extension == ".jpg" else extension
                target = out / f"{path.stem}{suffix}"
                # a 16-bit input keeps its depth in a PNG (the model computes in float anyway)
                bits = image_bit_depth(path) if suffix == ".png" else 8
                notes = ", grey" * grey + ", 16-bit" * (bits == 16)
                _finish(in_flight)
                in_flight = None
                write = writer.submit(write_image, result[0].cpu(), target, bits=bits, quality=args.quality)
                in_flight = (write, f"{path} -> {target} ({result.shape[-1]}x{result.shape[-2]}{notes})")
        finally:  # a later image's failure still reports the one written before it
            _finish(in_flight)
    return 0


def add_upscale_command(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="upscale an image or a folder of images to PNGs (or JPEG, WebP)",
        description=(
            "Upscale INPUT (an image file, or every image in a folder) with the model (base, base + adapter, "
            "or merged) and write <name>.png (or --format's extension) to --out. --tile bounds memory on large "
            "images: tiles overlap and are blended, so no seams show; by default whole images, tiles where the "
            "device runs out of memory. Transparent images stay transparent: the model upscales the colour, "
            "bicubic interpolation the alpha channel. Grey inputs give grey images, 16-bit inputs (PNG, TIFF) "
            "16-bit PNGs."
        ),
    )
    p.add_argument("input", metavar="INPUT", help="an image file (png, jpg, bmp, tif, webp) or a folder of them")
    _add_model_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the upscaled images (created if missing)")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png",
                   help="output format (default: png); a transparent image is written as PNG with --format jpg")
    p.add_argument("--quality", type=_quality, default=95, metavar="Q",
                   help="JPEG / WebP quality, 1-100 (default: 95; WebP at 100 is lossless)")
    p.add_argument("--outscale", type=_outscale, metavar="S",
                   help="the output's size as a multiple of the input's, when it should not be the model's scale: "
                        "the model's result is resized to it (bicubic, antialiased where it shrinks; e.g. 2 with a "
                        "x4 model, as Real-ESRGAN's --outscale; default: the model's scale)")
    _add_tile_flags(p)
    _add_self_ensemble_flag(p)
    _add_device_flag(p)
    _add_precision_flag(p)
    p.set_defaults(func=_upscale)


def _outscale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 16:  # nan fails too
        raise argparse.ArgumentTypeError(f"{text} is not a scale in (0, 16]")
    return value


def _quality(text: str) -> int:
    value = _nonneg_int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not in 1-100")
    return value
