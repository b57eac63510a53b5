"""Real-ESRGAN-style second-order degradation model: HR batch -> synthetic LR batch.

The pipeline (Wang et al., "Real-ESRGAN", 2021), every random choice drawn per image::

    stage 1:  blur -> random resize -> noise -> JPEG
    stage 2:  blur -> random resize -> noise -> JPEG        (with probability second_order_prob)
    final:    [resize to H/scale x W/scale (area | bilinear | bicubic) -> sinc]  and  [JPEG],
              in random order
    output:   clamp to [0, 1], round to 8-bit levels

- blur: a kernel of a random family (:data:`~adaptsr.data.blur_kernels.KERNEL_TYPES`: isotropic
  / anisotropic Gaussian, generalized Gaussian, plateau) or, with ``sinc_prob``, a sinc kernel;
  random odd size, sigma, rotation and shape parameter ``beta``.
- resize: up, down or keep with ``resize_probs``; the factor uniform in ``[1, hi]`` (up) or
  ``[lo, 1]`` (down) of ``resize_range``; relative to the current size (stage 1 of Real-ESRGAN)
  or to the target size (stage 2); mode area, bilinear or bicubic (no anti-aliasing, as in
  Real-ESRGAN).
- noise: Gaussian (sigma in 8-bit levels, ``noise_range``) or Poisson (``poisson_scale_range``),
  colour or grey (the same noise in the three channels) with ``gray_noise_prob``.
- JPEG: quality uniform in ``jpeg_range``.

Real-ESRGAN draws the resize factor, the resize mode and the noise type once per batch; here every
image draws its own (images whose sizes end up equal are still processed as one batch), unless
``share_resize_across_batch`` is set, which gives Real-ESRGAN's per-batch resize and keeps the
whole batch one tensor throughout.

kornia provides the per-sample filtering (``kornia.filters.filter2d``), the isotropic Gaussian
kernel, the RGB -> grey conversion and the per-sample-quality differentiable JPEG
(``kornia.enhance.jpeg_codec_differentiable``). It lacks the sinc, rotated anisotropic,
generalized-Gaussian and plateau kernels (:mod:`adaptsr.data.blur_kernels`) and Poisson noise
(:func:`add_poisson_noise`), which are written by hand.

Presets (:func:`get_preset`): ``"realesrgan"`` (the Real-ESRGAN x4 training settings),
``"mild"`` (the same structure with weaker degradations), and two fixed camera profiles,
``"camera"`` and ``"lowlight"``, which apply the same blur, resize and JPEG every call and differ
only in the noise drawn. AdaptSR adapts a model to one target domain, and a fixed profile is that
domain (DESIGN.md section 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import filter2d
from torch import Tensor

from adaptsr.data.blur_kernels import (
    KERNEL_TYPES,
    anisotropic_gaussian_kernel,
    generalized_gaussian_kernel,
    isotropic_gaussian_kernel,
    pad_kernel,
    plateau_kernel,
    sinc_kernel,
)

__all__ = [
    "DEGRADATION_PRESETS",
    "RESIZE_MODES",
    "DegradationConfig",
    "DegradationMixture",
    "Degrader",
    "StageConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "blur",
    "camera_profile",
    "degrade",
    "get_preset",
    "jpeg_compress",
    "min_input_size",
]

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")

#: Real-ESRGAN's kernel sizes: odd sizes 7 to 21.
_REALESRGAN_KERNEL_SIZES: tuple[int, ...] = tuple(2 * v + 1 for v in range(3, 11))
#: Real-ESRGAN draws a stage's sinc cutoff from a wider range for kernels at least this large.
SINC_LARGE_KERNEL_SIZE = 13


# -- configuration --


@dataclass
class StageConfig:
    """One degradation stage: blur -> resize -> noise -> JPEG. Defaults: Real-ESRGAN's first stage.

    Probabilities are per image. ``noise_range`` is the Gaussian noise sigma in 8-bit levels
    (divided by 255). ``resize_probs`` is (up, down, keep). ``resize_relative_to="target"`` makes
    the resized size ``factor * (H / scale, W / scale)`` (Real-ESRGAN's second stage) instead of
    ``factor * current size``.
    """

    blur_prob: float = 1.0
    kernel_sizes: tuple[int, ...] = _REALESRGAN_KERNEL_SIZES
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sinc_cutoff_range: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_range_large: tuple[float, float] = (math.pi / 5, math.pi)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_relative_to: Literal["current", "target"] = "current"
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def validate(self, where: str = "stage") -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("blur_prob", "sinc_prob", "noise_prob", "gaussian_noise_prob", "gray_noise_prob", "jpeg_prob"):
            _check_prob(f"{where}.{name}", getattr(self, name))
        _check_sizes(f"{where}.kernel_sizes", self.kernel_sizes)
        if not self.kernel_types or any(t not in KERNEL_TYPES for t in self.kernel_types):
            raise ValueError(
                f"{where}.kernel_types must be a non-empty subset of {KERNEL_TYPES}, got {self.kernel_types}"
            )
        if len(self.kernel_probs) != len(self.kernel_types):
            raise ValueError(
                f"{where}.kernel_probs has {len(self.kernel_probs)} entries for {len(self.kernel_types)} kernel_types"
            )
        _check_weights(f"{where}.kernel_probs", self.kernel_probs)
        _check_range(f"{where}.sigma_range", self.sigma_range, low=0.0, strict_low=True)
        _check_range(f"{where}.rotation_range", self.rotation_range)
        _check_range(f"{where}.betag_range", self.betag_range, low=0.0, strict_low=True)
        _check_range(f"{where}.betap_range", self.betap_range, low=0.0, strict_low=True)
        _check_range(f"{where}.sinc_cutoff_range", self.sinc_cutoff_range, low=0.0, high=math.pi, strict_low=True)
        _check_range(
            f"{where}.sinc_cutoff_range_large", self.sinc_cutoff_range_large, low=0.0, high=math.pi, strict_low=True
        )
        if len(self.resize_probs) != 3:
            raise ValueError(f"{where}.resize_probs must be (up, down, keep), got {self.resize_probs}")
        _check_weights(f"{where}.resize_probs", self.resize_probs)
        _check_range(f"{where}.resize_range", self.resize_range, low=0.0, strict_low=True)
        lo, hi = self.resize_range
        if self.resize_probs[0] > 0 and hi < 1:
            raise ValueError(f"{where}.resize_range {self.resize_range} has no room to upscale (upper end < 1)")
        if self.resize_probs[1] > 0 and lo > 1:
            raise ValueError(f"{where}.resize_range {self.resize_range} has no room to downscale (lower end > 1)")
        if self.resize_relative_to not in ("current", "target"):
            raise ValueError(
                f"{where}.resize_relative_to must be 'current' or 'target', got {self.resize_relative_to!r}"
            )
        _check_modes(f"{where}.resize_modes", self.resize_modes)
        _check_range(f"{where}.noise_range", self.noise_range, low=0.0)
        _check_range(f"{where}.poisson_scale_range", self.poisson_scale_range, low=0.0)
        _check_range(f"{where}.jpeg_range", self.jpeg_range, low=1.0, high=100.0)


def _second_stage_default() -> StageConfig:
    return StageConfig(
        blur_prob=0.8,
        sigma_range=(0.2, 1.5),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        resize_relative_to="target",
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
        # Real-ESRGAN's second JPEG is the final one (DegradationConfig.final_jpeg_*).
        jpeg_prob=0.0,
    )


@dataclass
class DegradationConfig:
    """The whole degradation model; the defaults are the ``"realesrgan"`` preset. Edit freely.

    ``second`` is None for a single-stage model. The final step resizes to the target size and
    applies a sinc filter with ``final_sinc_prob``, and JPEG-compresses with ``final_jpeg_prob``;
    it resizes first with probability ``final_resize_first_prob``, else compresses first.
    ``share_resize_across_batch`` draws one resize factor and mode per stage for the whole batch
    (Real-ESRGAN's behaviour; faster, the batch stays one tensor) instead of one per image.
    """

    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig | None = field(default_factory=_second_stage_default)
    second_order_prob: float = 1.0
    final_sinc_prob: float = 0.8
    final_sinc_kernel_sizes: tuple[int, ...] = _REALESRGAN_KERNEL_SIZES
    final_sinc_cutoff_range: tuple[float, float] = (math.pi / 3, math.pi)
    final_resize_modes: tuple[str, ...] = RESIZE_MODES
    final_resize_first_prob: float = 0.5
    final_jpeg_prob: float = 1.0
    final_jpeg_range: tuple[float, float] = (30.0, 95.0)
    share_resize_across_batch: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.first, StageConfig):
            raise TypeError(f"first must be a StageConfig, got {type(self.first).__name__}")
        self.first.validate("first")
        if self.second is not None:
            if not isinstance(self.second, StageConfig):
                raise TypeError(f"second must be a StageConfig or None, got {type(self.second).__name__}")
            self.second.validate("second")
        for name in ("second_order_prob", "final_sinc_prob", "final_resize_first_prob", "final_jpeg_prob"):
            _check_prob(name, getattr(self, name))
        _check_sizes("final_sinc_kernel_sizes", self.final_sinc_kernel_sizes)
        _check_range("final_sinc_cutoff_range", self.final_sinc_cutoff_range, low=0.0, high=math.pi, strict_low=True)
        _check_modes("final_resize_modes", self.final_resize_modes)
        _check_range("final_jpeg_range", self.final_jpeg_range, low=1.0, high=100.0)


@dataclass(frozen=True)
class DegradationMixture:
    """Several degradations, one drawn per image: ``configs[k]`` with probability ``weights[k]`` (uniform when
    ``weights`` is None). One adapter for several cameras trains on their mixture; :func:`degrade` takes it
    wherever it takes a :class:`DegradationConfig`."""

    configs: tuple[DegradationConfig, ...]
    weights: tuple[float, ...] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid component or weight."""
        if not self.configs:
            raise ValueError("a degradation mixture needs at least one degradation")
        for k, config in enumerate(self.configs):
            if not isinstance(config, DegradationConfig):
                raise TypeError(f"mixture component {k} must be a DegradationConfig, got {type(config).__name__}")
            try:
                config.validate()
            except ValueError as err:
                raise ValueError(f"mixture component {k}: {err}") from err
        if self.weights is not None:
            if len(self.weights) != len(self.configs):
                raise ValueError(f"a degradation mixture has {len(self.weights)} weights for "
                                 f"{len(self.configs)} degradations")
            _check_weights("mixture weights", self.weights)


def _check_prob(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _check_range(
    name: str,
    r: Sequence[float],
    *,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
) -> None:
    if len(r) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in r) or r[0] > r[1]:
        raise ValueError(f"{name} must be (low, high) with finite low <= high, got {r!r}")
    if low is not None and (r[0] < low or (strict_low and r[0] <= low)):
        raise ValueError(f"{name} must lie above {low}{'' if strict_low else ' (inclusive)'}, got {r!r}")
    if high is not None and r[1] > high:
        raise ValueError(f"{name} must lie at or below {high}, got {r!r}")


def _check_weights(name: str, w: Sequence[float]) -> None:
    finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w)
    if not finite or any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"{name} must be non-negative weights with a positive sum, got {w!r}")


