"""A camera profile measured from the camera's own LR images, for when there are no HR pairs to adapt on.

``estimate_camera_profile(paths)`` reads two of ``camera_profile``'s three numbers from the images:

- **JPEG quality**, exactly where the files are JPEGs written with the IJG tables (libjpeg, Pillow, most
  software): the luminance quantisation table is the standard one scaled by the quality (IJG's rule,
  below), so the quality whose scaled table is nearest the file's is read back. Cameras with tables of
  their own get the nearest IJG quality. Files without tables (PNG, TIFF) count as uncompressed. Pillow
  reads the tables and the chroma subsampling from the header; no library maps tables to a quality.
- **Noise**: scikit-image's wavelet estimate of the noise sigma (Donoho's median absolute deviation of the
  finest diagonal wavelet coefficients) sees the noise after JPEG has smoothed part of it away, plus some
  image texture. So the measured value is mapped back to the noise added before JPEG through a
  calibration: the bundled train photos, blurred and downscaled as a camera profile does, with known noise
  added and JPEG-compressed at the estimated quality and chroma subsampling by the same codec, measured the
  same way. The calibration downscales by the SR model's scale: an x2 LR keeps less of the scene's texture
  than an x4 one, which the wavelet estimate reads as noise (with the x4 calibration, noise 10 under JPEG
  60 shot at x2 read as 0).

Blur cannot be told apart from the scene's own softness without an HR reference, so ``blur_sigma`` is the
caller's (default 1.2, the built-in camera presets'). The result is an estimate: the tests measure its
error on the held-out photos with known degradations.
"""

from __future__ import annotations

import io
import os
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from adaptsr.data.degradations import DegradationConfig, camera_profile, degrade

__all__ = ["CameraEstimate", "JpegSettings", "estimate_camera_profile", "jpeg_settings", "measured_noise"]

# JPEG's example luminance table (ITU-T T.81, Annex K.1), in natural (row-major) order, as Pillow reports it
_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
])
# noise levels (8-bit sigma) the calibration simulates
_CALIBRATION_NOISE = np.arange(0.0, 52.0, 2.5)


def _ijg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg writes at ``quality`` (jpeg_quality_scaling, baseline-clamped to 255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_LUMINANCE * scale + 50) // 100, 1, 255)


@dataclass(frozen=True)
class JpegSettings:
    """What a JPEG file's header says about how it was compressed."""

    quality: int  # the IJG quality whose luminance table is nearest the file's
    ijg_exact: bool  # the file's table is exactly IJG's at that quality
    subsampling: str  # chroma subsampling: "4:4:4", "4:2:2" or "4:2:0" (what smooths colour noise)


_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # Pillow's get_sampling codes


def jpeg_settings(path: str | os.PathLike) -> JpegSettings | None:
    """The file's JPEG quality and chroma subsampling, or None for a file without JPEG quantisation tables."""
    from PIL import Image, JpegImagePlugin

    with Image.open(path) as img:
        tables = getattr(img, "quantization", None)
        if not tables or 0 not in tables:
            return None
        observed = np.asarray(tables[0], dtype=np.int64)
        subsampling = _SUBSAMPLING.get(JpegImagePlugin.get_sampling(img), "4:2:0")
    errors = [(int(np.abs(_ijg_table(q) - observed).sum()), q) for q in range(1, 101)]
    error, quality = min(errors, key=lambda eq: (eq[0], -eq[1]))  # ties: the higher quality (tables clip at 1)
    return JpegSettings(quality, error == 0, subsampling)


def measured_noise(image: torch.Tensor) -> float:
    """The wavelet (Donoho) noise estimate of an RGB image [3, H, W] in [0, 1], in 8-bit levels, averaged
    over the channels: what ``estimate_camera_profile`` calibrates."""
    from skimage.restoration import estimate_sigma

    array = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    return 255.0 * float(estimate_sigma(array, channel_axis=-1, average_sigmas=True))


