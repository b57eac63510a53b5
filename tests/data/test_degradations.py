"""Tests for adaptsr.data.degradations and adaptsr.data.blur_kernels.

Statistics are checked against what the operation must do (blur widens edges, noise has the
variance it was asked for, JPEG leaves 8x8 blocks, a sinc kernel removes frequencies above its
cutoff), never against stored output numbers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptsr.data import (
    DEGRADATION_PRESETS,
    DegradationConfig,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    anisotropic_gaussian_kernel,
    blur,
    degrade,
    generalized_gaussian_kernel,
    get_preset,
    isotropic_gaussian_kernel,
    jpeg_compress,
    min_input_size,
    plateau_kernel,
    sinc_kernel,
)


def _hr(b: int = 2, side: int = 80, seed: int = 0, texture: float = 0.3) -> torch.Tensor:
    """A smooth random image plus ``texture`` of pixel noise, [b, 3, side, side] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, side // 8, side // 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
    return ((1 - texture) * img + texture * torch.rand(b, 3, side, side, generator=g)).clamp(0, 1)


def _only(**stage_overrides) -> DegradationConfig:
    """A single-stage config that does nothing unless told to (no blur, resize, noise, JPEG, sinc)."""
    stage = StageConfig(
        blur_prob=0.0,
        sinc_prob=0.0,
        resize_probs=(0.0, 0.0, 1.0),
        noise_prob=0.0,
        jpeg_prob=0.0,
    )
    stage = dataclasses.replace(stage, **stage_overrides)
    return DegradationConfig(first=stage, second=None, final_sinc_prob=0.0, final_jpeg_prob=0.0)


# -- presets: determinism, per-sample randomness, shape and range --


@pytest.mark.parametrize("preset", DEGRADATION_PRESETS)
def test_preset_is_deterministic_under_a_seed(preset):
    hr = _hr()
    a = degrade(hr, 4, preset, generator=123)
    assert torch.equal(a, degrade(hr, 4, preset, generator=123))
    assert torch.equal(
        degrade(hr, 4, preset, generator=torch.Generator().manual_seed(5)),
        degrade(hr, 4, preset, generator=torch.Generator().manual_seed(5)),
    )
    assert not torch.equal(a, degrade(hr, 4, preset, generator=124))


def test_generator_advances_between_calls_and_global_seed_is_respected():
    hr = _hr()
    g = torch.Generator().manual_seed(0)
    first, second = degrade(hr, 4, "realesrgan", g), degrade(hr, 4, "realesrgan", g)
    assert not torch.equal(first, second)
    torch.manual_seed(7)
    a = degrade(hr, 4, "mild")
    torch.manual_seed(7)
    assert torch.equal(a, degrade(hr, 4, "mild"))