def _check_sizes(name: str, sizes: Sequence[int]) -> None:
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"{name} must be a non-empty tuple of positive odd kernel sizes, got {sizes!r}")


def _check_modes(name: str, modes: Sequence[str]) -> None:
    if not modes or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"{name} must be a non-empty subset of {RESIZE_MODES}, got {modes!r}")


# -- presets --


def _mild() -> DegradationConfig:
    first = StageConfig(
        kernel_sizes=(7, 9, 11, 13, 15),
        sigma_range=(0.2, 1.5),
        sinc_prob=0.05,
        resize_probs=(0.2, 0.5, 0.3),
        resize_range=(0.5, 1.2),
        gaussian_noise_prob=0.7,
        noise_range=(1.0, 10.0),
        poisson_scale_range=(0.05, 1.0),
        jpeg_range=(60.0, 95.0),
    )
    second = StageConfig(
        blur_prob=0.5,
        kernel_sizes=(7, 9, 11, 13, 15),
        sigma_range=(0.2, 1.0),
        sinc_prob=0.05,
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.7, 1.2),
        resize_relative_to="target",
        gaussian_noise_prob=0.7,
        noise_range=(1.0, 5.0),
        poisson_scale_range=(0.05, 0.5),
        jpeg_prob=0.0,
    )
    return DegradationConfig(
        first=first,
        second=second,
        second_order_prob=0.5,
        final_sinc_prob=0.3,
        final_jpeg_range=(70.0, 95.0),
    )