def _jpeg(image: torch.Tensor, quality: int, subsampling: str) -> torch.Tensor:
    """``image`` [3, H, W] through Pillow's JPEG codec (libjpeg, the codec cameras' files are read with)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=int(quality), subsampling=subsampling)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


@lru_cache(maxsize=16)
def _calibration(jpeg: tuple[int, str] | None, blur_sigma: float, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(measured noise, added noise) on the bundled train photos downscaled by ``scale``, for JPEG
    ``(quality, subsampling)`` (None: no JPEG)."""
    from adaptsr.data.bundled import TRAIN, load_photo

    clean_profile = camera_profile(blur_sigma=blur_sigma, noise=0.0, jpeg_quality=100)
    clean_profile.first.jpeg_prob = 0.0  # blur and downscaling only: the noise and the codec come below
    generator = torch.Generator().manual_seed(0)
    measured = np.zeros(len(_CALIBRATION_NOISE))
    for name in TRAIN:
        hr = load_photo(name)
        side = (min(hr.shape[1:]) // scale) * scale
        lr = degrade(hr[None, :, :side, :side], scale, clean_profile, generator=0)[0]
        for i, sigma in enumerate(_CALIBRATION_NOISE):
            noisy = (lr + sigma / 255.0 * torch.randn(lr.shape, generator=generator)).clamp(0, 1)
            noisy = (noisy * 255).round() / 255
            measured[i] += measured_noise(_jpeg(noisy, *jpeg) if jpeg is not None else noisy)
    measured /= len(TRAIN)
    return np.maximum.accumulate(measured), _CALIBRATION_NOISE  # monotone, for the inverse


def _added_noise(measured: float, jpeg: tuple[int, str] | None, blur_sigma: float, scale: int) -> float:
    """The noise sigma added before JPEG that the calibration at ``scale`` says gives ``measured``."""
    seen, added = _calibration(jpeg, blur_sigma, scale)
    return float(np.interp(measured, seen, added))  # clamped to the calibrated range at both ends


@dataclass
class CameraEstimate:
    """What ``estimate_camera_profile`` read, image by image, and the profile it makes of the medians."""

    blur_sigma: float
    noise: float  # 8-bit sigma added before JPEG (calibrated)
    jpeg_quality: int  # 100 where no file had JPEG tables
    scale: int = 4  # the SR scale the noise was calibrated at
    # per image: name, measured_noise, and from its JPEG header (None without one) jpeg_quality, ijg_exact, subsampling
    images: list[dict] = field(default_factory=list)

    @property
    def profile(self) -> DegradationConfig:
        return camera_profile(self.blur_sigma, self.noise, self.jpeg_quality)

    def to_dict(self) -> dict:
        """The degradation-file form ``--degradation`` reads (``adaptsr.data.degradation_files``)."""
        return {"camera_profile": {"blur_sigma": self.blur_sigma, "noise": round(self.noise, 1),
                                   "jpeg_quality": self.jpeg_quality}}


def estimate_camera_profile(paths, *, blur_sigma: float = 1.2, scale: int = 4) -> CameraEstimate:
    """Estimate a camera profile from LR images of one camera (files, as read by ``read_image``): the median
    JPEG quality of the files that have tables (100 if none does), and the median measured noise mapped
    through the calibration at that quality. ``blur_sigma`` is taken as given (module docstring); ``scale`` is
    the SR model's, the one the profile will degrade its HR photos by."""
    from adaptsr.data.images import read_image

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no images to estimate a camera profile from")
    camera_profile(blur_sigma, 0.0, 100)  # checks blur_sigma before any work
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 8:
        raise ValueError(f"scale must be an SR model's scale, an integer from 1 to 8, got {scale!r}")
    images = []
    for path in paths:
        noise = measured_noise(read_image(path))  # first: an unreadable file is named here
        settings = jpeg_settings(path)
        images.append({
            "name": path.name,
            "measured_noise": noise,
            "jpeg_quality": settings.quality if settings else None,
            "ijg_exact": settings.ijg_exact if settings else None,
            "subsampling": settings.subsampling if settings else None,
        })
    jpegs = [image for image in images if image["jpeg_quality"] is not None]
    jpeg = None
    if jpegs:
        quality = round(statistics.median(image["jpeg_quality"] for image in jpegs))
        jpeg = (quality, statistics.mode(image["subsampling"] for image in jpegs))
    noise = _added_noise(statistics.median(image["measured_noise"] for image in images), jpeg, blur_sigma, scale)
    return CameraEstimate(blur_sigma=float(blur_sigma), noise=noise, jpeg_quality=jpeg[0] if jpeg else 100,
                          scale=scale, images=images)
