"""lora_conv2d: every backend against the float64 two-path oracle and against nn.Conv2d itself."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import re
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from adaptsr.backend import _unavailable_reason, is_available, set_backend
from adaptsr.ops import ConvGeometry, lora_conv2d

# the module, not the function of the same name that adaptsr.ops re-exports
conv_op = importlib.import_module("adaptsr.ops.lora_conv2d")

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Backends with their own autograd Function, and the function each runs for the low-rank pass.
_CUSTOM_BACKENDS = ("torch", "triton", "cuda")
_LOW_RANK_PASS = {"torch": "_low_rank_grads", "triton": "_fused_low_rank_grads", "cuda": "_cuda_low_rank_grads"}
# The CUDA C++ backend runs only on a GPU, and only where adaptsr._C loads (built or buildable).
_needs_cuda = pytest.mark.skipif(not is_available("cuda"), reason=f"cuda backend: {_unavailable_reason('cuda')}")
CUDA = pytest.param("cuda", marks=_needs_cuda)
ON_GPU = torch.cuda.is_available()
# Triton runs on a GPU, or here through its interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter's bf16 dots are wrong (DESIGN.md section 5); float64 runs the torch pass.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


@contextlib.contextmanager
def _no_tf32():
    """True float32 convolutions and matmuls on the GPU, for the backend and plain torch alike."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _dy_like(y: torch.Tensor, seed: int, dtype: torch.dtype, non_contiguous: bool) -> torch.Tensor:
    """A random upstream gradient with values representable in ``dtype``, held in float64."""
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    if non_contiguous:  # same values, transposed strides
        dy = dy.transpose(2, 3).contiguous().transpose(2, 3)
    return dy


def _runs_custom_function(y: torch.Tensor) -> bool:
    """Whether y came out of the op's own autograd.Function (not the two-path oracle)."""
    forward_cls = getattr(y.grad_fn, "_forward_cls", None)
    return forward_cls is not None and forward_cls.__module__ == conv_op.__name__


def _run(
    backend: str,
    case,
    tensors: dict,
    dy64: torch.Tensor | None,
    dtype: torch.dtype,
    force_low_rank=None,
    autocast=None,
    device: str = "cpu",
):
    """Forward and every gradient of lora_conv2d under ``backend``, inputs cast to ``dtype``.

    ``force_low_rank``: None leaves the backend's choice alone; True / False forces the
    low-rank / full-wgrad backward pass, and checks that the forced pass is the one that ran.
    ``autocast``: run the forward under ``torch.autocast(device, dtype=autocast)``.
    ``device``: where the op runs; the results come back on the CPU.
    """
    t = {k: (v.detach().to(device=device, dtype=dtype) if v is not None else None) for k, v in tensors.items()}
    t["x"].requires_grad_(case.x_requires_grad)
    t["weight"].requires_grad_(case.weight_requires_grad)
    if t["bias"] is not None:
        t["bias"].requires_grad_(True)
    t["lora_A"].requires_grad_(True)
    t["lora_B"].requires_grad_(True)
    names = {"dx": "x", "dW": "weight", "dbias": "bias", "dA": "lora_A", "dB": "lora_B"}
    wanted = [g for g, k in names.items() if t[k] is not None and t[k].requires_grad]

    low_rank_pass = _LOW_RANK_PASS.get(backend, "_low_rank_grads")
    patches = []
    if force_low_rank is not None:
        patches = [
            mock.patch.object(conv_op, "_prefer_low_rank", lambda *args, **kwargs: force_low_rank),
            mock.patch.object(conv_op, low_rank_pass, wraps=getattr(conv_op, low_rank_pass)),
            mock.patch.object(conv_op, "_full_wgrad_to_lora", wraps=conv_op._full_wgrad_to_lora),
        ]
    for p in patches:
        p.start()
    try:
        amp = torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16, enabled=bool(autocast))
        with set_backend(backend), amp:
            y = lora_conv2d(
                t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], case.scaling, **case.conv_kwargs
            )
        if backend in _CUSTOM_BACKENDS:
            assert _runs_custom_function(y), y.grad_fn
        out = {"y": y.detach()}
        if dy64 is not None:
            grads = torch.autograd.grad(y, [t[names[g]] for g in wanted], dy64.to(device=device, dtype=y.dtype))
            out.update(dict(zip(wanted, grads)))
            if force_low_rank is not None:
                low_rank_ran = getattr(conv_op, low_rank_pass).call_count > 0
                full_ran = conv_op._full_wgrad_to_lora.call_count > 0
                expect_low_rank = force_low_rank and not case.weight_requires_grad
                assert (low_rank_ran, full_ran) == (expect_low_rank, not expect_low_rank)
    finally:
        for p in reversed(patches):
            p.stop()
    return {k: v.cpu() for k, v in out.items()}


