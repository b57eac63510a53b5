"""lora_linear: every backend against the float64 two-path oracle and against F.linear itself."""

from __future__ import annotations

import contextlib
import importlib
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptsr.backend import _unavailable_reason, is_available, set_backend
from adaptsr.ops import lora_linear, lora_linear_ref

# the module, not the function of the same name that adaptsr.ops re-exports
linear_op = importlib.import_module("adaptsr.ops.lora_linear")

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
_GRADS = {"dx": "x", "dW": "weight", "dbias": "bias", "dA": "lora_A", "dB": "lora_B"}
# Backends with their own autograd Function.
_CUSTOM_BACKENDS = ("torch", "triton", "cuda")
# The CUDA C++ backend runs only on a GPU, and only where adaptsr._C loads (built or buildable).
CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not is_available("cuda"), reason=f"cuda backend: {_unavailable_reason('cuda')}")
)
ON_GPU = torch.cuda.is_available()
# Triton runs on a GPU, or here through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter's bf16 dots are wrong (DESIGN.md section 5); float64 runs the torch matmuls.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


@contextlib.contextmanager
def _no_tf32():
    """True float32 matmuls on the GPU, for the backend and plain torch alike."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _dy_like(y: torch.Tensor, seed: int, dtype: torch.dtype, non_contiguous: bool) -> torch.Tensor:
    """A random upstream gradient with values representable in ``dtype``, held in float64."""
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    if non_contiguous and dy.dim() >= 2:  # same values, transposed strides
        dy = dy.transpose(-1, -2).contiguous().transpose(-1, -2)
    return dy


def _runs_custom_function(y: torch.Tensor) -> bool:
    """Whether y came out of the op's own autograd.Function (not the two-path oracle)."""
    forward_cls = getattr(y.grad_fn, "_forward_cls", None)
    return forward_cls is not None and forward_cls.__module__ == linear_op.__name__


def _run(backend: str, case, tensors: dict, dy64, dtype: torch.dtype, force_low_rank=None, autocast=None, device="cpu"):
    """Forward and every gradient under ``backend``; ``force_low_rank`` forces the backward pass;
    ``autocast``: run the forward under ``torch.autocast(device, dtype=autocast)``; ``device``: where
    the op runs (the results come back on the CPU)."""
    t = {k: (v.detach().to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}
    t["x"].requires_grad_(case.x_requires_grad)
    t["weight"].requires_grad_(case.weight_requires_grad)
    for k in ("bias", "lora_A", "lora_B"):
        if t[k] is not None:
            t[k].requires_grad_(True)
    wanted = [g for g, k in _GRADS.items() if t[k] is not None and t[k].requires_grad]

    chooser = mock.Mock(side_effect=lambda *args, **kwargs: force_low_rank)
    patch = mock.patch.object(linear_op, "_prefer_low_rank", chooser) if force_low_rank is not None else None
    if patch:
        patch.start()
    try:
        amp = torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16, enabled=bool(autocast))
        with set_backend(backend), amp:
            y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling)
        if backend in _CUSTOM_BACKENDS:
            assert _runs_custom_function(y), y.grad_fn
        out = {"y": y.detach()}
        if dy64 is not None:
            grads = torch.autograd.grad(y, [t[_GRADS[g]] for g in wanted], dy64.to(device=device, dtype=y.dtype))
            out.update(zip(wanted, grads))
            if patch:
                assert chooser.call_count == 1  # the forced choice, made once, is the one the backward used
    finally:
        if patch:
            patch.stop()
    return {k: v.cpu() for k, v in out.items()}


@settings(max_examples=300, **_SETTINGS)
@given(data=st.data())
def test_torch_backend_matches_float64_reference(
    data, linear_case_strategy, make_linear_tensors, abs_inputs, assert_close_to_reference
):
    """Output and dx, dW, dbias, dA, dB of the torch backend, both backward passes, every dtype."""
    case = data.draw(linear_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    tensors = make_linear_tensors(case, dtype)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, dtype, data.draw(st.booleans(), label="non_contiguous_dy"))
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    plain = _run("reference", case, tensors, dy64, dtype)
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    for force_low_rank in (True, False):
        got = _run("torch", case, tensors, dy64, dtype, force_low_rank=force_low_rank)
        assert got.keys() == ref64.keys()
        for name in got:
            assert_close_to_reference(
                got[name], ref64[name], plain[name], f"{name} (low_rank={force_low_rank})", magnitude=magnitude[name]
            )