def camera_profile(blur_sigma: float, noise: float, jpeg_quality: float) -> DegradationConfig:
    """One camera's fixed degradation, the classical model y = JPEG((x * k) downscaled + n): an isotropic
    Gaussian blur of ``blur_sigma`` HR pixels, bicubic resizing straight to the target size, colour Gaussian
    noise of sigma ``noise`` in 8-bit levels at LR, and JPEG at ``jpeg_quality``. Nothing random but the noise
    (the ``camera`` and ``lowlight`` presets are two of these)."""
    for name, value, ok, want in (
        ("blur_sigma", blur_sigma, lambda v: v > 0, "a positive number"),
        ("noise", noise, lambda v: v >= 0, "a number >= 0"),
        ("jpeg_quality", jpeg_quality, lambda v: 1 <= v <= 100, "a number in [1, 100]"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"camera profile: {name} must be {want}, got {value!r}")
    sigma, noise, quality = float(blur_sigma), float(noise), float(jpeg_quality)
    stage = StageConfig(
        blur_prob=1.0,
        kernel_sizes=(2 * math.ceil(4 * sigma) + 1,),  # +-4 sigma: truncation loses < 1e-3 of the mass
        kernel_types=("iso",),
        kernel_probs=(1.0,),
        sigma_range=(sigma, sigma),
        sinc_prob=0.0,
        resize_probs=(0.0, 0.0, 1.0),
        resize_range=(1.0, 1.0),
        resize_relative_to="target",
        resize_modes=("bicubic",),
        noise_prob=1.0,
        gaussian_noise_prob=1.0,
        noise_range=(noise, noise),
        gray_noise_prob=0.0,
        jpeg_prob=1.0,
        jpeg_range=(quality, quality),
    )
    return DegradationConfig(
        first=stage,
        second=None,
        final_sinc_prob=0.0,
        final_resize_modes=("bicubic",),
        final_jpeg_prob=0.0,
        share_resize_across_batch=True,
    )


_PRESETS: dict[str, Callable[[], DegradationConfig]] = {
    "realesrgan": DegradationConfig,
    "mild": _mild,
    "camera": lambda: camera_profile(blur_sigma=1.2, noise=10.0, jpeg_quality=60.0),
    "lowlight": lambda: camera_profile(blur_sigma=1.2, noise=25.0, jpeg_quality=50.0),
}

#: Names accepted by :func:`get_preset` and :func:`degrade`.
DEGRADATION_PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str) -> DegradationConfig:
    """A fresh, editable :class:`DegradationConfig` for a named preset (see :data:`DEGRADATION_PRESETS`)."""
    try:
        factory = _PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown degradation preset {name!r}; available presets: {', '.join(DEGRADATION_PRESETS)}"
        ) from None
    return factory()


