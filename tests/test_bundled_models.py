"""The bundled base models: spandrel detects them, and they beat bicubic upsampling on held-out photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaptsr
from adaptsr.data.bundled import HELD_OUT, TRAIN, load_photo
from adaptsr.evaluate import evaluate_pairs

MODELS = Path(adaptsr.__file__).parent / "models"
BUNDLED = sorted(MODELS.glob("*.safetensors"))


def _bicubic_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    lr = F.interpolate(hr[None], scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return (lr.clamp(0, 1) * 255).round() / 255


def test_models_are_bundled():
    assert BUNDLED, f"no bundled model in {MODELS}"


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_model_loads_and_beats_bicubic(path):
    card = json.loads(path.with_suffix(".json").read_text())
    descriptor = adaptsr.load_model(path)
    assert descriptor.architecture.id in card["architecture"]
    assert descriptor.scale == card["scale"]
    assert sum(p.numel() for p in descriptor.model.parameters()) == card["parameters"]
    scale = descriptor.scale
    hr = load_photo("chelsea")[:, 60:252, 120:312]  # a 192 x 192 crop of a held-out photo (the cat's face)
    lr = _bicubic_lr(hr, scale)
    with torch.no_grad():
        sr = adaptsr.upscale(descriptor, lr)[0]
    bicubic = F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)[0]
    model_psnr = evaluate_pairs([(sr, hr)], ("psnr",), scale)["mean"]["psnr"]
    bicubic_psnr = evaluate_pairs([(bicubic, hr)], ("psnr",), scale)["mean"]["psnr"]
    assert model_psnr > bicubic_psnr, f"{path.name}: {model_psnr:.2f} dB does not beat bicubic {bicubic_psnr:.2f} dB"


def test_bundled_photos_split():
    assert not set(TRAIN) & set(HELD_OUT)
    for name in TRAIN + HELD_OUT:
        photo = load_photo(name)
        assert photo.shape[0] == 3 and photo.min() >= 0 and photo.max() <= 1 and photo.std() > 0.01
    with pytest.raises(ValueError, match="no bundled photo 'lena'"):
        load_photo("lena")
