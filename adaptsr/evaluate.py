"""Image-quality evaluation of SR results through pyiqa.

``psnr`` and ``ssim`` follow the SR convention: computed on the Y channel of YCbCr (ITU-R BT.601,
as MATLAB's ``rgb2ycbcr``) with ``scale`` pixels cropped from every border. Any other pyiqa metric
is available by its pyiqa name (``lpips``, ``dists``, ``niqe``, ``musiq``, ``ms_ssim``, ...) with
pyiqa's own defaults; no-reference metrics (niqe, musiq, ...) score the SR image alone.

Metrics with learned weights (LPIPS, DISTS, NIQE, MUSIQ, ...) download them on first use. Where
that is not possible (offline, or ``download=False``), the metric is skipped with a message naming
the missing file and the path to put it at, and the other metrics still run. No download is
attempted when ``download=False``.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from adaptsr.io import atomic_write

__all__ = [
    "SR_METRICS",
    "MissingWeightsError",
    "available_metrics",
    "create_metric",
    "evaluate_pairs",
    "format_table",
    "is_no_reference",
    "write_results",
]

# Metric name -> pyiqa options that make it the SR convention (``crop_border`` is added from the scale).
SR_METRICS: dict[str, dict] = {
    "psnr": {"test_y_channel": True, "color_space": "ycbcr"},
    "ssim": {"test_y_channel": True, "color_space": "ycbcr"},
}


class MissingWeightsError(RuntimeError):
    """A metric (or the VGG perceptual loss, ``what``) needs a weight file that is not on this machine and could
    not be downloaded."""

    def __init__(self, metric: str, url: str, path: str | None, reason: str | None = None, *, what: str | None = None):
        self.metric, self.url, self.path, self.reason = metric, url, path, reason
        why = f" (download failed: {reason})" if reason else " (downloads are off)"
        if path is None:  # a library's own download (timm and transformers from the Hugging Face Hub, CLIP)
            super().__init__(
                f"{what or f'metric {metric!r}'} needs files from {url} that are not cached on this machine{why}; "
                "create it once with downloads on and the network reachable, and its library caches them "
                "(Hugging Face models under HF_HOME, default ~/.cache/huggingface)"
            )
            return
        super().__init__(
            f"{what or f'metric {metric!r}'} needs the weight file {os.path.basename(path)}, which is not at "
            f"{path}{why}; "
            f"download {url} and put it at {path} (pyiqa looks under torch.hub.get_dir()/pyiqa, torchvision "
            "backbones under torch.hub.get_dir()/checkpoints; set TORCH_HOME to move both)"
        )


class _Blocked(Exception):
    """Raised in place of a download; not an OSError, so no library mistakes it for a network error to retry."""

    def __init__(self, url: str, path: str | None, reason: str | None):
        super().__init__(url)
        self.url, self.path, self.reason = url, path, reason


def available_metrics() -> list[str]:
    """Every metric name pyiqa knows."""
    import pyiqa

    return list(pyiqa.list_models())


@contextlib.contextmanager
def _guarded_downloads(download: bool):
    """Route pyiqa's and torch.hub's downloads through a guard that turns failures into ``_Blocked``.

    With ``download=False`` every host name lookup raises ``_Blocked`` too: some metrics download through
    their own libraries (timm and transformers from the Hugging Face Hub, which retries for most of a minute
    before giving up; CLIP with urllib), and "off" must mean no network at all.
    Also points pyiqa's cache at ``torch.hub.get_dir()/pyiqa`` as it is now (pyiqa fixes it at import).
    """
    import socket

    import torch.hub
    from pyiqa.utils import download_util

    original = torch.hub.download_url_to_file

    def guarded(url, dst, *args, **kwargs):
        if not download:
            raise _Blocked(url, os.path.abspath(dst), None)
        try:
            return original(url, dst, *args, **kwargs)
        except Exception as err:  # network errors come in many types
            if os.path.exists(dst):
                os.unlink(dst)
            raise _Blocked(url, os.path.abspath(dst), f"{type(err).__name__}: {err}") from err

    def no_lookups(host, *args, **kwargs):
        raise _Blocked(f"https://{host}" if isinstance(host, str) else repr(host), None, None)

    saved = (torch.hub.download_url_to_file, download_util.download_url_to_file, download_util.DEFAULT_CACHE_DIR,
             socket.getaddrinfo)
    torch.hub.download_url_to_file = guarded
    download_util.download_url_to_file = guarded
    download_util.DEFAULT_CACHE_DIR = os.path.join(torch.hub.get_dir(), "pyiqa")
    if not download:
        socket.getaddrinfo = no_lookups
    try:
        yield
    finally:
        (torch.hub.download_url_to_file, download_util.download_url_to_file, download_util.DEFAULT_CACHE_DIR,
         socket.getaddrinfo) = saved


def is_no_reference(name: str) -> bool:
    """Whether pyiqa's metric ``name`` scores an image alone (NIQE, MUSIQ, PIQE, CLIP-IQA, ...), needing no HR image."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return DEFAULT_CONFIGS[name]["metric_mode"] == "NR"


