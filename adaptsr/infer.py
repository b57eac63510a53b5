"""Upscaling whole images with an SR model: tiled, overlapped and blended so memory stays bounded.

``upscale(model, image, tile=256, overlap=32)`` cuts the (padded) low-resolution image into
``tile x tile`` tiles that overlap their neighbours by ``overlap`` pixels, runs the model on one
tile at a time and blends the tiles' outputs with weights that are 0 in the outer quarter of each
overlap strip, rise smoothly (raised cosine) across its middle half and are 1 elsewhere. So:

- memory is one tile's activations plus the output image, whatever the input size;
- for a model whose receptive field reaches at most ``overlap / 4`` input pixels, every output pixel
  comes only from tiles that saw its whole receptive field: the tiled result equals the untiled one
  up to float rounding; for models with larger receptive fields the blending hides the seams;
- the image is first padded (reflect, then replicate, as spandrel pads) to what the model needs
  (``descriptor.size_requirements``: minimum size, multiple of; the attention window of Swin-family
  models), and tiles start at multiples of that, so window partitions line up with the untiled run.

``tile="auto"`` runs the whole image and, where the device runs out of memory, retries in tiles of half
the image's longer side, halving again on each further failure: large images need no tile size
worked out beforehand, and images that fit lose nothing to tiling.

``self_ensemble=True`` is the SR papers' "+" (EDSR+, SwinIR+, HAT-L+): each tile, or the whole image,
is also run flipped and rotated by multiples of 90 degrees, and the eight outputs, turned back, are
averaged. It costs eight forward passes, buys a little PSNR on most models, and makes the result
commute with those flips and rotations.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["upscale"]


def _module_of(model) -> nn.Module:
    return model.model if hasattr(model, "size_requirements") and hasattr(model, "model") else model


def _requirements(model, multiple_of: int | None) -> tuple[int, int, bool]:
    """(minimum, multiple_of, square) the model's input must satisfy."""
    req = getattr(model, "size_requirements", None)
    minimum = int(getattr(req, "minimum", 0) or 0)
    multiple = int(getattr(req, "multiple_of", 1) or 1)
    square = bool(getattr(req, "square", False))
    # Swin-family models (SwinIR, HAT, ...) pad to their attention window internally; padding here
    # instead lets tiles start on window boundaries, so windows line up with the untiled run.
    window = getattr(_module_of(model), "window_size", None)
    if isinstance(window, int) and window > 1:
        multiple = math.lcm(multiple, window)
    if multiple_of is not None:
        multiple = math.lcm(multiple, int(multiple_of))
    minimum = -(-minimum // multiple) * multiple
    return minimum, multiple, square


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad right/bottom: reflect as far as it can, replicate the rest (spandrel's ``pad_tensor``)."""
    if pad_h == 0 and pad_w == 0:
        return x
    h, w = x.shape[-2:]
    rh, rw = min(pad_h, h - 1), min(pad_w, w - 1)
    if rh or rw:
        x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    if pad_h - rh or pad_w - rw:
        x = F.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
    return x


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(n: int, device, dtype) -> torch.Tensor:
    """Raised cosine from 0 to 1 over ``n`` samples (pixel centres)."""
    t = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(math.pi * t)).to(dtype)


def _profile(size: int, overlap: int, first: bool, last: bool, device, dtype) -> torch.Tensor:
    """1-D blending weights of a tile of ``size`` output pixels whose overlap strips are ``overlap`` wide."""
    w = torch.ones(size, device=device, dtype=dtype)
    if overlap <= 0:
        return w
    zero = overlap // 4
    rise = overlap - 2 * zero
    ramp = _ramp(rise, device, dtype) if rise > 0 else None
    if not first:
        w[:zero] = 0
        if ramp is not None:
            w[zero : zero + rise] = ramp
    if not last:
        if zero:
            w[size - zero :] = 0
        if ramp is not None:
            w[size - zero - rise : size - zero] *= ramp.flip(0)
    return w


def image_of(output):
    """The image a model's forward returns: spandrel's MMRealSR and FBCNN return (image, degradation estimate),
    and their descriptors' call_fn takes [0]; adaptsr calls the module itself when it trains."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _run(model, x: torch.Tensor) -> torch.Tensor:
    # A copy: some models (RCAN) modify their input in place, and x may be a view into the image.
    x = x.clone()
    if hasattr(model, "size_requirements") and callable(model):
        return model(x)  # spandrel descriptor: eval mode, clamps to [0, 1]
    return image_of(model(x))


# The eight symmetries of the square: rotations by k quarter turns, with or without a left-right flip
# first. Hand-written because no SR library exposes it as a function (BasicSR's sits inside a model class).
_DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def _turn(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


def _turn_back(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


def _run_checked(model, x: torch.Tensor, scale: int, self_ensemble: bool) -> torch.Tensor:
    """The model's output for x, checked to be x upscaled by ``scale``; with ``self_ensemble``, the mean
    of its outputs for x's eight flips and rotations, each turned back (summed in float32)."""
    if not self_ensemble:
        y = _run(model, x)
        _check_output(y, x, scale)
        return y
    total = None
    for k, flip in _DIHEDRAL:
        turned = _turn(x, k, flip)
        y = _run(model, turned)
        _check_output(y, turned, scale)
        y = _turn_back(y.float(), k, flip)
        total = y if total is None else total.add_(y)
    return total / len(_DIHEDRAL)


@torch.no_grad()
def upscale(
    model,
    image: torch.Tensor,
    scale: int | None = None,
    tile: int | str | None = None,
    overlap: int = 32,
    *,
    multiple_of: int | None = None,
    self_ensemble: bool = False,
) -> torch.Tensor:
    """Upscale ``image`` ([B, C, H, W] in [0, 1]) with ``model``; returns [B, C', H*scale, W*scale] in [0, 1].

    ``model`` is a spandrel descriptor (its ``size_requirements`` and ``scale`` are used) or an
    nn.Module (give ``scale``; ``multiple_of`` for a size requirement). ``tile`` (input pixels,
    None = the whole image at once) bounds memory; neighbouring tiles overlap by ``overlap`` input
    pixels and are blended (see the module docstring); ``"auto"``: the whole image, or tiles when the device
    runs out of memory (the module docstring). Tile size and overlap are rounded up to the
    model's size multiple. ``self_ensemble``: average the outputs for the eight flips and quarter
    turns of each tile (eight times the work; the module docstring). The model runs in its own dtype
    and device; the result is on the image's device in the image's dtype.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"upscale takes an image batch [B, C, H, W], got {shape}")
    if tile is not None and tile != "auto" and (isinstance(tile, str) or tile <= 0):
        raise ValueError(f"tile must be a positive number of pixels, 'auto' or None, got {tile!r}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if tile == "auto":
        return _upscale_fitting_memory(model, image, scale, overlap, multiple_of, self_ensemble)
    return _upscale(model, image, scale, tile, overlap, multiple_of, self_ensemble)


def _upscale(model, image: torch.Tensor, scale, tile: int | None, overlap: int, multiple_of,
             self_ensemble: bool = False) -> torch.Tensor:
    """``upscale`` with its arguments checked, a tile size or None (whole image)."""
    model_scale = getattr(model, "scale", None) if hasattr(model, "size_requirements") else None
    if scale is None:
        scale = model_scale
    if scale is None:
        raise ValueError("upscale needs the scale for a plain nn.Module (pass scale=...)")
    if model_scale is not None and scale != model_scale:
        raise ValueError(f"scale {scale} does not match the model's scale {model_scale}")
    scale = int(scale)

    module = _module_of(model)
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else image.device
    dtype = param.dtype if param is not None else image.dtype
    out_device, out_dtype = image.device, image.dtype

    minimum, multiple, square = _requirements(model, multiple_of)
    b, _, h, w = image.shape
    hp, wp = max(_round_up(h, multiple), minimum), max(_round_up(w, multiple), minimum)
    if square:
        hp = wp = max(hp, wp)
    x = _pad(image.to(device=device, dtype=dtype), hp - h, wp - w)

    if tile is None or (tile >= hp and tile >= wp):
        y = _run_checked(model, x, scale, self_ensemble)
        return y[..., : h * scale, : w * scale].clamp(0, 1).to(device=out_device, dtype=out_dtype)

    t = max(_round_up(tile, multiple), minimum)
    o = _round_up(overlap, multiple) if overlap else 0
    if 2 * o > t:
        raise ValueError(
            f"overlap {overlap} is too large for tile {tile} (rounded to {o} and {t} for this model's size "
            "multiple); use an overlap of at most half the tile"
        )
    th, tw = min(t, hp), min(t, wp)
    if square:
        th = tw = min(th, tw)
    ys, xs = _starts(hp, th, th - o), _starts(wp, tw, tw - o)

    out = None
    weight_sum = None
    for i, y0 in enumerate(ys):
        wy = _profile(th * scale, o * scale, i == 0, i == len(ys) - 1, out_device, torch.float32)
        for j, x0 in enumerate(xs):
            patch = x[..., y0 : y0 + th, x0 : x0 + tw]
            y = _run_checked(model, patch, scale, self_ensemble)
            if out is None:
                out = torch.zeros(b, y.shape[1], hp * scale, wp * scale, device=out_device, dtype=torch.float32)
                weight_sum = torch.zeros(1, 1, hp * scale, wp * scale, device=out_device, dtype=torch.float32)
            wx = _profile(tw * scale, o * scale, j == 0, j == len(xs) - 1, out_device, torch.float32)
            weight = wy[:, None] * wx[None, :]
            region = (..., slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
            out[region] += y.to(device=out_device, dtype=torch.float32) * weight
            weight_sum[region] += weight
    out = out / weight_sum
    return out[..., : h * scale, : w * scale].clamp(0, 1).to(out_dtype)


# The smallest tile "auto" tries before it gives up: below this the overlap would be most of each tile.
_SMALLEST_AUTO_TILE = 32


def _is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the allocator messages of the CPU and MPS."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _upscale_fitting_memory(model, image: torch.Tensor, scale, overlap: int, multiple_of,
                            self_ensemble: bool = False) -> torch.Tensor:
    """``upscale`` with ``tile="auto"``: the whole image, then tiles halving on each out-of-memory error."""
    minimum, multiple, _ = _requirements(model, multiple_of)
    tile = None
    while True:
        try:
            if tile is None:
                return _upscale(model, image, scale, None, overlap, multiple_of, self_ensemble)
            # at most a quarter of the tile (as rounded to the model's multiple, at most half), else none
            tile_overlap = min(overlap, tile // 4)
            if 2 * _round_up(tile_overlap, multiple) > tile:
                tile_overlap = 0
            return _upscale(model, image, scale, tile, tile_overlap, multiple_of, self_ensemble)
        except Exception as err:
            if not _is_out_of_memory(err):
                raise
            failed = tile
        # out of the except block: the error's traceback, which holds the failed attempt's tensors, is gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed attempt's blocks, cached: free them for the tiles
        longest = _round_up(max(image.shape[-2:]), multiple) if failed is None else failed
        tile = max(_round_up(longest // 2, multiple), minimum)
        if tile >= longest or tile < _SMALLEST_AUTO_TILE:
            raise RuntimeError(
                f"out of memory upscaling a {image.shape[-1]}x{image.shape[-2]} image even in tiles of {longest} "
                "pixels: run the model in bf16 or fp16, on another device, or cut the image smaller"
            )
        warnings.warn(
            f"out of memory upscaling the {image.shape[-1]}x{image.shape[-2]} image "
            + ("whole" if failed is None else f"in tiles of {failed}") + f"; retrying in tiles of {tile}",
            stacklevel=3,
        )


def _check_output(y, x, scale: int) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"the model returned {type(y).__name__}, not an image batch [B, C, H, W]")
    if tuple(y.shape[-2:]) != (x.shape[-2] * scale, x.shape[-1] * scale):
        raise ValueError(
            f"the model turned a {x.shape[-2]}x{x.shape[-1]} input into {y.shape[-2]}x{y.shape[-1]}, "
            f"not x{scale}; is the scale right?"
        )