@pytest.mark.parametrize("preset", DEGRADATION_PRESETS)
@pytest.mark.parametrize("scale", [2, 4])
def test_output_shape_range_and_8bit_levels(preset, scale):
    hr = _hr(b=2, side=80)
    lr = degrade(hr, scale, preset, generator=0)
    assert lr.shape == (2, 3, 80 // scale, 80 // scale)
    assert lr.dtype == hr.dtype and lr.device == hr.device
    assert lr.min() >= 0 and lr.max() <= 1
    levels = lr * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_non_square_and_low_precision_inputs():
    hr = _hr(b=1, side=96)[:, :, :80, :]
    lr = degrade(hr, 4, "mild", generator=0)
    assert lr.shape == (1, 3, 20, 24)
    lr16 = degrade(hr.to(torch.bfloat16), 4, "camera", generator=0)
    assert lr16.dtype == torch.bfloat16 and lr16.shape == (1, 3, 20, 24)


@pytest.mark.parametrize("preset", DEGRADATION_PRESETS)
def test_identical_images_in_a_batch_get_different_degradations(preset):
    hr = _hr(b=1).expand(3, -1, -1, -1).contiguous()
    lr = degrade(hr, 4, preset, generator=3)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(lr[i], lr[j])


def test_realesrgan_draws_different_kernels_per_image():
    # No noise and no JPEG anywhere: what differs between identical images is the blur and resize.
    cfg = get_preset("realesrgan")
    for stage in (cfg.first, cfg.second):
        stage.noise_prob = 0.0
        stage.jpeg_prob = 0.0
    cfg.final_jpeg_prob = 0.0
    hr = _hr(b=1).expand(4, -1, -1, -1).contiguous()
    lr = degrade(hr, 4, cfg, generator=11)
    assert len({lr[i].sum().item() for i in range(4)}) == 4


@pytest.mark.parametrize("preset", ["realesrgan", "mild"])
def test_seed_drives_the_random_parameters_not_only_the_noise(preset):
    cfg = get_preset(preset)
    for stage in (cfg.first, cfg.second):
        stage.noise_prob = 0.0
    hr = _hr()
    assert torch.equal(degrade(hr, 4, cfg, 1), degrade(hr, 4, cfg, 1))
    assert not torch.equal(degrade(hr, 4, cfg, 1), degrade(hr, 4, cfg, 2))


@pytest.mark.parametrize(
    "step",
    [
        {"blur_prob": 1.0, "kernel_types": ("aniso",), "kernel_probs": (1.0,), "kernel_sizes": (21,)},
        {"blur_prob": 1.0, "kernel_types": ("generalized_iso",), "kernel_probs": (1.0,), "sigma_range": (1.0, 1.0)},
        {"blur_prob": 1.0, "sinc_prob": 1.0, "kernel_sizes": (13,)},
        {"resize_probs": (0.0, 1.0, 0.0), "resize_range": (0.5, 1.0), "resize_modes": ("bilinear",)},
        {"resize_probs": (0.0, 1.0, 0.0), "resize_range": (0.5, 0.5)},
        {"jpeg_prob": 1.0, "jpeg_range": (30.0, 95.0)},
    ],
    ids=["aniso-blur", "generalized-beta", "sinc", "resize-factor", "resize-mode", "jpeg-quality"],
)
def test_each_random_step_is_drawn_per_image(step):
    # One random step alone, on identical images: the images must come out different.
    hr = _hr(b=1, side=64).expand(4, -1, -1, -1).contiguous()
    lr = degrade(hr, 2, _only(**step), generator=0)
    assert len({lr[i].sum().item() for i in range(4)}) > 1


@pytest.mark.parametrize("preset", ["camera", "lowlight"])
def test_camera_profiles_are_fixed_apart_from_noise(preset):
    cfg = get_preset(preset)
    hr = _hr()
    noisy_a, noisy_b = degrade(hr, 4, cfg, 1), degrade(hr, 4, cfg, 2)
    assert not torch.equal(noisy_a, noisy_b)
    cfg.first.noise_prob = 0.0
    assert torch.equal(degrade(hr, 4, cfg, 1), degrade(hr, 4, cfg, 2))


def test_share_resize_across_batch_is_deterministic():
    cfg = get_preset("realesrgan")
    cfg.share_resize_across_batch = True
    hr = _hr(b=3)
    assert torch.equal(degrade(hr, 4, cfg, 9), degrade(hr, 4, cfg, 9))


# -- presets and config --


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown degradation preset 'nope'") as info:
        get_preset("nope")
    for name in DEGRADATION_PRESETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="available presets"):
        degrade(_hr(), 4, "nope")


def test_presets_are_fresh_editable_copies_and_realesrgan_is_the_default():
    a = get_preset("realesrgan")
    a.first.jpeg_range = (90.0, 95.0)
    assert get_preset("realesrgan").first.jpeg_range == (30.0, 95.0)
    assert get_preset("realesrgan") == DegradationConfig()
    assert set(DEGRADATION_PRESETS) >= {"realesrgan", "mild", "camera", "lowlight"}


def test_realesrgan_preset_has_the_published_settings():
    cfg = get_preset("realesrgan")
    assert cfg.first.kernel_sizes == tuple(range(7, 22, 2)) and cfg.first.jpeg_range == (30.0, 95.0)
    assert cfg.first.sigma_range == (0.2, 3.0) and cfg.second.sigma_range == (0.2, 1.5)
    assert cfg.first.resize_range == (0.15, 1.5) and cfg.second.resize_range == (0.3, 1.2)
    assert cfg.first.noise_range == (1.0, 30.0) and cfg.second.noise_range == (1.0, 25.0)
    assert cfg.first.poisson_scale_range == (0.05, 3.0) and cfg.second.poisson_scale_range == (0.05, 2.5)
    assert cfg.second.blur_prob == 0.8 and cfg.final_sinc_prob == 0.8 and cfg.final_jpeg_range == (30.0, 95.0)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: setattr(c.first, "blur_prob", 1.5), r"first\.blur_prob"),
        (lambda c: setattr(c.first, "kernel_sizes", (7, 8)), r"first\.kernel_sizes"),
        (lambda c: setattr(c.first, "kernel_types", ("iso", "box")), r"first\.kernel_types"),
        (lambda c: setattr(c.second, "jpeg_range", (50.0, 20.0)), r"second\.jpeg_range"),
        (lambda c: setattr(c, "final_resize_modes", ("nearest",)), "final_resize_modes"),
        (lambda c: setattr(c.first, "kernel_probs", (1.0,)), r"first\.kernel_probs"),
    ],
)
def test_invalid_config_fields_are_named(edit, match):
    cfg = get_preset("realesrgan")
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        degrade(_hr(), 4, cfg, 0)


