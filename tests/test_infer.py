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


class _Conv2x(torch.nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv with the given kernel (zero padding)."""

    def __init__(self, kernel: torch.Tensor):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None] * kernel)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def _symmetries(x):
    """The square's eight symmetries, as transpose and flips of rows and columns (another parametrisation
    than upscale's rotations, so the two cannot share a mistake), with each one's inverse."""
    for transpose in (False, True):
        for dims in ((), (-2,), (-1,), (-2, -1)):
            def forward(t, transpose=transpose, dims=dims):
                t = t.flip(dims) if dims else t
                return t.transpose(-2, -1) if transpose else t

            def inverse(t, transpose=transpose, dims=dims):
                t = t.transpose(-2, -1) if transpose else t
                return t.flip(dims) if dims else t

            yield forward, inverse


def test_self_ensemble_is_the_mean_over_the_eight_symmetries(esrgan, swinir):
    x = _image(24, 40, seed=5)  # multiples of the windowed model's window: no padding to break the symmetry
    for model in (esrgan, swinir):
        expected = sum(inverse(upscale(model, forward(x))) for forward, inverse in _symmetries(x)) / 8
        got = upscale(model, x, self_ensemble=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert (got - upscale(model, x)).abs().max() > 1e-3  # these models are not symmetric themselves
        # so the result commutes with every symmetry
        for forward, inverse in _symmetries(x):
            torch.testing.assert_close(upscale(model, forward(x), self_ensemble=True), forward(got), rtol=0, atol=1e-6)


def test_self_ensemble_leaves_a_symmetric_model_as_it_is():
    x = _image(13, 22, seed=6)
    symmetric = _Conv2x(torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16)
    torch.testing.assert_close(upscale(symmetric, x, 2, self_ensemble=True), upscale(symmetric, x, 2),
                               rtol=0, atol=1e-6)
    lopsided = _Conv2x(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]))
    assert (upscale(lopsided, x, 2, self_ensemble=True) - upscale(lopsided, x, 2)).abs().max() > 1e-2


def test_self_ensemble_in_tiles(esrgan, swinir):
    """Each tile is ensembled: for a small receptive field the tiled result is the untiled one; "auto" tiling
    ensembles the tiles it settles on; windowed models get window-multiple tiles in both orientations."""
    x = _image(72, 88, seed=7)
    whole = upscale(esrgan, x, self_ensemble=True)
    torch.testing.assert_close(upscale(esrgan, x, tile=40, overlap=16, self_ensemble=True), whole, rtol=0, atol=1e-5)
    with _MemoryBudget(esrgan, pixels=50 * 50) as budget, pytest.warns(UserWarning, match="tiles of 44"):
        got = upscale(esrgan, x, tile="auto", overlap=16, self_ensemble=True)
    torch.testing.assert_close(got, upscale(esrgan, x, tile=44, overlap=11, self_ensemble=True), rtol=0, atol=0)
    assert budget.sizes == [(72, 88)] + [(44, 44)] * 6 * 8  # the whole image failed at its first symmetry
    x = _image(21, 61, seed=8)  # padded to 24 x 64, the window multiple: 24 x 32 tiles, seen both ways round
    with _MemoryBudget(swinir, pixels=10**6) as budget:
        got = upscale(swinir, x, tile=32, overlap=8, self_ensemble=True)
    assert got.shape == (1, 3, 42, 122) and 0 <= got.min() and got.max() <= 1
    assert set(budget.sizes) == {(24, 32), (32, 24)} and len(budget.sizes) == 3 * 8
