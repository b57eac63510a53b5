"""`adaptsr estimate`: a camera profile measured from the camera's own photos."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptsr.cli._common import (
    _finite_float,
    _input_images,
    _print_columns,
)


def _estimate(args: argparse.Namespace) -> int:
    from adaptsr.data.estimate import estimate_camera_profile

    paths = _input_images(args.input)  # an empty folder: ValueError naming it
    estimate = estimate_camera_profile(paths, blur_sigma=args.blur_sigma, scale=args.scale)
    rows = [("image", "JPEG quality", "measured noise")]
    for image in estimate.images:
        quality = "none" if image["jpeg_quality"] is None else (
            f"{image['jpeg_quality']}" + ("" if image["ijg_exact"] else " (nearest IJG)"))
        rows.append((image["name"], quality, f"{image['measured_noise']:.2f}"))
    _print_columns(rows, left=1)
    _write_profile(estimate, args.out)
    print(f"camera profile: blur sigma {estimate.blur_sigma:g} (given, not measured), noise {estimate.noise:.1f} "
          f"(8-bit sigma before JPEG, calibrated at x{estimate.scale}), JPEG quality {estimate.jpeg_quality}"
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
    p.add_argument("--scale", type=int, default=4, choices=range(1, 9), metavar="N",
                   help="the scale of the SR model you will adapt (default: 4): the noise calibration degrades its "
                        "photos by it, as training will")
    p.set_defaults(func=_estimate)