def _torch_got_it_right(plain: dict, ref64: dict, magnitude: dict) -> bool:
    """Whether torch's own ops in the test's dtype (the reference backend) computed this case, to within a quarter
    of its magnitude. oneDNN's bfloat16 convolution does not on some CPUs: on the 2-core Xeon (2026-12-06),
    stride 2 with dilation >= 2 and a one-column output gave NaN and wrong values, differently from run to run
    (pytorch/pytorch#163347 and #169688 report the kind). The backends run the same torch convolutions, so such a
    case holds nothing to hold them to."""
    for name, value in plain.items():
        scale = max(magnitude[name].abs().max().item(), ref64[name].abs().max().item(), 1e-30)
        if not torch.isfinite(value).all() or (value.double() - ref64[name]).abs().max().item() > 0.25 * scale:
            return False
    return True


@settings(max_examples=300, **_SETTINGS)
@given(data=st.data())
def test_torch_backend_matches_float64_reference(
    data, conv_case_strategy, make_conv_tensors, abs_inputs, assert_close_to_reference
):
    """Output and dx, dW, dbias, dA, dB of the torch backend, both backward passes, every dtype."""
    case = data.draw(conv_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    tensors = make_conv_tensors(case, dtype)

    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, dtype, data.draw(st.booleans(), label="non_contiguous_dy"))
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    plain = _run("reference", case, tensors, dy64, dtype)
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    assume(_torch_got_it_right(plain, ref64, magnitude))
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
    data, conv_case_strategy, make_conv_tensors, abs_inputs, assert_close_to_reference
):
    """AMP: float32 parameters, the op in bfloat16 / float16 like autocast's F.conv2d, float32 gradients."""
    case = data.draw(conv_case_strategy(), label="case")
    amp_dtype = data.draw(st.sampled_from((torch.bfloat16, torch.float16)), label="autocast dtype")
    tensors = make_conv_tensors(case, amp_dtype)  # values exact in amp_dtype: autocast's casts are exact
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, amp_dtype, non_contiguous=False)
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    plain = _run("reference", case, tensors, dy64, torch.float32, autocast=amp_dtype)
    assert plain["y"].dtype == amp_dtype and plain["dA"].dtype == torch.float32
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    assume(_torch_got_it_right(plain, ref64, magnitude))
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
    data, conv_case_strategy, make_conv_tensors, abs_inputs, assert_close_to_reference
):
    """The Triton forward (y and z in one pass) and low-rank kernels inside the op, every gradient.

    On a GPU at the hypothesis sizes, here through the interpreter; 60 cases either way (the
    interpreter is slow, and on a GPU every new shape autotunes, compiling each candidate tile).
    """
    case = data.draw(conv_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_TRITON_DTYPES), label="dtype")
    tensors = make_conv_tensors(case, dtype)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, dtype, data.draw(st.booleans(), label="non_contiguous_dy"))
    ref64 = _run("reference", case, tensors, dy64, torch.float64)
    magnitude = _run("reference", case, abs_inputs(tensors), dy64.abs(), torch.float64)
    dense_in_triton = data.draw(st.booleans(), label="dense forward in triton")
    with _no_tf32(), mock.patch.object(conv_op, "_DENSE_FORWARD_IN_TRITON", dense_in_triton):
        plain = _run("reference", case, tensors, dy64, dtype, device=TRITON_DEVICE)
        got = _run("triton", case, tensors, dy64, dtype, force_low_rank=True, device=TRITON_DEVICE)
    assert got.keys() == ref64.keys()
    for name in got:
        assert_close_to_reference(got[name], ref64[name], plain[name], f"{name} (triton)", magnitude=magnitude[name])