# -- single operations (batched, per-sample parameters) --


def _per_sample(value: float | Tensor, n: int, like: Tensor, name: str) -> Tensor:
    """A float or [n] tensor -> [n, 1, 1, 1] tensor on like's device and dtype."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must be a number or a tensor of shape [{n}] (one per image), got {tuple(t.shape)}")
    return t.view(n, 1, 1, 1)


def _per_sample_bool(value: bool | Tensor, n: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(value, device=like.device).bool()
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must be a bool or a tensor of shape [{n}] (one per image), got {tuple(t.shape)}")
    return t.view(n, 1, 1, 1)


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"{name} must be an RGB batch [B, 3, H, W], got shape {tuple(x.shape)} "
            "(a single image: x.unsqueeze(0); a grey batch: x.expand(-1, 3, -1, -1))"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {x.dtype} (e.g. x.float() / 255)")


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each image of ``x`` [B, C, H, W] with its kernel ``kernels`` [B, k, k] (or one shared [k, k]).

    Reflect padding, output the size of the input (Real-ESRGAN's ``filter2D``); kornia's filter2d.
    """
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0)
    if kernels.ndim != 3 or kernels.shape[0] not in (1, x.shape[0]) or kernels.shape[-1] % 2 == 0:
        raise ValueError(
            f"kernels must be [k, k] or [B, k, k] with odd k and B = {x.shape[0]}, got {tuple(kernels.shape)}"
        )
    half = kernels.shape[-1] // 2
    if min(x.shape[-2:]) <= half:
        raise ValueError(
            f"image {tuple(x.shape[-2:])} is too small for a {kernels.shape[-1]}x{kernels.shape[-1]} kernel "
            f"(reflect padding needs each side > {half})"
        )
    return filter2d(x, kernels.to(device=x.device, dtype=x.dtype), border_type="reflect")