@settings(max_examples=100, **_SETTINGS)
@given(data=st.data())
def test_torch_backend_under_autocast(
    data, linear_case_strategy, make_linear_tensors, abs_inputs, assert_close_to_reference
):
    """AMP: float32 parameters, the op in bfloat16 / float16 like autocast's F.linear, float32 gradients."""
    case = data.draw(linear_case_strategy(), label="case")
    amp_dtype = data.draw(st.sampled_from((torch.bfloat16, torch.float16)), label="autocast dtype")
    tensors = make_linear_tensors(case, amp_dtype)  # values exact in amp_dtype: autocast's casts are exact
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, amp_dtype, non_contiguous=False)
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    plain = _run("reference", case, tensors, dy64, torch.float32, autocast=amp_dtype)
    assert plain["y"].dtype == amp_dtype and plain["dA"].dtype == torch.float32
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    for force_low_rank in (True, False):
        got = _run("torch", case, tensors, dy64, torch.float32, force_low_rank=force_low_rank, autocast=amp_dtype)
        assert got.keys() == ref64.keys()
        for name in got:
            label = f"{name} (low_rank={force_low_rank})"
            assert_close_to_reference(
                got[name], ref64[name], plain[name], label, dtype=amp_dtype, magnitude=magnitude[name]
            )


@settings(max_examples=60, **_SETTINGS)
@given(data=st.data())
def test_triton_backend_matches_float64_reference(
    data, linear_case_strategy, make_linear_tensors, abs_inputs, assert_close_to_reference
):
    """The Triton forward (y and z in one pass) and low-rank kernels inside the op, every gradient.

    On a GPU at the hypothesis sizes, here through the interpreter; 60 cases either way (the
    interpreter is slow, and on a GPU every new shape autotunes, compiling each candidate tile).
    """
    case = data.draw(linear_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_TRITON_DTYPES), label="dtype")
    tensors = make_linear_tensors(case, dtype)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, dtype, data.draw(st.booleans(), label="non_contiguous_dy"))
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    dense_in_triton = data.draw(st.booleans(), label="dense forward in triton")
    with _no_tf32(), mock.patch.object(linear_op, "_DENSE_FORWARD_IN_TRITON", dense_in_triton):
        plain = _run("reference", case, tensors, dy64, dtype, device=TRITON_DEVICE)
        got = _run("triton", case, tensors, dy64, dtype, force_low_rank=True, device=TRITON_DEVICE)
    assert got.keys() == ref64.keys()
    for name in got:
        assert_close_to_reference(got[name], ref64[name], plain[name], f"{name} (triton)", magnitude=magnitude[name])