def _check_names(names: Sequence[str]) -> list[str]:
    known = set(available_metrics())
    out = []
    for name in names:
        name = name.strip().lower()
        if not name:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see pyiqa.list_models()"
            raise ValueError(f"unknown metric {name!r}{hint}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no metrics given")
    return out


def create_metric(name: str, scale: int = 0, *, device: str | torch.device = "cpu", download: bool = True,
                  what: str | None = None, **pyiqa_options):
    """A pyiqa metric; ``psnr`` / ``ssim`` set up for the SR convention (Y channel, ``scale``-pixel border cropped).
    ``pyiqa_options`` go to ``pyiqa.create_metric`` (``as_loss``, the network's options).

    Raises ``MissingWeightsError`` (saying ``what`` needs them, by default the metric) when its weights are missing
    and cannot be downloaded.
    """
    import pyiqa

    options = dict(SR_METRICS.get(name, {}), **pyiqa_options)
    if name in SR_METRICS:
        options["crop_border"] = int(scale)
    # pyiqa and torch.hub announce "Downloading: ..." before the guard refuses: keep that quiet when off.
    quiet = contextlib.ExitStack()
    if not download:
        sink = io.StringIO()
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
    with quiet, _guarded_downloads(download):
        try:
            return pyiqa.create_metric(name, device=torch.device(device), **options)
        except _Blocked as err:
            raise MissingWeightsError(name, err.url, err.path, err.reason, what=what) from None
        except ModuleNotFoundError as err:
            if err.name != "pkg_resources":
                raise
            # OpenAI's clip package (CLIP-IQA, CLIPScore, ...) imports it; pip installs a setuptools without it
            raise ModuleNotFoundError(
                f"metric {name!r} needs pkg_resources (OpenAI's clip package imports it), which setuptools 81 and "
                "later no longer ship: pip install 'setuptools<81' into this environment to use it",
                name="pkg_resources",
            ) from err