# -- input validation --


def test_input_validation_errors():
    hr = _hr()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        degrade(hr[0], 4, "camera")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        degrade(hr[:, :1], 4, "camera")
    with pytest.raises(TypeError, match="floating-point"):
        degrade((hr * 255).to(torch.uint8), 4, "camera")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(hr * 2, 4, "camera")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(hr - 0.5, 4, "camera")
    with pytest.raises(ValueError, match="scale"):
        degrade(hr, 0, "camera")
    with pytest.raises(ValueError, match="scale"):
        degrade(hr, 2.0, "camera")
    with pytest.raises(ValueError, match="not divisible by scale 3"):
        degrade(hr, 3, "camera")
    with pytest.raises(TypeError, match="generator"):
        degrade(hr, 4, "camera", generator="seed")
    with pytest.raises(TypeError, match="config"):
        degrade(hr, 4, {"first": None})


def test_too_small_image_names_the_minimum():
    need = min_input_size("realesrgan", 4)
    assert degrade(_hr(b=1, side=need), 4, "realesrgan", 0).shape[-1] == need // 4
    with pytest.raises(ValueError, match=f"at least {need} pixels"):
        degrade(_hr(b=1, side=need - 4), 4, "realesrgan", 0)


def test_min_input_size_is_enough_for_every_draw():
    # At the minimum size no draw of the strongest preset may fail, whatever the seed.
    side = min_input_size("realesrgan", 4)
    hr = _hr(b=8, side=side)
    for seed in range(3):
        assert degrade(hr, 4, "realesrgan", seed).shape == (8, 3, side // 4, side // 4)


# -- blur --


def _step_edge(side: int = 48) -> torch.Tensor:
    img = torch.full((1, 3, side, side), 0.2)
    img[..., side // 2 :] = 0.8
    return img


def _transition_width(img: torch.Tensor) -> float:
    """Mean over rows of the number of pixels between 10% and 90% of a left-to-right step."""
    row = img.mean(1)[0]
    lo, hi = row[:, :4].mean(), row[:, -4:].mean()
    t = (row - lo) / (hi - lo)
    return ((t > 0.1) & (t < 0.9)).sum(-1).float().mean().item()


def _gradient_energy(img: torch.Tensor) -> float:
    return ((img[..., 1:] - img[..., :-1]) ** 2).sum().item() + ((img[..., 1:, :] - img[..., :-1, :]) ** 2).sum().item()


_KERNELS = {
    "iso": lambda: isotropic_gaussian_kernel(13, 1.5),
    "aniso": lambda: anisotropic_gaussian_kernel(13, 2.0, 0.8, 0.6),
    "generalized": lambda: generalized_gaussian_kernel(13, 1.5, 1.5, 0.0, 0.7),
    "plateau": lambda: plateau_kernel(13, 1.5, 1.0, 0.3, 1.5),
    "sinc": lambda: sinc_kernel(13, math.pi / 3),
}


@pytest.mark.parametrize("kind", list(_KERNELS))
def test_blur_widens_a_step_edge_and_lowers_gradient_energy(kind):
    edge = _step_edge()
    out = blur(edge, _KERNELS[kind]())
    assert _transition_width(edge) == 0
    assert _transition_width(out) >= 1
    assert _gradient_energy(out) < 0.8 * _gradient_energy(edge)


def test_blur_in_the_pipeline_grows_with_sigma():
    edge = _step_edge()
    widths = []
    for sigma in (0.5, 1.5, 3.0):
        cfg = _only(blur_prob=1.0, kernel_types=("iso",), kernel_probs=(1.0,), kernel_sizes=(21,))
        cfg.first.sigma_range = (sigma, sigma)
        widths.append(_transition_width(degrade(edge, 1, cfg, 0)))
    assert widths[0] < widths[1] < widths[2]


def test_blur_applies_each_images_own_kernel():
    edge = _step_edge().expand(2, -1, -1, -1)
    kernels = torch.stack([isotropic_gaussian_kernel(13, 0.6), isotropic_gaussian_kernel(13, 2.5)])
    out = blur(edge, kernels)
    assert _transition_width(out[:1]) < _transition_width(out[1:])


# -- kernels --

_sigma = st.floats(0.3, 3.0)
_theta = st.floats(-math.pi, math.pi)
_beta = st.floats(0.5, 4.0)
_size = st.sampled_from([7, 9, 13, 21])


@settings(max_examples=20, deadline=None)
@given(ks=_size, sx=_sigma, sy=_sigma, theta=_theta, beta=_beta, cutoff=st.floats(0.3, math.pi))
def test_kernels_sum_to_one_and_are_point_symmetric(ks, sx, sy, theta, beta, cutoff):
    kernels = [
        anisotropic_gaussian_kernel(ks, sx, sy, theta),
        generalized_gaussian_kernel(ks, sx, sy, theta, beta),
        plateau_kernel(ks, sx, sy, theta, beta),
        sinc_kernel(ks, cutoff),
        isotropic_gaussian_kernel(ks, sx),
    ]
    for k in kernels:
        assert k.shape == (ks, ks)
        assert torch.isfinite(k).all()
        assert abs(k.sum().item() - 1) < 1e-10
        torch.testing.assert_close(k, k.flip(0, 1))  # k(p) = k(-p): a covariance is symmetric


@settings(max_examples=20, deadline=None)
@given(ks=_size, s=_sigma, beta=_beta, cutoff=st.floats(0.3, math.pi))
def test_isotropic_kernels_have_every_mirror_symmetry(ks, s, beta, cutoff):
    for k in (
        isotropic_gaussian_kernel(ks, s),
        generalized_gaussian_kernel(ks, s, s, 0.0, beta),
        plateau_kernel(ks, s, s, 0.0, beta),
        sinc_kernel(ks, cutoff),
    ):
        torch.testing.assert_close(k, k.T)
        torch.testing.assert_close(k, k.flip(0))
        torch.testing.assert_close(k, k.flip(1))


def test_anisotropic_kernel_is_rotated_and_agrees_with_kornia_when_isotropic():
    k = anisotropic_gaussian_kernel(15, 3.0, 0.7, math.pi / 4)
    assert not torch.allclose(k, k.flip(1))  # a diagonal ellipse is not left-right symmetric
    torch.testing.assert_close(k, k.T)  # ...but is symmetric about its diagonal
    # sigma_x along the first diagonal: the kernel falls off more slowly along it.
    c = 7
    assert k[c + 3, c + 3] > k[c + 3, c - 3]
    torch.testing.assert_close(anisotropic_gaussian_kernel(11, 1.3, 1.3, 0.4), isotropic_gaussian_kernel(11, 1.3))
    torch.testing.assert_close(
        generalized_gaussian_kernel(11, 1.3, 0.9, 0.4, 1.0), anisotropic_gaussian_kernel(11, 1.3, 0.9, 0.4)
    )


def test_generalized_and_plateau_shapes():
    # beta > 1 flattens the top and thins the tails relative to the Gaussian; beta < 1 the reverse.
    g = isotropic_gaussian_kernel(21, 2.0)
    flat = generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, 3.0)
    heavy = generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, 0.5)
    c = 10
    assert flat[c, c + 1] / flat[c, c] > g[c, c + 1] / g[c, c]
    assert heavy[c, -1] / heavy[c, c] > g[c, -1] / g[c, c]
    p = plateau_kernel(21, 2.0, 2.0, 0.0, 2.0)
    assert p[c, c] == p.max() and (p[c, c:].diff() <= 0).all()