@pytest.mark.parametrize("dense_in_triton", [True, False], ids=["fused-forward", "cudnn-forward"])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_triton_forward_saves_z_for_the_low_rank_pass(monkeypatch, dense_in_triton, weight_trainable):
    """z = conv(x, A) comes from the forward and is saved (r channels per pixel) only when the
    low-rank pass will use it; the backward then does not recompute it."""
    from adaptsr.kernels import lora_conv2d as conv_kernels

    monkeypatch.setattr(conv_op, "_prefer_low_rank", lambda *args: True)
    monkeypatch.setattr(conv_op, "_DENSE_FORWARD_IN_TRITON", dense_in_triton)
    forward_calls = []
    real_fwd = conv_kernels.lora_conv2d_fwd
    monkeypatch.setattr(conv_kernels, "lora_conv2d_fwd", lambda *a, **k: forward_calls.append(a) or real_fwd(*a, **k))
    x = torch.randn(2, 4, 6, 5, device=TRITON_DEVICE, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, device=TRITON_DEVICE, requires_grad=weight_trainable)
    a = torch.randn(3, 2, 3, 3, device=TRITON_DEVICE, requires_grad=True)
    b = torch.randn(6, 3, 1, 1, device=TRITON_DEVICE, requires_grad=True)
    with set_backend("triton"):
        y = lora_conv2d(x, weight, None, a, b, 0.5, padding=1, groups=2)
    saved_z = y.grad_fn.saved_tensors[-1]
    if weight_trainable:  # the full weight gradient is computed anyway: no z
        assert saved_z is None
    else:
        assert tuple(saved_z.shape) == (2, 2 * 3, 6, 5)  # g r channels
    y.sum().backward()
    assert len(forward_calls) == (1 if dense_in_triton or not weight_trainable else 0)
    ref = conv_op.lora_conv2d_ref(*(t.detach().double().cpu() for t in (x, weight)), None,
                                  *(t.detach().double().cpu() for t in (a, b)), 0.5, ConvGeometry.from_args(3, 1, 1, 1, 2))
    assert torch.allclose(y.detach().double().cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [CUDA])
@settings(max_examples=100, **_SETTINGS)
@given(data=st.data())
def test_gpu_backend_matches_float64_reference(
    backend, data, conv_case_strategy, make_conv_tensors, abs_inputs, assert_close_to_reference
):
    """On the GPU: output and every gradient, both backward passes, every dtype (float64 runs the torch pass).

    The oracle runs in float64 on the CPU; "plain torch" is the reference backend in the same dtype
    on the GPU. TF32 is off for both, so float32 means float32.
    """
    case = data.draw(conv_case_strategy(), label="case")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    tensors = make_conv_tensors(case, dtype)
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
                    got[name], ref64[name], plain[name], f"{name} ({backend}, low_rank={force_low_rank})",
                    magnitude=magnitude[name],
                )


def _merged_conv_ground_truth(case, tensors, dy64):
    """nn.Conv2d itself with weight W + s * einsum(B, A), autograd through the merge: the ground truth."""
    t = {k: (v.detach().double() if v is not None else None) for k, v in tensors.items()}
    for k in ("x", "weight", "bias", "lora_A", "lora_B"):
        if t[k] is not None:
            t[k].requires_grad_(True)
    conv = nn.Conv2d(
        case.in_channels, case.out_channels, case.kernel_size, bias=case.bias, dtype=torch.float64, **case.conv_kwargs
    )
    delta = torch.einsum("ok,kihw->oihw", t["lora_B"][:, :, 0, 0], t["lora_A"])
    y = conv._conv_forward(t["x"], t["weight"] + case.scaling * delta, t["bias"])
    names = {"dx": "x", "dW": "weight", "dbias": "bias", "dA": "lora_A", "dB": "lora_B"}
    present = [g for g, k in names.items() if t[k] is not None]
    grads = torch.autograd.grad(y, [t[names[g]] for g in present], dy64)
    return {"y": y.detach(), **dict(zip(present, grads))}