def _as_batch(image, what: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{what} is a {type(image).__name__}, not an image tensor")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] not in (1, 3):
        raise ValueError(f"{what} has shape {list(image.shape)}; expected [3, H, W] or [1, 3, H, W]")
    return image.float().clamp(0, 1)


def _quantize(image: torch.Tensor) -> torch.Tensor:
    """As the image would be after writing it as an 8-bit PNG."""
    return (image * 255.0).round() / 255.0


def _match_size(name: str, sr: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the HR image to the SR size when it is larger by less than ``scale`` (the usual mod-crop)."""
    (h, w), (H, W) = sr.shape[-2:], hr.shape[-2:]
    if (h, w) == (H, W):
        return sr, hr
    slack = max(int(scale), 1)
    if 0 <= H - h < slack and 0 <= W - w < slack:
        return sr, hr[..., :h, :w]
    raise ValueError(f"image {name!r}: the SR result is {w}x{h} but the HR image is {W}x{H}")


def _pairs_from(pairs) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(pairs, Mapping):
        for name, (sr, hr) in pairs.items():
            yield str(name), sr, hr
        return
    for i, item in enumerate(pairs):
        if isinstance(item, Mapping):
            yield str(item.get("name", i)), item["sr"], item.get("hr")
        elif len(item) == 3:
            yield str(item[0]), item[1], item[2]
        else:
            yield str(i), item[0], item[1]


def _lr_hr_from(dataset) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    for i, item in enumerate(dataset):
        if isinstance(item, Mapping):
            name = item.get("name", item.get("path", i))
            name = Path(str(name)).stem if "path" in item and "name" not in item else str(name)
            yield name, item["lr"], item.get("hr")
        elif len(item) == 3:
            yield str(item[0]), item[1], item[2]
        else:
            yield str(i), item[0], item[1]


def evaluate_pairs(
    pairs=None,
    metrics: Sequence[str] | str = ("psnr", "ssim"),
    scale: int | None = None,
    *,
    model=None,
    dataset=None,
    tile: int | str | None = None,
    overlap: int = 32,
    device: str | torch.device = "cpu",
    download: bool = True,
    quantize: bool = True,
    self_ensemble: bool = False,
) -> dict:
    """Score SR results against HR images with pyiqa metrics; per image and the mean.

    Either ``pairs`` (a mapping name -> (sr, hr), or an iterable of (sr, hr) / (name, sr, hr))
    or ``model`` (spandrel descriptor or nn.Module) + ``dataset`` (an iterable of (lr, hr),
    (name, lr, hr) or dicts with ``lr``, ``hr`` and optionally ``name``); images are tensors
    [3, H, W] or [1, 3, H, W] in [0, 1]. An HR image may be None (a camera's own photos have none)
    where every metric is a no-reference one (``is_no_reference``). With a model, its outputs are
    rounded to 8 bits first (as a written PNG is; ``quantize=False`` keeps them), ``scale``
    defaults to the model's, and ``self_ensemble`` averages each image's upscaling over its eight
    flips and quarter turns (``adaptsr.infer.upscale``; the papers' "+" scores).
    An HR image larger than the SR result by less than ``scale`` pixels is cropped to it.

    Returns ``{"scale", "metrics": computed names, "skipped": {name: reason}, "images": [{"name",
    <metric>: value, ...}], "mean": {<metric>: value}, "lower_better": {<metric>: bool}, "self_ensemble"}``.
    Unknown metric names raise ValueError before anything runs; a metric whose weights are
    missing is skipped with the reason (see MissingWeightsError).
    """
    if (pairs is None) == (model is None):
        raise ValueError("evaluate_pairs takes either pairs, or a model and a dataset")
    if model is not None and dataset is None:
        raise ValueError("evaluate_pairs: a model needs a dataset of (lr, hr) images")
    if self_ensemble and model is None:
        raise ValueError("evaluate_pairs: self_ensemble applies to a model's upscaling; pairs come upscaled already")
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    names = _check_names(metrics)
    if scale is None:
        scale = getattr(model, "scale", None) if model is not None else None
    if scale is None:
        raise ValueError("evaluate_pairs needs the scale (the border cropped for psnr and ssim)")
    scale = int(scale)

    created, skipped = {}, {}
    for name in names:
        try:
            created[name] = create_metric(name, scale, device=device, download=download)
        except MissingWeightsError as err:
            skipped[name] = str(err)
        except Exception as err:
            skipped[name] = f"metric {name!r} could not be created ({type(err).__name__}: {err})"

    if model is not None:
        from adaptsr.infer import upscale

        def produce():
            for name, lr, hr in _lr_hr_from(dataset):
                sr = upscale(model, _as_batch(lr, f"LR image {name!r}"), scale, tile=tile, overlap=overlap,
                             self_ensemble=self_ensemble)
                yield name, (_quantize(sr) if quantize else sr), hr

        source = produce()
    else:
        source = _pairs_from(pairs)

    full_reference = [name for name, metric in created.items() if metric.metric_mode == "FR"]
    rows = []
    for name, sr, hr in source:
        sr = _as_batch(sr, f"SR image {name!r}")
        if hr is None:
            if full_reference:
                raise ValueError(f"image {name!r} has no HR image, which {', '.join(full_reference)} compare "
                                 "the SR result with; score images without HR ones with no-reference metrics "
                                 "(niqe, musiq, piqe, clipiqa, ...)")
        else:
            hr = _as_batch(hr, f"HR image {name!r}")
            sr, hr = _match_size(name, sr, hr, scale)
            if sr.shape[1] != hr.shape[1]:
                raise ValueError(f"image {name!r}: the SR result has {sr.shape[1]} channels, the HR image "
                                 f"{hr.shape[1]}")
        if full_reference and scale and min(sr.shape[-2:]) <= 2 * scale:
            raise ValueError(f"image {name!r} is {sr.shape[-1]}x{sr.shape[-2]}: too small to crop {scale} pixels")
        row: dict = {"name": name}
        for metric_name, metric in created.items():
            with torch.no_grad():
                if metric.metric_mode == "FR":
                    value = metric(sr.to(metric.device), hr.to(metric.device))
                else:
                    value = metric(sr.to(metric.device))
            row[metric_name] = float(torch.as_tensor(value).float().mean())
        rows.append(row)

    computed = list(created)
    mean = {m: (sum(r[m] for r in rows) / len(rows) if rows else math.nan) for m in computed}
    return {
        "scale": scale,
        "metrics": computed,
        "skipped": skipped,
        "images": rows,
        "mean": mean,
        "lower_better": {m: bool(created[m].lower_better) for m in computed},
        "self_ensemble": self_ensemble,
    }


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def format_table(result: dict) -> str:
    """The per-image values and the mean as a plain-text table."""
    metrics = result["metrics"]
    header = ["image", *(f"{m}{' (lower better)' if result['lower_better'].get(m) else ''}" for m in metrics)]
    body = [[r["name"], *(_fmt(r[m]) for m in metrics)] for r in result["images"]]
    body.append(["mean", *(_fmt(result["mean"][m]) for m in metrics)])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *map(line, body[:-1]), rule, line(body[-1])]
    if result.get("self_ensemble"):
        lines.append("self-ensemble: each image is the mean of its 8 flips and quarter turns, upscaled and turned back")
    for name, reason in result["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def write_results(result: dict, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.csv`` (one row per image, then ``mean``) atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot write results to {directory}: it is a file, not a folder")
    json_path, csv_path = directory / "metrics.json", directory / "metrics.csv"

    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    doc = {
        **result,
        "images": [{k: clean(v) for k, v in r.items()} for r in result["images"]],
        "mean": {k: clean(v) for k, v in result["mean"].items()},
    }
    text = json.dumps(doc, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *result["metrics"]])
    for row in result["images"]:
        writer.writerow([row["name"], *(repr(row[m]) for m in result["metrics"])])
    writer.writerow(["mean", *(repr(result["mean"][m]) for m in result["metrics"])])
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))
    return json_path, csv_path