@pytest.mark.parametrize("cutoff", [math.pi / 2, math.pi / 3])
def test_sinc_kernel_attenuates_above_its_cutoff(cutoff):
    k = sinc_kernel(21, cutoff)
    n = 128
    response = torch.fft.fft2(k, s=(n, n)).abs()
    f = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    r = torch.sqrt(fx**2 + fy**2)
    passband = response[r < 0.7 * cutoff]
    stopband = response[(r > 1.3 * cutoff) & (r <= math.pi)]
    assert passband.mean() > 0.8
    assert stopband.mean() < 0.1 * passband.mean()
    # A truncated ideal low-pass overshoots by about 9% (Gibbs); allow twice that.
    assert stopband.max() < 0.2


def test_sinc_kernel_with_higher_cutoff_keeps_more_detail():
    edge = _step_edge()
    assert _gradient_energy(blur(edge, sinc_kernel(21, math.pi / 5))) < _gradient_energy(
        blur(edge, sinc_kernel(21, 0.9 * math.pi))
    )


def test_kernel_argument_errors():
    with pytest.raises(ValueError, match="odd"):
        isotropic_gaussian_kernel(8, 1.0)
    with pytest.raises(ValueError, match="sigma_y"):
        anisotropic_gaussian_kernel(7, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="cutoff"):
        sinc_kernel(7, 4.0)
    with pytest.raises(ValueError, match="too small"):
        blur(torch.rand(1, 3, 8, 8), isotropic_gaussian_kernel(21, 2.0))