def add_gaussian_noise(
    x: Tensor,
    sigma: float | Tensor,
    gray: bool | Tensor = False,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """``x + sigma * N(0, 1)``; ``sigma`` in [0, 1] units, per image ([B]) or shared; grey noise is one
    field shared by the three channels. ``generator`` must live on ``x``'s device."""
    b, c, h, w = x.shape
    s = _per_sample(sigma, b, x, "sigma")
    g = _per_sample_bool(gray, b, x, "gray")
    colour = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    grey = torch.randn((b, 1, h, w), generator=generator, device=x.device, dtype=x.dtype).expand(b, c, h, w)
    out = x + torch.where(g, grey, colour) * s
    return out.clamp(0, 1) if clip else out


# kornia lacks Poisson (shot) noise.
def add_poisson_noise(
    x: Tensor,
    scale: float | Tensor,
    gray: bool | Tensor = False,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """Shot noise as Real-ESRGAN models it; ``scale`` per image ([B]) or shared.

    The image is quantised to 8-bit levels ``x_q``; with ``v`` = the number of distinct levels in
    the image rounded up to a power of two (a proxy for the photon count),
    ``noise = scale * (Poisson(v * x_q) / v - x_q)``, so its variance ``scale^2 x_q / v`` grows with
    the intensity. Grey noise is computed on the luma and shared by the three channels.
    ``generator`` must live on ``x``'s device.
    """
    b, c, h, w = x.shape
    s = _per_sample(scale, b, x, "scale")
    g = _per_sample_bool(gray, b, x, "gray")

    def shot(img: Tensor) -> Tensor:
        img = (img * 255.0).round().clamp(0, 255) / 255.0
        levels = torch.tensor([len(torch.unique(img[i])) for i in range(b)], dtype=img.dtype, device=img.device)
        v = torch.exp2(torch.ceil(torch.log2(levels))).view(b, 1, 1, 1)
        return torch.poisson(img * v, generator=generator) / v - img

    noise = shot(x)
    if bool(g.any()):
        noise = torch.where(g, shot(rgb_to_grayscale(x)).expand(b, c, h, w), noise)
    out = x + noise * s
    return out.clamp(0, 1) if clip else out


def jpeg_compress(x: Tensor, quality: float | Tensor) -> Tensor:
    """JPEG encode-decode each image at its quality ([B] or shared, in [1, 100]); kornia's differentiable codec.

    The input is clamped to [0, 1] first (as Real-ESRGAN does).
    """
    _check_batch(x, "x")
    q = torch.as_tensor(quality, dtype=torch.float32, device=x.device).reshape(-1)
    if q.numel() not in (1, x.shape[0]):
        raise ValueError(f"quality must be a number or one per image ({x.shape[0]}), got {q.numel()} values")
    if bool((q < 1).any() or (q > 100).any()):
        raise ValueError(f"JPEG quality must lie in [1, 100], got {q.tolist()}")
    dtype = x.dtype
    work = x if dtype in (torch.float32, torch.float64) else x.float()
    return jpeg_codec_differentiable(work.clamp(0, 1), q.to(work.dtype)).to(dtype)


# -- random parameter draws (CPU, from one generator, same draws on every device) --


def _uniform(gen: torch.Generator, r: Sequence[float], n: int) -> Tensor:
    return r[0] + (r[1] - r[0]) * torch.rand(n, generator=gen, dtype=torch.float64)


def _bernoulli(gen: torch.Generator, p: float, n: int) -> Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def _choice(gen: torch.Generator, weights: Sequence[float], n: int) -> Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=gen)


def _split_beta(gen: torch.Generator, r: Sequence[float], n: int) -> Tensor:
    """BasicSR's shape draw: with probability 1/2 from [lo, 1], else from [1, hi] (when lo < 1 < hi)."""
    lo, hi = r
    if not lo < 1 < hi:
        return _uniform(gen, r, n)
    low_half = _bernoulli(gen, 0.5, n)
    return torch.where(low_half, _uniform(gen, (lo, 1.0), n), _uniform(gen, (1.0, hi), n))


@dataclass
class _StageDraw:
    blur: Tensor  # [B] bool
    kernels: list[Tensor]  # B kernels, [k_i, k_i] float64 (unused where blur is False)
    resize_factor: Tensor  # [B] float64
    resize_mode: list[str]
    noise: Tensor  # [B] bool
    gaussian: Tensor  # [B] bool (else Poisson)
    sigma: Tensor  # [B], [0, 1] units
    poisson_scale: Tensor  # [B]
    gray: Tensor  # [B] bool
    jpeg: Tensor  # [B] bool
    quality: Tensor  # [B]


def _draw_kernels(cfg: StageConfig, gen: torch.Generator, n: int) -> list[Tensor]:
    # Every draw happens for every image whatever it is used for, so the random stream (and hence
    # the output for a seed) does not depend on which branches fire.
    kind = _choice(gen, cfg.kernel_probs, n)
    size = _choice(gen, [1.0] * len(cfg.kernel_sizes), n)
    sigma_x = _uniform(gen, cfg.sigma_range, n)
    sigma_y = _uniform(gen, cfg.sigma_range, n)
    theta = _uniform(gen, cfg.rotation_range, n)
    beta_g = _split_beta(gen, cfg.betag_range, n)
    beta_p = _split_beta(gen, cfg.betap_range, n)
    use_sinc = _bernoulli(gen, cfg.sinc_prob, n)
    sinc_size = _choice(gen, [1.0] * len(cfg.kernel_sizes), n)
    cut_small = _uniform(gen, cfg.sinc_cutoff_range, n)
    cut_large = _uniform(gen, cfg.sinc_cutoff_range_large, n)
    kernels = []
    for i in range(n):
        if use_sinc[i]:
            ks = cfg.kernel_sizes[int(sinc_size[i])]
            cutoff = float(cut_small[i] if ks < SINC_LARGE_KERNEL_SIZE else cut_large[i])
            kernels.append(sinc_kernel(ks, cutoff))
            continue
        ks = cfg.kernel_sizes[int(size[i])]
        t = cfg.kernel_types[int(kind[i])]
        sx, sy, th = float(sigma_x[i]), float(sigma_y[i]), float(theta[i])
        if t.endswith("iso") and not t.endswith("aniso"):
            sy, th = sx, 0.0
        if t == "iso":
            kernels.append(isotropic_gaussian_kernel(ks, sx))
        elif t == "aniso":
            kernels.append(anisotropic_gaussian_kernel(ks, sx, sy, th))
        elif t.startswith("generalized"):
            kernels.append(generalized_gaussian_kernel(ks, sx, sy, th, float(beta_g[i])))
        else:
            kernels.append(plateau_kernel(ks, sx, sy, th, float(beta_p[i])))
    return kernels


def _draw_resize(
    probs: Sequence[float], r: Sequence[float], modes: Sequence[str], gen: torch.Generator, n: int, shared: bool
) -> tuple[Tensor, list[str]]:
    direction = _choice(gen, probs, n)  # 0 up, 1 down, 2 keep
    # Real-ESRGAN: up from [1, hi], down from [lo, 1]; a range on one side of 1 is kept to itself.
    up = _uniform(gen, (max(1.0, r[0]), max(1.0, r[1])), n)
    down = _uniform(gen, (min(1.0, r[0]), min(1.0, r[1])), n)
    mode_idx = _choice(gen, [1.0] * len(modes), n)
    factor = torch.where(direction == 0, up, torch.where(direction == 1, down, torch.ones(n, dtype=torch.float64)))
    if shared:
        factor = factor[:1].expand(n).clone()
        mode_idx = mode_idx[:1].expand(n)
    return factor, [modes[int(m)] for m in mode_idx]


def _draw_stage(cfg: StageConfig, gen: torch.Generator, n: int, shared_resize: bool) -> _StageDraw:
    blur_on = _bernoulli(gen, cfg.blur_prob, n)
    kernels = _draw_kernels(cfg, gen, n)
    factor, modes = _draw_resize(cfg.resize_probs, cfg.resize_range, cfg.resize_modes, gen, n, shared_resize)
    return _StageDraw(
        blur=blur_on,
        kernels=kernels,
        resize_factor=factor,
        resize_mode=modes,
        noise=_bernoulli(gen, cfg.noise_prob, n),
        gaussian=_bernoulli(gen, cfg.gaussian_noise_prob, n),
        sigma=_uniform(gen, cfg.noise_range, n) / 255.0,
        poisson_scale=_uniform(gen, cfg.poisson_scale_range, n),
        gray=_bernoulli(gen, cfg.gray_noise_prob, n),
        jpeg=_bernoulli(gen, cfg.jpeg_prob, n),
        quality=_uniform(gen, cfg.jpeg_range, n),
    )


# -- the pipeline: a list of [1, 3, h, w] images, equal sizes batched together --


def _grouped(xs: list[Tensor], idx: Sequence[int], fn: Callable[[Tensor, list[int]], Tensor]) -> None:
    """Replace ``xs[i]`` for ``i`` in ``idx`` by ``fn(batch, members)``, one call per distinct image size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in idx:
        groups.setdefault(tuple(xs[i].shape[-2:]), []).append(i)
    for members in groups.values():
        out = fn(torch.cat([xs[i] for i in members]), members)
        for j, i in enumerate(members):
            xs[i] = out[j : j + 1]


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _where(flags: Tensor, idx: Sequence[int] | None = None) -> list[int]:
    return [i for i in (range(len(flags)) if idx is None else idx) if bool(flags[i])]


def _blur_group(kernels: list[Tensor]) -> Callable[[Tensor, list[int]], Tensor]:
    def fn(x: Tensor, members: list[int]) -> Tensor:
        size = max(kernels[i].shape[-1] for i in members)
        return blur(x, torch.stack([pad_kernel(kernels[i], size) for i in members]))

    return fn


def _run_stage(
    xs: list[Tensor],
    active: list[int],
    d: _StageDraw,
    cfg: StageConfig,
    target: tuple[int, int],
    noise_gen: torch.Generator,
) -> None:
    # -- blur --
    _grouped(xs, _where(d.blur, active), _blur_group(d.kernels))
    # -- resize (per image: its own size and mode) --
    for i in active:
        h, w = xs[i].shape[-2:]
        ref_h, ref_w = (h, w) if cfg.resize_relative_to == "current" else target
        f = float(d.resize_factor[i])
        xs[i] = _resize(xs[i], (max(1, int(ref_h * f)), max(1, int(ref_w * f))), d.resize_mode[i])
    # -- noise --
    noisy = _where(d.noise, active)
    dev = xs[0].device

    def gaussian(x: Tensor, m: list[int]) -> Tensor:
        return add_gaussian_noise(x, d.sigma[m].to(dev), d.gray[m].to(dev), noise_gen)

    def poisson(x: Tensor, m: list[int]) -> Tensor:
        return add_poisson_noise(x, d.poisson_scale[m].to(dev), d.gray[m].to(dev), noise_gen)

    _grouped(xs, _where(d.gaussian, noisy), gaussian)
    _grouped(xs, _where(~d.gaussian, noisy), poisson)
    # -- JPEG --
    _grouped(xs, _where(d.jpeg, active), lambda x, m: jpeg_compress(x, d.quality[m]))


def _run_final(xs: list[Tensor], cfg: DegradationConfig, gen: torch.Generator, target: tuple[int, int]) -> None:
    n = len(xs)
    resize_first = _bernoulli(gen, cfg.final_resize_first_prob, n)
    _, modes = _draw_resize((0.0, 0.0, 1.0), (1.0, 1.0), cfg.final_resize_modes, gen, n, cfg.share_resize_across_batch)
    use_sinc = _bernoulli(gen, cfg.final_sinc_prob, n)
    size_idx = _choice(gen, [1.0] * len(cfg.final_sinc_kernel_sizes), n)
    cutoff = _uniform(gen, cfg.final_sinc_cutoff_range, n)
    jpeg_on = _bernoulli(gen, cfg.final_jpeg_prob, n)
    quality = _uniform(gen, cfg.final_jpeg_range, n)
    kernels = [
        sinc_kernel(cfg.final_sinc_kernel_sizes[int(size_idx[i])], float(cutoff[i])) if use_sinc[i] else None
        for i in range(n)
    ]

    def jpeg(idx: list[int]) -> None:
        _grouped(xs, idx, lambda x, m: jpeg_compress(x, quality[m]))

    def resize_and_sinc(idx: list[int]) -> None:
        for i in idx:
            xs[i] = _resize(xs[i], target, modes[i])
        _grouped(xs, [i for i in idx if kernels[i] is not None], _blur_group(kernels))  # type: ignore[arg-type]

    everyone = list(range(n))
    jpeg_first = _where(~resize_first)
    jpeg(_where(jpeg_on, jpeg_first))
    resize_and_sinc(everyone)
    jpeg(_where(jpeg_on, _where(resize_first)))


# -- entry point --


def _stage_kernel_need(cfg: StageConfig) -> int:
    """Smallest image side the stage's blur accepts (reflect padding needs side > k // 2)."""
    return max(cfg.kernel_sizes) // 2 + 1 if cfg.blur_prob > 0 else 1


def _smallest_sides(cfg: DegradationConfig, side: int, scale: int) -> list[tuple[str, int, int]]:
    """(step, worst-case side entering it, side it needs) along the pipeline for an input side."""
    checks: list[tuple[str, int, int]] = []
    current = side
    target = side // scale
    stages = [("first", cfg.first)] + ([("second", cfg.second)] if cfg.second is not None else [])
    for name, st in stages:
        checks.append((f"{name} stage blur", current, _stage_kernel_need(st)))
        lo = st.resize_range[0] if st.resize_probs[1] > 0 else 1.0
        ref = current if st.resize_relative_to == "current" else target
        current = int(ref * lo)
        checks.append((f"{name} stage resize", current, 1))
    checks.append(("target size", target, 1))
    if cfg.final_sinc_prob > 0:
        checks.append(("final sinc filter", target, max(cfg.final_sinc_kernel_sizes) // 2 + 1))
    return checks


def min_input_size(config: DegradationConfig | DegradationMixture | str, scale: int) -> int:
    """The smallest HR side (a multiple of ``scale``) every draw of ``config`` can degrade at ``scale``."""
    if isinstance(config, DegradationMixture):
        return max(min_input_size(component, scale) for component in config.configs)
    cfg = get_preset(config) if isinstance(config, str) else config
    _check_scale(scale)
    side = scale
    while any(have < need for _, have, need in _smallest_sides(cfg, side, scale)):
        side += scale
    return side


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer (e.g. 2 or 4), got {scale!r}")


def _seed_of(generator: torch.Generator | int | None) -> int:
    """The seed a call draws everything from: ``generator`` itself if an integer, else one draw from it."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    elif isinstance(generator, int) and not isinstance(generator, bool):
        seed = generator
    else:
        raise TypeError(f"generator must be a torch.Generator, an integer seed or None, got {type(generator).__name__}")
    return seed


def _make_generators(
    generator: torch.Generator | int | None, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for the parameter draws, generator on ``device`` for the noise), from one seed."""
    seed = _seed_of(generator)
    params = torch.Generator(device="cpu")
    params.manual_seed(seed)
    noise = torch.Generator(device=device)
    noise.manual_seed((seed * 0x9E3779B97F4A7C15 + 1) % 2**63)  # a different stream from the same seed
    return params, noise


def _degrade_mixture(hr: Tensor, scale: int, mixture: DegradationMixture, generator) -> Tensor:
    """Each image degraded by the component it draws; the images of one component as one batch."""
    mixture.validate()
    _check_batch(hr, "hr")
    draws = torch.Generator(device="cpu")
    draws.manual_seed(_seed_of(generator))
    weights = mixture.weights or (1.0,) * len(mixture.configs)
    chosen = _choice(draws, weights, hr.shape[0])
    # a seed for every component on every call, so the draws after them do not depend on which were chosen
    seeds = [int(torch.randint(0, 2**62, (1,), generator=draws)) for _ in mixture.configs]
    parts: list[Tensor | None] = [None] * hr.shape[0]
    for k, config in enumerate(mixture.configs):
        members = (chosen == k).nonzero().flatten().tolist()
        if members:
            for i, lr in zip(members, degrade(hr[members], scale, config, seeds[k]).split(1)):
                parts[i] = lr
    return torch.cat(parts)  # type: ignore[arg-type]


def degrade(
    hr: Tensor,
    scale: int,
    config: DegradationConfig | DegradationMixture | str = "realesrgan",
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Degrade an HR batch into an LR batch with the second-order model.

    Args:
        hr: [B, 3, H, W] float RGB in [0, 1], on any device; H and W multiples of ``scale`` and at
            least :func:`min_input_size`.
        scale: the SR factor; the output is [B, 3, H / scale, W / scale].
        config: a :class:`DegradationConfig`, a :class:`DegradationMixture` (each image draws one of its
            degradations) or a preset name (:data:`DEGRADATION_PRESETS`).
        generator: an integer seed or a torch.Generator (the same seed or generator state gives the
            same output; a generator advances by one draw per call) or None (torch's global RNG).

    Returns:
        The LR batch, hr's dtype and device, clamped to [0, 1] and rounded to 8-bit levels.
        Each image gets its own random kernel, resize, noise and JPEG quality.
    """
    if isinstance(config, DegradationMixture):
        return _degrade_mixture(hr, scale, config, generator)
    if isinstance(config, str):
        cfg = get_preset(config)
    elif isinstance(config, DegradationConfig):
        cfg = config
    else:
        raise TypeError(f"config must be a DegradationConfig, a DegradationMixture or a preset name, "
                        f"got {type(config).__name__}")
    cfg.validate()
    _check_batch(hr, "hr")
    _check_scale(scale)
    b, _, h, w = hr.shape
    if b == 0:
        raise ValueError("hr is an empty batch")
    lo, hi = torch.aminmax(hr.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))) or lo < 0 or hi > 1:
        raise ValueError(
            f"hr values must lie in [0, 1], got [{lo.item():.4g}, {hi.item():.4g}] (divide 8-bit images by 255, clamp)"
        )
    if h % scale or w % scale:
        raise ValueError(
            f"hr size {h}x{w} is not divisible by scale {scale}: crop it to {h - h % scale}x{w - w % scale}"
        )
    for side_name, side in (("height", h), ("width", w)):
        for step, have, need in _smallest_sides(cfg, side, scale):
            if have < need:
                raise ValueError(
                    f"hr {side_name} {side} is too small for this degradation config at scale {scale}: the {step} "
                    f"can see a side of {have} pixels and needs {need}; use images of at least "
                    f"{min_input_size(cfg, scale)} pixels per side"
                )

    param_gen, noise_gen = _make_generators(generator, hr.device)
    shared = cfg.share_resize_across_batch
    first = _draw_stage(cfg.first, param_gen, b, shared)
    second_on = _bernoulli(param_gen, cfg.second_order_prob, b)
    second = _draw_stage(cfg.second, param_gen, b, shared) if cfg.second is not None else None

    work_dtype = hr.dtype if hr.dtype in (torch.float32, torch.float64) else torch.float32
    xs = list(hr.detach().to(work_dtype).split(1))
    target = (h // scale, w // scale)
    everyone = list(range(b))
    _run_stage(xs, everyone, first, cfg.first, target, noise_gen)
    if second is not None:
        _run_stage(xs, _where(second_on), second, cfg.second, target, noise_gen)  # type: ignore[arg-type]
    _run_final(xs, cfg, param_gen, target)
    out = torch.cat(xs)
    out = (out.clamp(0, 1) * 255.0).round() / 255.0
    return out.to(hr.dtype)


class Degrader:
    """``degrade`` with its configuration bound: the ``degrade(hr, scale, generator)`` callable the datasets
    take. A class, not a closure, so that it pickles: spawned DataLoader workers (macOS, Windows) receive
    the dataset, and its degradation with it, pickled."""

    def __init__(self, config: DegradationConfig | DegradationMixture | str) -> None:
        self.config = config

    def __call__(self, hr: Tensor, scale: int, generator: torch.Generator | int | None = None) -> Tensor:
        return degrade(hr, scale, self.config, generator)

    def __repr__(self) -> str:
        return f"Degrader({self.config!r})"
