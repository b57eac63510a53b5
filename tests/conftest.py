"""Shared test machinery: the one tolerance table (DESIGN.md section 4 rule 6) and LoRA case generators.

Tolerance rule: for every output and gradient, a backend run in dtype ``d`` is compared with the
reference backend run in float64 (the oracle) and with the reference backend run in ``d``
("plain torch")::

    max|actual - ref64|  <=  2 * max|plain - ref64|  +  atol[d] * max(magnitude)

``magnitude`` is the float64 reference evaluated on the absolute values of every input (and of
dy): entry by entry the sum of the absolute values of the terms behind the result, the scale of
the rounding error of any summation order or any regrouping of the same terms (merging W + s B A
first, contracting a rounded full weight gradient with B). It defaults to ``|ref64|``. So
``atol[d]`` is a small multiple of the unit roundoff of ``d``, one table for outputs and
gradients whatever the reduction behind them. NaN and inf never pass.

The helpers are handed to tests as fixtures (``assert_close_to_reference``, ``assert_close``,
``abs_inputs``, ``conv_case_strategy``, ``linear_case_strategy``, ``make_conv_tensors``,
``make_linear_tensors``, ``tiny_sr``; all session-scoped, so hypothesis tests can take them; the
session-wide autouse ``single_threaded``; and the per-test ``poisoned_window_attention``) rather than
imported, so the test files work under every pytest import mode and next to other ``conftest.py`` files.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. It must be switched on before
# the kernel modules are imported (they are imported lazily, on the first triton-backend call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Autotuning's tests race backends: choices kept on disk by an earlier run (the user's cache) would skip the races.
# tests/test_autotune.py turns the cache on where it tests the cache.
os.environ["ADAPTSR_AUTOTUNE_CACHE"] = "off"

from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

# -- the tolerance table --

# Unit roundoff (half an ulp at 1) of each dtype.
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# atol[d], in units of max(magnitude). A merged-weight backend rounds differently from the
# two-path form (W + s B A once in the forward; a rounded full weight gradient contracted with
# B or A in the backward), each rounding at most one unit roundoff of its terms' magnitude.
# Measured worst excess over 2 x plain on the op tests (a few thousand random cases, autocast
# included): about 1.7 unit roundoffs of the magnitude in float16 and bfloat16, 1.5 in float32,
# 5.5 in float64.
ATOL: dict[torch.dtype, float] = {
    torch.float64: 16 * _UNIT_ROUNDOFF[torch.float64],
    torch.float32: 16 * _UNIT_ROUNDOFF[torch.float32],
    torch.float16: 4 * _UNIT_ROUNDOFF[torch.float16],
    torch.bfloat16: 4 * _UNIT_ROUNDOFF[torch.bfloat16],
}

# (rtol, atol) for direct comparisons of two computations of the same function in one dtype
# (merge round trips, module vs functional, backend vs nn.Conv2d in float64).
_DIRECT = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

def _max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def _check_close_to_reference(
    actual, reference_f64, torch_plain, name: str, *, dtype: torch.dtype | None = None, magnitude=None
) -> None:
    """Raise AssertionError unless ``actual`` satisfies the tolerance rule (see module docstring).

    ``dtype``: the precision the computation ran in, when it is not ``actual.dtype`` (under
    autocast, float32 parameters get float32 gradients computed in bfloat16 or float16).
    ``magnitude``: the float64 reference on absolute values (defaults to ``reference_f64``).
    """
    assert actual is not None, f"{name}: the backend returned no tensor"
    assert reference_f64 is not None and torch_plain is not None, f"{name}: reference missing"
    assert actual.shape == reference_f64.shape == torch_plain.shape, (
        f"{name}: shapes differ: backend {tuple(actual.shape)}, reference {tuple(reference_f64.shape)}, "
        f"plain {tuple(torch_plain.shape)}"
    )
    assert reference_f64.dtype == torch.float64, f"{name}: the reference must be float64, got {reference_f64.dtype}"
    assert torch_plain.dtype == actual.dtype, f"{name}: plain torch gave {torch_plain.dtype}, backend {actual.dtype}"
    dtype = actual.dtype if dtype is None else dtype
    assert dtype in ATOL, f"{name}: no tolerance for {dtype}"
    magnitude = reference_f64 if magnitude is None else magnitude
    assert magnitude.shape == reference_f64.shape, f"{name}: magnitude has shape {tuple(magnitude.shape)}"
    assert torch.isfinite(reference_f64).all(), f"{name}: the float64 reference is not finite"
    assert torch.isfinite(actual).all(), f"{name}: backend result has NaN/inf ({dtype})"
    ref = reference_f64.detach()
    err = _max_abs(actual.detach().double() - ref)
    # Plain torch may overflow in float16 where the backend does not: then it sets no bound.
    plain_err = _max_abs(torch_plain.detach().double() - ref) if torch.isfinite(torch_plain).all() else 0.0
    scale = max(_max_abs(magnitude), _max_abs(ref))
    bound = 2.0 * plain_err + ATOL[dtype] * scale
    assert err <= bound, (
        f"{name} ({dtype}): max abs error {err:.3e} > bound {bound:.3e} "
        f"(plain torch error {plain_err:.3e}, magnitude {scale:.3e}, |ref| max {_max_abs(ref):.3e})"
    )


def _check_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Two computations of the same function in the same dtype agree (``_DIRECT`` tolerances)."""
    assert torch.isfinite(actual).all(), f"{name}: result has NaN/inf"
    rtol, atol = _DIRECT[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _abs_inputs(tensors: dict) -> dict:
    """The inputs with every value replaced by its absolute value: run the float64 reference on
    these (and on |dy|) to get the ``magnitude`` of the tolerance rule."""
    return {k: (v.abs() if v is not None else None) for k, v in tensors.items()}


@pytest.fixture(scope="session")
def abs_inputs():
    """``abs_inputs(tensors)``: the inputs for the magnitude run of the tolerance rule."""
    return _abs_inputs


@pytest.fixture(scope="session")
def assert_close_to_reference():
    """``assert_close_to_reference(actual, reference_f64, torch_plain, name, *, dtype=None, magnitude=None)``."""
    return _check_close_to_reference


def _check_backend_against_reference(run, magnitudes, backend, case, tensors, dtype, **run_kwargs):
    ref64 = run("reference", case, tensors, torch.float64)
    plain = run("reference", case, tensors, dtype)
    magnitude = magnitudes(case, tensors)
    got = run(backend, case, tensors, dtype, **run_kwargs)
    assert got.keys() == ref64.keys()
    for key, value in got.items():
        assert value.dtype == dtype, f"{key}: {value.dtype}"
        _check_close_to_reference(value, ref64[key], plain[key], f"{backend} {key}", magnitude=magnitude[key])


@pytest.fixture(scope="session")
def check_backend_against_reference():
    """``check(run, magnitudes, backend, case, tensors, dtype, **run_kwargs)``, for op test modules that define
    ``run(backend, case, tensors, dtype, **run_kwargs) -> {output name: tensor}`` and ``magnitudes(case,
    tensors)``: every output of ``backend`` is in ``dtype`` and meets the tolerance rule against the float64
    reference, plain torch in ``dtype`` (both ``run("reference", ...)``) and the magnitudes."""
    return _check_backend_against_reference


def _output_and_grads(model: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients of sum(y * weight) for the input and every parameter that requires grad."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    x = x.clone().requires_grad_(True)
    y = model(x)
    grads = torch.autograd.grad((y * weight).sum(), [x, *params.values()])
    return {"y": y.detach(), "dx": grads[0], **dict(zip(params, grads[1:]))}


def _check_switched_forward(model: torch.nn.Module, enable, disable, backend: str, size: tuple[int, int]) -> list[str]:
    """An x2 SR ``model`` computes the same output and gradients (input, every trainable parameter) on a
    random 2-image ``size`` batch with its own forwards and after ``enable(model)`` (``_DIRECT`` tolerances),
    both on ``backend``; ``disable(model)`` switches back. Returns the names ``enable`` switched."""
    from adaptsr.backend import set_backend  # (adaptsr after TRITON_INTERPRET is settled, above)

    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(2, 3, 2 * size[0], 2 * size[1], generator=gen, dtype=torch.float64).to(dtype)
    with set_backend(backend):
        expected = _output_and_grads(model, x, weight)
        names = enable(model)
        try:
            got = _output_and_grads(model, x, weight)
        finally:
            disable(model)
    assert got.keys() == expected.keys()
    for key in expected:
        _check_close(got[key], expected[key], key)
    return names


def _check_switch_keeps_keys_and_copies(model: torch.nn.Module, enable, disable, can_switch, names: list[str]) -> None:
    """``enable(model)`` switches exactly ``names`` and keeps the state-dict keys; a deep copy and a pickled
    copy carry the switched forward, bound to the copy itself; ``disable`` switches them back, once;
    ``can_switch`` refuses a plain layer."""
    import copy
    import io

    model.eval()
    keys = list(model.state_dict())
    assert enable(model) == names and list(model.state_dict()) == keys
    x = torch.rand(1, 3, 16, 16, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        y = model(x)
        twin = copy.deepcopy(model)
        switched = twin.get_submodule(names[0])
        assert switched.forward.args[0] is switched
        torch.testing.assert_close(twin(x), y)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), y)
    assert disable(model) == names
    assert disable(model) == []
    assert not can_switch(torch.nn.Linear(2, 2))


def _check_inject_switches_and_merge_restores(build, preset: str, names: list[str]) -> list[str]:
    """``inject_lora(build(), preset=preset)`` switches the forwards of ``names`` (and may switch or replace
    others: returns what its summary lists); ``merge_lora`` switches every forward back, keeps spandrel's
    keys and gives the adapted function; ``window_attention=False`` switches nothing."""
    import adaptsr

    base = build().eval()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    model = build()
    summary = adaptsr.inject_lora(model, preset=preset, rank=2, init_lora_weights=False)
    assert all("forward" in model.get_submodule(name).__dict__ for name in names)
    with torch.no_grad():
        adapted = model.eval()(x)
    adaptsr.merge_lora(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(base.state_dict())
    with torch.no_grad():
        _check_close(model(x), adapted, "merged")
        assert (adapted - base(x)).abs().max() > 1e-3

    kept = build()
    summary_kept = adaptsr.inject_lora(kept, preset=preset, rank=2, window_attention=False)
    assert not set(names) & set(summary_kept.window_attention)
    assert not any("forward" in m.__dict__ for m in kept.modules())
    return summary.window_attention


@pytest.fixture(scope="session")
def check_inject_switches_and_merge_restores():
    """``check(build, preset, names) -> summary.window_attention``: see _check_inject_switches_and_merge_restores."""
    return _check_inject_switches_and_merge_restores


@pytest.fixture(scope="session")
def check_switch_keeps_keys_and_copies():
    """``check(model, enable, disable, can_switch, names)``: see _check_switch_keeps_keys_and_copies."""
    return _check_switch_keeps_keys_and_copies


@pytest.fixture(scope="session")
def check_switched_forward():
    """``check_switched_forward(model, enable, disable, backend, size) -> names``: see _check_switched_forward."""
    return _check_switched_forward


@pytest.fixture(scope="session")
def assert_close():
    """``assert_close(actual, expected, name)``: same-dtype agreement within the ``_DIRECT`` tolerances."""
    return _check_close


@pytest.fixture(scope="session", autouse=True)
def single_threaded():
    """One intra-op thread for the whole suite of tiny-shape tests: as fast as two, deterministic,
    and it does not slow down tenfold when another process shares the cores (OpenMP threads
    spinning on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- random LoRA conv cases --

_KERNELS = ((1, 1), (3, 3), (1, 3), (3, 1), (2, 2), (5, 5))
_STRIDES = (1, 2, (2, 1))
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class _ConvCase:
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_size: tuple[int, int]
    stride: int | tuple[int, int]
    padding: int | tuple[int, int] | str
    dilation: int
    groups: int
    padding_mode: str
    bias: bool
    rank: int
    scaling: float
    weight_requires_grad: bool
    x_requires_grad: bool
    channels_last: bool
    seed: int

    @property
    def conv_kwargs(self) -> dict:
        return {
            "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
            "padding_mode": self.padding_mode,
        }


def _pads_of(kernel, padding, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) the way nn.Conv2d pads."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = dilation * (kernel[0] - 1), dilation * (kernel[1] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph, pw, pw)


@st.composite
def _conv_cases(draw, *, max_channels_per_group: int = 3, max_extra_size: int = 4) -> _ConvCase:
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    in_channels = groups * draw(st.integers(1, max_channels_per_group))
    out_channels = groups * draw(st.integers(1, max_channels_per_group))
    kernel = draw(st.sampled_from(_KERNELS))
    stride = draw(st.sampled_from(_STRIDES))
    dilation = draw(st.sampled_from((1, 2)))
    padding_kinds = ["int", "tuple", "valid"] + (["same"] if stride == 1 else [])
    kind = draw(st.sampled_from(padding_kinds))
    if kind == "int":
        padding = draw(st.integers(0, 2))
    elif kind == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        padding = kind
    padding_mode = draw(st.sampled_from(_PADDING_MODES))
    top, bottom, left, right = _pads_of(kernel, padding, dilation)
    eff_h, eff_w = dilation * (kernel[0] - 1) + 1, dilation * (kernel[1] - 1) + 1
    # at least one output pixel; reflect needs pad < size, circular pad <= size
    min_h = max(eff_h - top - bottom, max(top, bottom) + 1, 1)
    min_w = max(eff_w - left - right, max(left, right) + 1, 1)
    height = draw(st.integers(min_h, min_h + max_extra_size))
    width = draw(st.integers(min_w, min_w + max_extra_size))
    kh, kw = kernel
    max_rank = min(out_channels, in_channels // groups * kh * kw)
    return _ConvCase(
        batch=draw(st.sampled_from((1, 1, 2, 3))),
        in_channels=in_channels,
        out_channels=out_channels,
        height=height,
        width=width,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        bias=draw(st.booleans()),
        rank=draw(st.integers(1, max_rank)),
        scaling=draw(st.sampled_from((0.5, 1.0, 2.0, 0.3))),
        weight_requires_grad=draw(st.booleans()),
        x_requires_grad=draw(st.sampled_from((True, True, True, False))),
        channels_last=draw(st.sampled_from((False, False, False, True))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _randn(shape, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def _make_conv_tensors(case: _ConvCase, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Fresh random x, weight, bias, lora_A, lora_B in ``dtype`` (B non-zero, so every test can fail).

    Values are drawn in float64 and rounded once to ``dtype``; cast the results back to float64
    for the oracle so both see the same numbers.
    """
    gen = torch.Generator().manual_seed(case.seed)
    kh, kw = case.kernel_size
    fan_in = case.in_channels // case.groups * kh * kw
    x = _randn((case.batch, case.in_channels, case.height, case.width), gen)
    weight = _randn((case.out_channels, case.in_channels // case.groups, kh, kw), gen, fan_in**-0.5)
    bias = _randn((case.out_channels,), gen) if case.bias else None
    lora_A = _randn((case.rank, case.in_channels // case.groups, kh, kw), gen, fan_in**-0.5)
    lora_B = _randn((case.out_channels, case.rank, 1, 1), gen, case.rank**-0.5)
    out = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    out = {k: (v.to(dtype) if v is not None else None) for k, v in out.items()}
    if case.channels_last:
        out["x"] = out["x"].contiguous(memory_format=torch.channels_last)
    return out


@pytest.fixture(scope="session")
def conv_case_strategy():
    """``conv_case_strategy(**limits)``: a hypothesis strategy of random LoRA conv configurations."""
    return _conv_cases


@pytest.fixture(scope="session")
def make_conv_tensors():
    """``make_conv_tensors(case, dtype)``: seeded random tensors for a conv case."""
    return _make_conv_tensors


# -- random LoRA linear cases --


@dataclass(frozen=True)
class _LinearCase:
    lead_shape: tuple[int, ...]  # the [...] in x: [..., in]; () for a single 1-D input
    in_features: int
    out_features: int
    bias: bool
    rank: int
    scaling: float
    weight_requires_grad: bool
    x_requires_grad: bool
    seed: int


@st.composite
def _linear_cases(draw, *, max_features: int = 24) -> _LinearCase:
    lead_shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    in_features = draw(st.integers(1, max_features))
    out_features = draw(st.integers(1, max_features))
    return _LinearCase(
        lead_shape=lead_shape,
        in_features=in_features,
        out_features=out_features,
        bias=draw(st.booleans()),
        rank=draw(st.integers(1, min(in_features, out_features))),
        scaling=draw(st.sampled_from((0.5, 1.0, 2.0, 0.3))),
        weight_requires_grad=draw(st.booleans()),
        x_requires_grad=draw(st.sampled_from((True, True, True, False))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_linear_tensors(case: _LinearCase, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(case.seed)
    x = _randn((*case.lead_shape, case.in_features), gen)
    weight = _randn((case.out_features, case.in_features), gen, case.in_features**-0.5)
    bias = _randn((case.out_features,), gen) if case.bias else None
    lora_A = _randn((case.rank, case.in_features), gen, case.in_features**-0.5)
    lora_B = _randn((case.out_features, case.rank), gen, case.rank**-0.5)
    out = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    return {k: (v.to(dtype) if v is not None else None) for k, v in out.items()}


@pytest.fixture(scope="session")
def linear_case_strategy():
    """``linear_case_strategy(**limits)``: a hypothesis strategy of random LoRA linear configurations."""
    return _linear_cases


@pytest.fixture(scope="session")
def make_linear_tensors():
    """``make_linear_tensors(case, dtype)``: seeded random tensors for a linear case."""
    return _make_linear_tensors


# -- tiny spandrel models --


def _tiny(name: str, package: str | None = None, *, finish=None, **defaults):
    """A builder of a small random-init spandrel ``name`` model (from ``spandrel.architectures.<package>``,
    default ``name``): ``build(seed=0, **overrides)``; ``finish(model)``, if given, then sets what a trained
    model has and a fresh one lacks.

    It seeds the global RNG first, so two calls give the same weights (tests build a model twice to
    compare with PEFT or with the base). spandrel is imported on first use: it takes seconds to
    import, and most tests never need it.
    """

    def build(seed: int = 0, **overrides):
        arch = importlib.import_module(f"spandrel.architectures.{package or name}")
        torch.manual_seed(seed)
        model = getattr(arch, name)(**{**defaults, **overrides})
        if finish is not None:
            with torch.no_grad():
                finish(model)
        return model

    build.__name__ = name.lower()
    return build


def _learned_scales(*suffixes: str):
    """A ``finish`` that gives the parameters named ``*<suffix>`` values in [0.5, 1]: the residual scales some
    architectures start at zero (DITN's SDA.scale, NAFNet's beta and gamma), which in a fresh model keep every
    gradient from the layers they scale; a trained model has learned them."""

    def finish(model: torch.nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if name.endswith(suffixes):
                parameter.uniform_(0.5, 1.0)

    return finish


# x2 models (the denoisers x1, MMRealSR x4) of 5k-300k parameters (Real-CUGAN, 1.3M, SCUNet, 5.5M, MMRealSR, 0.64M,
# and FBCNN, 30M, have no smaller form), fast on 16-pixel inputs.
# drop_path_rate=0.0: spandrel's Swin default (0.1) makes train-mode outputs random.
_TINY_SR = SimpleNamespace(
    swinir=_tiny(
        "SwinIR", img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4, upscale=2,
        upsampler="pixelshuffledirect", drop_path_rate=0.0,
    ),
    hat=_tiny(
        "HAT", img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4, upscale=2, num_feat=8,
        compress_ratio=3, squeeze_factor=4, drop_path_rate=0.0,
    ),
    esrgan=_tiny("ESRGAN", num_filters=8, num_blocks=1, scale=2),
    rcan=_tiny("RCAN", scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4),
    compact=_tiny("Compact", num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=3, upscale=2),
    dat=_tiny(
        "DAT", img_size=16, embed_dim=24, depth=[2], num_heads=[2], split_size=[2, 4], expansion_factor=2.0,
        upscale=2, drop_path_rate=0.0,
    ),
    swin2sr=_tiny(
        "Swin2SR", img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4, upscale=2,
        upsampler="pixelshuffle", drop_path_rate=0.0,
    ),
    # one residual dense group: five Swin blocks, alternately unshifted and shifted
    drct=_tiny(
        "DRCT", img_size=16, embed_dim=24, depths=[1], num_heads=[2], window_size=4, gc=8, upscale=2,
        upsampler="pixelshuffle", drop_path_rate=0.0,
    ),
    # category_size 256: what spandrel assumes when it loads an ATD (the weights do not record it)
    atd=_tiny(
        "ATD", img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4, category_size=256, num_tokens=8,
        reducted_dim=4, upscale=2, upsampler="pixelshuffledirect",
    ),
    # block 0 rectangle-window attention, block 1 recursive-generalization attention
    rgt=_tiny(
        "RGT", img_size=16, embed_dim=24, depth=[2], num_heads=[2], split_size=[2, 4], upscale=2, drop_path_rate=0.0,
    ),
    plksr=_tiny("PLKSR", dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7),
    realplksr=_tiny("RealPLKSR", "PLKSR", dim=16, n_blocks=2, upscaling_factor=2, kernel_size=7),
    safmn=_tiny("SAFMN", dim=16, n_blocks=2, upscaling_factor=2),
    span=_tiny("SPAN", num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
    fdat=_tiny(
        "FDAT", embed_dim=16, num_groups=1, depth_per_group=2, num_heads=2, window_size=4, scale=2, mid_dim=16,
        drop_path_rate=0.0,
    ),
    mosr=_tiny("MoSR", n_block=2, dim=16, upscale=2),
    omnisr=_tiny("OmniSR", num_feat=16, block_num=1, window_size=4, up_scale=2),
    # embed_dim 32: the local conv branch squeezes to a quarter, 8 channels, which takes a rank-8 adapter
    grl=_tiny(
        "GRL", img_size=16, embed_dim=32, depths=[2], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
        stripe_size=[4, 4], mlp_ratio=2.0, upscale=2, upsampler="pixelshuffle", local_connection=True,
        drop_path_rate=0.0,
    ),
    # GRL's other projection layouts: qkv as a depthwise-separable conv, the anchors through a strided conv
    grl_separable=_tiny(
        "GRL", img_size=16, embed_dim=24, depths=[2], num_heads_window=[2], num_heads_stripe=[2], window_size=4,
        stripe_size=[4, 4], mlp_ratio=2.0, upscale=2, upsampler="pixelshuffle", qkv_proj_type="separable_conv",
        anchor_proj_type="conv2d", anchor_window_down_factor=2, drop_path_rate=0.0,
    ),
    # CRAFT's window_size, DITN's patch_size, DCTLSA's num_head and SeemoRe's recursive: spandrel's defaults, which it
    # assumes on loading (the weights do not record them)
    craft=_tiny(
        "CRAFT", window_size=16, embed_dim=32, depths=[2], num_heads=[4], split_size_0=2, split_size_1=4, upscale=2
    ),
    seemore=_tiny("SeemoRe", scale=2, num_experts=2, num_layers=2, embedding_dim=16),
    ditn=_tiny("DITN", finish=_learned_scales("SDA.scale"), dim=16, ITL_blocks=1, SAL_blocks=1, upscale=2),
    moesr=_tiny("MoESR", dim=16, n_blocks=2, n_block=2, scale=2, upsample_dim=16),
    # spandrel's DCTLSA always builds six modules: num_modules must say 6 for its fusion conv to fit
    dctlsa=_tiny("DCTLSA", nf=20, num_modules=6, upscale=2),
    swiftsrgan=_tiny("SwiftSRGAN", num_channels=16, num_blocks=2, upscale_factor=2),
    # Real-CUGAN has no size knobs: the smallest model, UpCunet2x (1.3M parameters), on 32-pixel inputs
    realcugan=_tiny("UpCunet2x", "RealCUGAN"),
    # a denoiser (scale 1); its transformer branches take 32-channel heads of half the width, so dim 64 (5.5M
    # parameters) with one block per stage; spandrel asks for inputs of 40 pixels at least
    scunet=_tiny("SCUNet", config=[1, 1, 1, 1, 1, 1, 1], dim=64),
    nafnet=_tiny(  # scale 1 too
        "NAFNet", finish=_learned_scales(".beta", ".gamma"), width=16, enc_blk_nums=[1, 1], middle_blk_num=1,
        dec_blk_nums=[1, 1],
    ),
    # x4: spandrel's MMRealSR builds its degradation estimator for the pixel-unshuffled input of its x2 / x1 forms
    # but feeds it the image, so only x4 (the released models) runs; a two-stage estimator (stride-2 then
    # stride-1 stages: the layout spandrel assumes on loading) and sigmoid degrees (its default, not in the
    # weights). The modulation MLPs take 512-dim embeddings whatever the width: 0.64M parameters.
    mmrealsr=_tiny(
        "MMRealSR", num_in_ch=3, num_out_ch=3, scale=4, num_feat=16, num_block=2, num_grow_ch=8, num_feats=[16, 32],
        num_blocks=[1, 1], downscales=[2, 1],
    ),
    # a JPEG-artifact remover (scale 1); its quality predictor's MLP takes 512 inputs whatever the widths, so the
    # innermost width is 512 (30M parameters, the largest here, all but 0.5M at 1/8 of the input side), and two
    # blocks per stage (spandrel does not detect one: a single block is not wrapped in a sequence)
    fbcnn=_tiny("FBCNN", nc=[16, 32, 64, 512], nb=2),
)


def _new_arch_rrdb_state(nf: int = 8, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's RRDBNet x4 as BasicSR names it (``conv_first``, ``body.N.rdbM.convK``, ...), which spandrel
    renames to ESRGAN's old keys (``model.0``, ...) when it loads it. Growth channels 32, as spandrel assumes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv_first": (nf, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{c}"] = (32 if c < 5 else nf, nf + (c - 1) * 32)
    shapes.update({name: (nf, nf) for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr")})
    shapes["conv_last"] = (3, nf)
    state = {}
    for name, (out_ch, in_ch) in shapes.items():
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * 0.05
        state[f"{name}.bias"] = torch.randn(out_ch, generator=g) * 0.01
    return state


@pytest.fixture(scope="session")
def new_arch_rrdb():
    """``new_arch_rrdb(nf=8, blocks=1, seed=0)``: a Real-ESRGAN RRDBNet x4 state dict with BasicSR's key names."""
    return _new_arch_rrdb_state


@pytest.fixture(scope="session")
def tiny_sr():
    """``tiny_sr.<name>(seed=0, **overrides)``: small seeded random spandrel models, one per name above (swinir,
    hat, esrgan, rcan, compact, dat, swin2sr, drct, atd, rgt, plksr, realplksr, safmn, span, fdat, mosr, omnisr,
    grl, grl_separable, craft, seemore, ditn, moesr, dctlsa, swiftsrgan, realcugan, scunet, nafnet, mmrealsr,
    fbcnn)."""
    return _TINY_SR


@pytest.fixture
def poisoned_window_attention(monkeypatch):
    """Every buffer the Triton window-attention launchers allocate starts as NaN: an entry the kernels
    fail to write fails the test (NaN never passes the tolerance rule)."""
    from adaptsr.backend import is_available

    if is_available("triton"):
        kernels = importlib.import_module("adaptsr.kernels.window_attention")
        monkeypatch.setattr(kernels, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                        dtype=dtype, device=device))


@pytest.fixture
def random_vgg(monkeypatch):
    """The VGG perceptual loss on torchvision's VGG19 with seeded random weights instead of the ImageNet ones,
    which would be downloaded: the tests check the loss's plumbing, not ImageNet's features."""
    import adaptsr.losses

    build = adaptsr.losses._vgg19_features

    def untrained(pretrained):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return build(False)

    monkeypatch.setattr(adaptsr.losses, "_vgg19_features", untrained)


@pytest.fixture
def empty_hub(tmp_path):
    """torch.hub pointed at an empty folder: no metric or VGG weights on this 'machine'."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture
def photo_run_inputs(tmp_path):
    """``make(size=48, names=("astronaut", "coffee")) -> (hr_dir, checkpoint)``: scikit-image's photos resized to
    ``size`` x ``size`` PNGs in ``tmp_path/hr``, and a tiny x2 ESRGAN saved as ``tmp_path/base.safetensors``: the
    inputs of an ``adaptsr adapt`` run on the command line."""
    from PIL import Image
    from skimage import data
    from spandrel.architectures.ESRGAN import ESRGAN

    import adaptsr

    def make(size: int = 48, names=("astronaut", "coffee")):
        hr_dir = tmp_path / "hr"
        hr_dir.mkdir()
        for name in names:
            Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC).save(hr_dir / f"{name}.png")
        torch.manual_seed(0)
        checkpoint = tmp_path / "base.safetensors"
        adaptsr.save_model(ESRGAN(num_filters=8, num_blocks=1, scale=2), checkpoint)
        return hr_dir, checkpoint

    return make