# -- noise --


def test_gaussian_noise_raises_variance_by_sigma_squared():
    flat = torch.full((2, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(0)
    out = add_gaussian_noise(flat, torch.tensor([5 / 255, 20 / 255]), generator=g)
    assert flat.var() == 0
    for i, sigma in enumerate((5 / 255, 20 / 255)):
        assert abs(out[i].var().item() / sigma**2 - 1) < 0.1


def test_grey_noise_is_shared_by_the_channels_and_colour_noise_is_not():
    flat = torch.full((2, 3, 32, 32), 0.5)
    out = add_gaussian_noise(flat, 0.05, gray=torch.tensor([True, False]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert not torch.equal(out[1, 0], out[1, 1])
    out = add_poisson_noise(flat, 1.0, gray=torch.tensor([True, False]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 0], out[0, 1]) and not torch.equal(out[1, 0], out[1, 1])


def test_poisson_noise_variance_grows_with_intensity():
    # A ramp with 256 distinct levels: the photon-count proxy is v = 256, so the noise variance of
    # a pixel at level x is scale^2 * x / v.
    side = 256
    ramp = torch.linspace(0, 1, side, dtype=torch.float64).view(1, 1, 1, side).expand(1, 3, 192, side).contiguous()
    out = add_poisson_noise(ramp, 1.0, generator=torch.Generator().manual_seed(0), clip=False)
    noise = (out - (ramp * 255).round() / 255).mean(0)
    dark, bright = slice(30, 60), slice(190, 220)
    var_dark, var_bright = noise[..., dark].var().item(), noise[..., bright].var().item()
    level_dark, level_bright = ramp[0, 0, 0, dark].mean().item(), ramp[0, 0, 0, bright].mean().item()
    assert var_bright > 2 * var_dark
    assert abs(var_dark / (level_dark / 256) - 1) < 0.2
    assert abs(var_bright / (level_bright / 256) - 1) < 0.2


def test_noise_in_the_pipeline_raises_variance_on_a_flat_image():
    flat = torch.full((2, 3, 64, 64), 0.5)
    assert degrade(flat, 4, _only(), 0).var() == 0
    camera, lowlight = degrade(flat, 4, "camera", 0), degrade(flat, 4, "lowlight", 0)
    assert camera.var() > 0
    assert lowlight.var() > 2 * camera.var()
    poisson = _only(noise_prob=1.0, gaussian_noise_prob=0.0, poisson_scale_range=(1.0, 1.0))
    assert degrade(flat, 1, poisson, 0).var() > 0


# -- JPEG --


def _gentle_gradient(side: int = 64) -> torch.Tensor:
    x = torch.linspace(0, 1, side)
    return (0.4 + 0.1 * (0.6 * x[None, :] + 0.4 * x[:, None])).expand(1, 3, side, side).contiguous()


def _blockiness(img: torch.Tensor) -> float:
    """Mean |horizontal difference| across 8-pixel block boundaries over the mean inside blocks."""
    y = img.mean(1)[0]
    d = (y[:, 1:] - y[:, :-1]).abs()
    boundary = d[:, 7::8].mean()
    inside = torch.cat([d[:, j::8] for j in range(7)], 1).mean()
    return (boundary / inside).item()


@pytest.mark.parametrize("quality", [10, 30, 50])
def test_jpeg_produces_8x8_blocking_on_a_smooth_gradient(quality):
    img = _gentle_gradient()
    assert abs(_blockiness(img) - 1) < 0.05
    out = jpeg_compress(img, quality)
    assert _blockiness(out) > 2
    assert _blockiness(out.transpose(-1, -2)) > 2


def test_jpeg_quality_is_per_image_and_pipeline_jpeg_blocks():
    img = _hr(b=1, side=64, texture=0.0).expand(2, -1, -1, -1)
    out = jpeg_compress(img, torch.tensor([95.0, 10.0]))
    err = (out - img).abs().flatten(1).mean(1)
    assert err[1] > 2 * err[0]
    cfg = _only(jpeg_prob=1.0, jpeg_range=(30.0, 30.0))
    assert _blockiness(degrade(_gentle_gradient(), 1, cfg, 0)) > 2
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(img, 0.0)