@settings(max_examples=100, **_SETTINGS)
@given(data=st.data())
def test_every_backend_matches_nn_conv2d_with_merged_weight(data, conv_case_strategy, make_conv_tensors, assert_close):
    """Ground truth for every padding mode, 'same', dilation, groups: nn.Conv2d with W + s B A."""
    case = data.draw(conv_case_strategy(), label="case")
    tensors = make_conv_tensors(case, torch.float64)
    first = _run("reference", case, tensors, None, torch.float64)
    dy64 = _dy_like(first["y"], case.seed, torch.float64, non_contiguous=False)
    truth = _merged_conv_ground_truth(case, tensors, dy64)
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
    """'auto' resolves to the torch backend on CPU and gives finite results in low precision."""
    x = torch.randn(1, 3, 7, 5, dtype=dtype, requires_grad=True)
    weight = torch.randn(6, 3, 3, 3, dtype=dtype) / 5
    lora_A = (torch.randn(2, 3, 3, 3, dtype=dtype) / 5).requires_grad_()
    lora_B = torch.randn(6, 2, 1, 1, dtype=dtype).requires_grad_()
    with set_backend("auto"):
        y = lora_conv2d(x, weight, None, lora_A, lora_B, 2.0, padding=1, padding_mode="reflect")
    assert _runs_custom_function(y), y.grad_fn
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, lora_A.grad, lora_B.grad):
        assert t.dtype == dtype and torch.isfinite(t).all()


# -- shape validation --


def _valid_args():
    return dict(
        x=torch.randn(2, 4, 6, 6),
        weight=torch.randn(6, 2, 3, 3),
        bias=torch.randn(6),
        lora_A=torch.randn(3, 2, 3, 3),
        lora_B=torch.randn(6, 3, 1, 1),
    )


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", CUDA])
@pytest.mark.parametrize(
    "field, bad_shape",
    [
        ("x", (2, 3, 6, 6)),  # wrong channel count for groups=2
        ("x", (4, 6, 6)),  # not 4-D
        ("lora_A", (3, 4, 3, 3)),  # in/groups wrong
        ("lora_A", (3, 2, 1, 1)),  # kernel wrong
        ("lora_B", (6, 2, 1, 1)),  # rank disagrees with lora_A
        ("lora_B", (5, 3, 1, 1)),  # out channels wrong
        ("lora_B", (6, 3)),  # not a 1x1 conv weight
        ("bias", (5,)),
    ],
)
def test_shape_errors_name_the_shape(backend, field, bad_shape):
    device = "cuda" if backend == "cuda" else "cpu"
    args = {k: v.to(device) for k, v in _valid_args().items()}
    with set_backend(backend):
        lora_conv2d(**args, scaling=1.0, groups=2, padding=1)  # the valid call runs
        args[field] = torch.randn(bad_shape, device=device)
        with pytest.raises(ValueError, match=re.escape(str(bad_shape))):
            lora_conv2d(**args, scaling=1.0, groups=2, padding=1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(padding="same", stride=2), dict(padding="full"), dict(padding_mode="mirror"), dict(stride=(1, 2, 3))],
)
def test_bad_geometry_raises_value_error(kwargs):
    args = _valid_args()
    with pytest.raises(ValueError):
        lora_conv2d(**args, scaling=1.0, groups=2, **kwargs)