@pytest.mark.parametrize("dense_in_triton", [True, False], ids=["fused-forward", "cublas-forward"])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_triton_forward_saves_z_for_the_low_rank_pass(monkeypatch, dense_in_triton, weight_trainable):
    """z = x A^T comes from the forward, saved ([M, r]) only when the low-rank pass uses it."""
    monkeypatch.setattr(linear_op, "_prefer_low_rank", lambda *args: True)
    monkeypatch.setattr(linear_op, "_DENSE_FORWARD_IN_TRITON", dense_in_triton)
    x = torch.randn(3, 5, 20, device=TRITON_DEVICE, requires_grad=True)
    weight = torch.randn(30, 20, device=TRITON_DEVICE, requires_grad=weight_trainable)
    a = torch.randn(4, 20, device=TRITON_DEVICE, requires_grad=True)
    b = torch.randn(30, 4, device=TRITON_DEVICE, requires_grad=True)
    with set_backend("triton"):
        y = lora_linear(x, weight, None, a, b, 0.5)
    saved_z = y.grad_fn.saved_tensors[-1]
    if weight_trainable:
        assert saved_z is None
    else:
        assert tuple(saved_z.shape) == (15, 4)
        torch.testing.assert_close(saved_z, x.detach().reshape(15, 20) @ a.detach().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_is_parameter", [True, False], ids=["parameter", "temporary"])
@pytest.mark.parametrize("low_rank", [False, True], ids=["full-wgrad-pass", "low-rank-pass"])
def test_torch_backend_saves_x_beside_the_weights(monkeypatch, low_rank, weight_is_parameter):
    """Beside the call's own tensors the torch backend saves nothing for a parameter weight (W' is formed again in
    the backward, so a LoRA layer's saved activations are x alone, as full fine-tuning's are), and W' in place of
    a temporary weight (autocast's cast copy), which costs the same."""
    monkeypatch.setattr(linear_op, "_prefer_low_rank", lambda *args: low_rank)
    x = torch.randn(3, 5, 20, requires_grad=True)
    weight, bias = torch.randn(30, 20), torch.randn(30, requires_grad=True)
    if weight_is_parameter:
        weight = torch.nn.Parameter(weight, requires_grad=False)
    a, b = torch.randn(4, 20, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (x, weight, bias, a, b)}
    made = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            made.append(tuple(t.shape))
        return t

    with set_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, weight, bias, a, b, 0.5)
    y.square().sum().backward()
    assert made == ([] if weight_is_parameter else [tuple(weight.shape)])
    expected = lora_linear_ref(*(t.detach().double().requires_grad_() for t in (x, weight, bias, a, b)), 0.5)
    torch.testing.assert_close(y.detach().double(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [CUDA])
@settings(max_examples=100, **_SETTINGS)
@given(data=st.data())
def test_gpu_backend_matches_float64_reference(
    backend, data, linear_case_strategy, make_linear_tensors, abs_inputs, assert_close_to_reference
):
    """On the GPU: output and every gradient, both backward passes, every dtype (float64 runs the torch matmuls).

    The oracle runs in float64 on the CPU; "plain torch" is the reference backend in the same dtype
    on the GPU. TF32 is off for both, so float32 means float32.
    """
    case = data.draw(linear_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    tensors = make_linear_tensors(case, dtype)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, dtype, data.draw(st.booleans(), label="non_contiguous_dy"))
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    with _no_tf32():
        plain = _run("reference", case, tensors, dy64, dtype, device="cuda")
        for force_low_rank in (True, False):
            got = _run(backend, case, tensors, dy64, dtype, force_low_rank=force_low_rank, device="cuda")
            assert got.keys() == ref64.keys()
            for name in got:
                assert_close_to_reference(
                    got[name],
                    ref64[name],
                    plain[name],
                    f"{name} ({backend}, low_rank={force_low_rank})",
                    magnitude=magnitude[name],
                )


@settings(max_examples=100, **_SETTINGS)
@given(data=st.data())
def test_every_backend_matches_f_linear_with_merged_weight(
    data, linear_case_strategy, make_linear_tensors, assert_close
):
    """Ground truth: F.linear with W + s B A, autograd through the merge, float64."""
    case = data.draw(linear_case_strategy(), label="case")
    tensors = make_linear_tensors(case, torch.float64)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, torch.float64, non_contiguous=False)

    t = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in tensors.items()}
    y = F.linear(t["x"], t["weight"] + case.scaling * torch.einsum("ok,ki->oi", t["lora_B"], t["lora_A"]), t["bias"])
    present = [g for g, k in _GRADS.items() if t[k] is not None]
    truth = {"y": y.detach(), **dict(zip(present, torch.autograd.grad(y, [t[_GRADS[g]] for g in present], dy64)))}

    runs = {
        "reference": _run("reference", case, tensors, dy64, torch.float64),
        "torch/low-rank": _run("torch", case, tensors, dy64, torch.float64, force_low_rank=True),
        "torch/full-wgrad": _run("torch", case, tensors, dy64, torch.float64, force_low_rank=False),
        "torch/auto": _run("torch", case, tensors, dy64, torch.float64),
    }
    for label, got in runs.items():
        for name, value in got.items():
            assert_close(value, truth[name], f"{label} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_backend_on_cpu_is_torch_and_finite(dtype):
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(12, 16, dtype=dtype) / 4
    lora_A = (torch.randn(4, 16, dtype=dtype) / 4).requires_grad_()
    lora_B = torch.randn(12, 4, dtype=dtype).requires_grad_()
    with set_backend("auto"):
        y = lora_linear(x, weight, None, lora_A, lora_B, 2.0)
    assert _runs_custom_function(y), y.grad_fn
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, lora_A.grad, lora_B.grad):
        assert t.dtype == dtype and torch.isfinite(t).all()


