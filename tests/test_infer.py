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


class _MemoryBudget:
    """Wraps a descriptor's module so that inputs above ``pixels`` raise what the device raises when it runs
    out of memory (``error``), and counts the calls."""

    def __init__(self, descriptor, pixels: int, error=torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                           "allocate 2.00 GiB")) -> None:
        self.descriptor, self.pixels, self.error, self.sizes = descriptor, pixels, error, []
        self.forward = descriptor.model.forward

    def __enter__(self):
        def limited(x, *args, **kwargs):
            self.sizes.append(tuple(x.shape[-2:]))
            if x.shape[-2] * x.shape[-1] > self.pixels:
                raise self.error
            return self.forward(x, *args, **kwargs)

        self.descriptor.model.forward = limited
        return self

    def __exit__(self, *exc):
        del self.descriptor.model.forward  # the class's forward again


def test_auto_tiles_only_when_memory_runs_out(esrgan, swinir):
    """"auto": the whole image while it fits, with no warning; else tiles of half the (padded) longer side,
    halved until they fit, each try announced, and the result that of upscaling in those tiles."""
    x = _image(90, 70, seed=3)
    whole = upscale(esrgan, x)
    with _MemoryBudget(esrgan, pixels=10**6) as budget, warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(upscale(esrgan, x, tile="auto"), whole, rtol=0, atol=0)
    assert budget.sizes == [(90, 70)]
    x = _image(180, 140, seed=3)
    with _MemoryBudget(esrgan, pixels=50 * 50) as budget, pytest.warns(UserWarning) as announced:
        got = upscale(esrgan, x, tile="auto", overlap=16)
    messages = [str(w.message) for w in announced]
    assert messages == ["out of memory upscaling the 140x180 image whole; retrying in tiles of 90",
                        "out of memory upscaling the 140x180 image in tiles of 90; retrying in tiles of 45"]
    assert budget.sizes[:2] == [(180, 140), (90, 90)] and set(budget.sizes[2:]) == {(45, 45)}
    torch.testing.assert_close(got, upscale(esrgan, x, tile=45, overlap=11), rtol=0, atol=0)
    # a windowed model: tiles keep to its window multiple
    x = _image(64, 40, seed=4)
    with _MemoryBudget(swinir, pixels=40 * 40) as budget, pytest.warns(UserWarning, match="tiles of 32"):
        got = upscale(swinir, x, tile="auto")
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in budget.sizes)
    torch.testing.assert_close(got, upscale(swinir, x, tile=32, overlap=8), rtol=0, atol=0)


def test_auto_gives_up_and_other_errors_pass(esrgan):
    x = _image(90, 70)
    with _MemoryBudget(esrgan, pixels=10), pytest.warns(UserWarning), \
            pytest.raises(RuntimeError, match="70x90 image even in tiles of 45 pixels"):
        upscale(esrgan, x, tile="auto")
    # the CPU allocator's failure counts as running out of memory too
    cpu_error = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    with _MemoryBudget(esrgan, pixels=50 * 50, error=cpu_error), pytest.warns(UserWarning, match="tiles of 45"):
        upscale(esrgan, x, tile="auto")
    # anything else is not retried
    with _MemoryBudget(esrgan, pixels=0, error=RuntimeError("cuDNN error: bad param")) as budget, \
            pytest.raises(RuntimeError, match="bad param"):
        upscale(esrgan, x, tile="auto")
    assert len(budget.sizes) == 1
    with pytest.raises(ValueError, match="'auto' or None, got 'half'"):
        upscale(esrgan, x, tile="half")
