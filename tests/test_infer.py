"""Tiled upscaling (adaptsr.infer.upscale) against the untiled run, and merged models against base + adapter."""

from __future__ import annotations

import warnings

import pytest
import torch
from spandrel import ModelLoader

import adaptsr
from adaptsr.infer import upscale

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")


def _descriptor(module):
    return ModelLoader().load_from_state_dict(module.state_dict()).eval()


@pytest.fixture(scope="module")
def esrgan(tiny_sr):
    return _descriptor(tiny_sr.esrgan())


@pytest.fixture(scope="module")
def swinir(tiny_sr):
    return _descriptor(tiny_sr.swinir(seed=1, embed_dim=12, depths=[1], mlp_ratio=1.0))


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)


def test_untiled_matches_spandrel(esrgan, swinir):
    x = _image(21, 30)
    for d in (esrgan, swinir):
        torch.testing.assert_close(upscale(d, x), d(x.clone()), rtol=0, atol=1e-6)


def test_tiled_equals_untiled_esrgan(esrgan):
    """A fully convolutional model: tiles blended only where both saw the whole receptive field."""
    x = _image(72, 88)
    ref = upscale(esrgan, x)
    assert ref.shape == (1, 3, 144, 176)
    tiled = upscale(esrgan, x, tile=40, overlap=16)  # 3 x 3 tiles
    torch.testing.assert_close(tiled, ref, rtol=0, atol=1e-5)
    # The test can fail: without overlap the tile borders miss context.
    seams = upscale(esrgan, x, tile=40, overlap=0)
    assert (seams - ref).abs().max() > 1e-3


def test_tiled_equals_untiled_swinir_window_padding(swinir):
    """SwinIR pads to its window (4): 50x61 is no multiple; tiles start on window boundaries."""
    x = _image(50, 61, seed=3)
    ref = upscale(swinir, x)
    assert ref.shape == (1, 3, 100, 122)
    for tile in (32, 30):  # 30 is rounded up to the window multiple 32
        tiled = upscale(swinir, x, tile=tile, overlap=16)
        torch.testing.assert_close(tiled, ref, rtol=0, atol=1e-4)


def test_tiles_bigger_than_image_and_batches(esrgan):
    x = torch.cat([_image(9, 13, seed=1), _image(9, 13, seed=2)])
    ref = upscale(esrgan, x)
    torch.testing.assert_close(upscale(esrgan, x, tile=64, overlap=8), ref)
    torch.testing.assert_close(ref[1:], upscale(esrgan, x[1:]), rtol=0, atol=1e-6)


def test_plain_module_needs_scale_and_checks_it(esrgan):
    x = _image(12, 12)
    with pytest.raises(ValueError, match="scale"):
        upscale(esrgan.model, x)
    torch.testing.assert_close(upscale(esrgan.model, x, scale=2), upscale(esrgan, x))
    with pytest.raises(ValueError, match="x3"):
        upscale(esrgan.model, x, scale=3)
    with pytest.raises(ValueError, match="at most half"):
        upscale(esrgan, x, tile=8, overlap=6)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        upscale(esrgan, x[0])


def test_merged_model_equals_base_plus_adapter(esrgan, tmp_path):
    torch.manual_seed(5)
    base = _descriptor(esrgan.model)  # a private copy
    adaptsr.inject_lora(base, preset="esrgan", rank=2, init_lora_weights=False)
    x = _image(20, 24)
    with torch.no_grad():
        adapted = upscale(base, x)
    adaptsr.save_adapter(base, tmp_path / "adapter")
    adaptsr.save_model(base, tmp_path / "merged.safetensors")

    merged = adaptsr.load_model(tmp_path / "merged.safetensors")
    assert merged.architecture.id == "ESRGAN"
    assert not any(True for _ in adaptsr.lora_layers(merged.model))
    torch.testing.assert_close(upscale(merged, x), adapted, rtol=0, atol=1e-5)
    assert (upscale(esrgan, x) - adapted).abs().max() > 1e-4  # the adapter changes the output

    reloaded = _descriptor(esrgan.model)
    adaptsr.load_adapter(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(upscale(reloaded, x), adapted, rtol=0, atol=1e-6)