@pytest.mark.parametrize(
    "features, impl, device_type, dtype, expected",
    [
        # the H100's measured choices (benchmarks/results/gpu-h100-2026-11-25*.md): bf16 full gradient, fp32 thin pass
        ((540, 180), "torch", "cuda", torch.bfloat16, False),
        ((360, 180), "torch", "cuda", torch.float16, False),
        ((540, 180), "torch", "cuda", torch.float32, True),
        # a layer whose full gradient is bound by its FLOPs: the thin pass again
        ((4096, 4096), "torch", "cuda", torch.bfloat16, True),
        # the CPU's measured choices (see lora_linear.py): SwinIR-light's qkv the full gradient, SwinIR-M's the thin pass
        ((144, 48), "torch", "cpu", torch.float32, False),
        ((540, 180), "torch", "cpu", torch.float32, True),
        ((540, 180), "torch", "cpu", torch.bfloat16, True),
        # float64 on a GPU, and the triton/cuda backends' own low-rank kernels: the FLOP-ratio rule
        ((144, 48), "triton", "cpu", torch.float32, True),
        ((540, 180), "torch", "cuda", torch.float64, True),
        ((540, 180), "triton", "cuda", torch.bfloat16, True),
        ((540, 180), "cuda", "cuda", torch.bfloat16, True),
        ((12, 16), "torch", "cpu", torch.float32, False),  # rank 8 on 16 features: no saving
    ],
)
def test_pass_choice_follows_the_device_and_dtype(features, impl, device_type, dtype, expected):
    """The torch backend's choice between the low-rank pass and the full weight gradient (a bytes model per
    device, measured), and the FLOP ratio alone for the fused backends' own low-rank kernels."""
    weight = torch.empty(features, device="meta")
    assert linear_op._prefer_low_rank(weight, 8, impl, device_type, dtype) is expected


# -- shape validation --


def _valid_args():
    return dict(
        x=torch.randn(2, 5, 8),
        weight=torch.randn(6, 8),
        bias=torch.randn(6),
        lora_A=torch.randn(3, 8),
        lora_B=torch.randn(6, 3),
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", CUDA])
@pytest.mark.parametrize(
    "field, bad_shape",
    [
        ("x", (2, 5, 7)),  # wrong feature count
        ("lora_A", (3, 7)),  # in features wrong
        ("lora_A", (3, 8, 1)),  # not 2-D
        ("lora_B", (6, 2)),  # rank disagrees with lora_A
        ("lora_B", (5, 3)),  # out features wrong
        ("bias", (5,)),
    ],
)
def test_shape_errors_name_the_shape(backend, field, bad_shape):
    device = "cuda" if backend == "cuda" else "cpu"
    args = {k: v.to(device) for k, v in _valid_args().items()}
    with set_backend(backend):
        lora_linear(**args, scaling=1.0)  # the valid call runs
        args[field] = torch.randn(bad_shape, device=device)
        with pytest.raises(ValueError, match=re.escape(str(bad_shape))):
            lora_linear(**args, scaling=1.0)


# -- memory: the torch backend saves only x and the small weights --


@pytest.mark.parametrize("lead_shape", [(37,), (3, 11)])
def test_torch_and_triton_backends_save_only_x_weights_and_z(lead_shape):
    x = torch.randn(*lead_shape, 16, requires_grad=True)
    weight = torch.randn(24, 16)
    bias = torch.randn(24, requires_grad=True)
    lora_A = torch.randn(4, 16, requires_grad=True)
    lora_B = torch.randn(24, 4, requires_grad=True)

    def saved_bytes(backend):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with set_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        return sum(saved)

    small = sum(t.numel() * t.element_size() for t in (weight, lora_A, lora_B))
    x_bytes = x.numel() * x.element_size()
    assert saved_bytes("torch") == x_bytes + small
    # the two-path oracle also keeps the rank-r activations x A^T
    assert saved_bytes("reference") > x_bytes + small
    # triton keeps z = x A^T from its forward instead (the low-rank pass forced, as on wide layers)
    with mock.patch.object(linear_op, "_prefer_low_rank", lambda *args: True):
        assert saved_bytes("triton") == x_bytes + small + (x.numel() // 16) * 4 * x.element_size()