# -- memory: the torch backend saves only x and the small weights --


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(padding=1),
        dict(padding=1, padding_mode="reflect"),
        dict(padding="same", dilation=2, padding_mode="circular"),
        dict(padding="same", kernel_size=2),  # asymmetric: pre-padded
        dict(padding=(2, 1), stride=2, groups=3, padding_mode="replicate"),
    ],
)
@pytest.mark.parametrize("weight_is_parameter", [True, False], ids=["parameter", "temporary"])
def test_torch_and_triton_backends_save_only_x_weights_and_z(conv_kwargs, weight_is_parameter):
    """Beside x (and triton's z) the ops save the weights: a parameter weight itself (W' formed again in the
    backward), a temporary one (autocast's cast copy) as W' of the same size."""
    conv_kwargs = dict(conv_kwargs)
    k = conv_kwargs.pop("kernel_size", 3)
    groups = conv_kwargs.get("groups", 1)
    x = torch.randn(2, 6, 11, 9, requires_grad=True)
    weight = torch.randn(12, 6 // groups, k, k)
    if weight_is_parameter:
        weight = torch.nn.Parameter(weight, requires_grad=False)
    bias = torch.randn(12, requires_grad=True)
    lora_A = torch.randn(4, 6 // groups, k, k, requires_grad=True)
    lora_B = torch.randn(12, 4, 1, 1, requires_grad=True)

    inputs = {t.untyped_storage().data_ptr() for t in (x, weight, bias, lora_A, lora_B)}
    made = []  # bytes of the saved tensors that are none of the call's inputs

    def saved_bytes(backend):
        saved = []
        made.clear()

        def pack(t):
            saved.append(t.numel() * t.element_size())
            if t.untyped_storage().data_ptr() not in inputs:
                made.append(t.numel() * t.element_size())
            return t

        with set_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lora_conv2d(x, weight, bias, lora_A, lora_B, 0.5, **conv_kwargs)
        y.sum().backward()  # the saved graph is usable
        assert torch.isfinite(x.grad).all()
        return sum(saved)

    small = sum(t.numel() * t.element_size() for t in (weight, lora_A, lora_B))
    x_bytes = x.numel() * x.element_size()
    assert saved_bytes("torch") == x_bytes + small
    w_bytes = weight.numel() * weight.element_size()
    assert made == ([] if weight_is_parameter else [w_bytes]), "W' saved beside a parameter, or not for a temporary"
    # the two-path oracle keeps more (the padded input and/or the rank-r activations)
    assert saved_bytes("reference") > x_bytes + small
    # triton keeps z = conv(x, A) too: N r HO WO per group, the "frozen + N r" of the target
    with mock.patch.object(conv_op, "_prefer_low_rank", lambda *args: True):
        y = lora_conv2d(x.detach(), weight, bias, lora_A, lora_B, 0.5, **conv_kwargs)
        z_bytes = groups * 4 * y[:, :1].numel() * y.element_size()
        assert saved_bytes("triton") == x_bytes + small + z_bytes
        assert sorted(made) == sorted([z_bytes] + ([] if weight_is_parameter else [w_bytes]))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid", 1, (2, 1)])
def test_geometry_matches_nn_conv2d_padding(padding, padding_mode):
    """ConvGeometry's explicit pads reproduce nn.Conv2d, asymmetric 'same' (even kernels) included."""
    for kh, kw, d in itertools.product((1, 2, 3, 4), (1, 2, 3, 4), (1, 2)):
        conv = nn.Conv2d(2, 2, (kh, kw), padding=padding, dilation=d, padding_mode=padding_mode, dtype=torch.float64)
        geometry = ConvGeometry.of(conv)
        x = torch.randn(1, 2, 9, 8, dtype=torch.float64)
        torch.testing.assert_close(geometry.conv(geometry.pad_input(x), conv.weight, conv.bias), conv(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", (2, 1), 3])
def test_unpad_grad_is_the_adjoint_of_the_pad(padding, padding_mode):
    """ConvGeometry.unpad_grad (written out, so torch.compile can trace the backward) equals autograd's
    gradient through F.pad, border folds included: 'same' with even kernels pads one side more."""
    for kh, kw, d in itertools.product((2, 3, 4), (1, 2, 3), (1, 2)):
        conv = nn.Conv2d(2, 2, (kh, kw), padding=padding, dilation=d, padding_mode=padding_mode)
        geometry = ConvGeometry.of(conv)
        x = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
        padded = geometry.pad_input(x)
        g = torch.randn_like(padded)
        expected = torch.autograd.grad(padded, x, g)[0] if geometry.prepad else g
        torch.testing.assert_close(geometry.unpad_grad(g, x.detach()), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton", CUDA])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("force_low_rank", [True, False])
def test_backend_channels_last(monkeypatch, backend, groups, force_low_rank):
    """Channels-last inputs (the fast CPU/GPU layout) take other views in the backward; same numbers.

    float64 on the CPU for torch; float32 for triton and cuda (their kernels take no float64), TF32 off.
    """
    module = importlib.import_module("adaptsr.ops.lora_conv2d")
    monkeypatch.setattr(module, "_prefer_low_rank", lambda *args: force_low_rank)
    device, dtype = {
        "cuda": ("cuda", torch.float32), "triton": (TRITON_DEVICE, torch.float32), "torch": ("cpu", torch.float64)
    }[backend]
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    cl = torch.channels_last
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64)
    a, b = torch.randn(2, 4 // groups, 3, 3, dtype=torch.float64), torch.randn(6, 2, 1, 1, dtype=torch.float64)
    dy = torch.randn(2, 6, 7, 6, dtype=torch.float64)
    results = {}
    with _no_tf32():
        runs = ((backend, cl, device, dtype), ("reference", torch.contiguous_format, "cpu", torch.float64))
        for name, memory_format, dev, dt in runs:
            leaves = [
                t.to(device=dev, dtype=dt).clone().requires_grad_(True)
                for t in (x.contiguous(memory_format=memory_format), a, b)
            ]
            weight = w.to(device=dev, dtype=dt)
            with set_backend(name):
                y = lora_conv2d(leaves[0], weight, None, leaves[1], leaves[2], 0.5, padding=1, groups=groups)
            grads = torch.autograd.grad(y, leaves, dy.to(device=dev, dtype=dt).contiguous(memory_format=memory_format))
            results[name] = [t.double().cpu() for t in (y, *grads)]
    for name, got, ref in zip(("y", "dx", "dA", "dB"), results[backend], results["reference"]):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=f"{name} differs for channels-last input")


@pytest.mark.parametrize(
    ("channels", "groups", "impl", "device_type", "expected"),
    [
        # the CPU's measured choices (see lora_conv2d.py): narrow layers the full gradient, wide ones the thin pass
        ((32, 24), 1, "torch", "cpu", False),  # RRDB's first dense-block conv
        ((24, 152), 1, "torch", "cpu", False),  # RRDB's last
        ((48, 48), 1, "torch", "cpu", False),  # a light SwinIR's body conv
        ((64, 64), 1, "torch", "cpu", True),
        ((180, 180), 1, "torch", "cpu", True),
        # on CUDA and for the fused backends' own kernels, the FLOP ratio with the GPU's penalty
        ((48, 48), 1, "torch", "cuda", True),
        ((48, 48), 1, "triton", "cpu", True),
        ((48, 48), 1, "cuda", "cuda", True),
        ((16, 16), 1, "torch", "cuda", False),  # rank 8 on 16 channels: no saving anywhere
        # grouped: the full gradient is per group, the thin pass reads every input channel
        ((64, 64), 4, "torch", "cuda", False),
    ],
)
def test_pass_choice_follows_the_device(channels, groups, impl, device_type, expected):
    """The backward's choice between the low-rank pass and the full weight gradient, at rank 8, 3x3."""
    out_channels, in_channels = channels
    weight = torch.empty(out_channels, in_channels // groups, 3, 3, device="meta")
    assert conv_op._prefer_low_rank(weight, 8, groups, impl, device_type) is expected
