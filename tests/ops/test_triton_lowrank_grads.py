"""The fused low-rank gradient kernels (Triton and CUDA C++) against the float64 reference.

Every test runs once per provider: "triton" (on a machine without a GPU through TRITON_INTERPRET=1,
set in tests/conftest.py, on small shapes) and "cuda" (the CUDA C++ kernel of adaptsr._C, only
where a GPU is visible and the extension loads). On a GPU both run at full SR-training sizes too.
"""

from __future__ import annotations

import pytest
import torch

from adaptsr.backend import _unavailable_reason, is_available
from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import _low_rank_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

PROVIDERS = [
    pytest.param(name, marks=pytest.mark.skipif(not is_available(name), reason=f"{name} backend: {_unavailable_reason(name)}"))
    for name in ("triton", "cuda")
]


def _launcher(provider: str):
    """The provider's lora_conv2d_lowrank_grads (same contract; imported on use)."""
    if provider == "cuda":
        from adaptsr import _cuda

        return _cuda.lora_conv2d_lowrank_grads
    from adaptsr.kernels.lora_conv2d import lora_conv2d_lowrank_grads

    return lora_conv2d_lowrank_grads

# (c_in, c_out, kernel, stride, padding, dilation, groups, rank, batch, height, width)
SMALL_CASES = [
    (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 1, 7, 9),  # C=3, r=1, batch 1, odd sizes
    (6, 9, (3, 3), (2, 2), (1, 1), (2, 2), 3, 3, 2, 8, 5),  # stride 2, dilation 2, groups 3
    (5, 7, (1, 3), (2, 1), (0, 1), (1, 1), 1, 2, 3, 5, 6),  # non-square kernel, mixed stride
    (20, 24, (3, 3), (1, 1), (1, 1), (1, 1), 2, 5, 1, 6, 6),  # channels > one tile, groups 2
    (17, 33, (1, 1), (1, 1), (0, 0), (1, 1), 1, 16, 2, 5, 3),  # 1x1 (the linear case), r=16
    (8, 8, (5, 5), (1, 1), (2, 2), (1, 1), 1, 4, 1, 9, 9),  # 5x5 taps
]
GPU_CASES = [
    (64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, 4, 64, 64),
    (180, 180, (3, 3), (1, 1), (1, 1), (1, 1), 1, 16, 2, 48, 40),
    (180, 540, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, 16, 32, 33),
]
# Relative (to the largest reference entry) error allowed per dtype: the kernels accumulate in
# fp32; the Triton kernel rounds u and z once to a low-precision input dtype before the second
# product (the CUDA kernel keeps them in fp32, so it sits well inside these bounds).
# End-to-end float32: IEEE products everywhere (the _ieee_float32 fixture below).
END_TO_END_TOL = 1e-5 if not ON_GPU else 2e-5
# float32 in TF32 (10-bit mantissas in the products, float32 sums).
TF32_REL_TOL = 5e-3
REL_TOL = {torch.float32: 1e-5 if not ON_GPU else 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 products at IEEE precision on a GPU for every test here (torch's convs default to TF32,
    and the Triton conv kernels follow that setting), unless a test turns TF32 on itself."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _dtypes():
    # The interpreter's bf16 dots are wrong (DESIGN.md section 5): bf16 only on a GPU.
    return [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


def _run_case(provider, case, dtype, channels_last):
    lora_conv2d_lowrank_grads = _launcher(provider)
    c_in, c_out, kernel, stride, padding, dilation, groups, rank, n, h, w = case
    geometry = ConvGeometry.from_args(kernel, stride, padding, dilation, groups)
    x = torch.randn(n, c_in, h, w, device=DEVICE, dtype=dtype)
    a = torch.randn(rank, c_in // groups, *kernel, device=DEVICE, dtype=dtype) / (c_in * kernel[0] * kernel[1]) ** 0.5
    b = torch.randn(c_out, rank, 1, 1, device=DEVICE, dtype=dtype)
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = torch.randn(n, c_out, ho, wo, device=DEVICE, dtype=dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    scaling = 0.75
    grad_a, grad_b = lora_conv2d_lowrank_grads(x, dy, a, b, scaling, geometry.stride, geometry.conv_padding,
                                               geometry.dilation, groups)
    ref_a, ref_b = _low_rank_grads(x.double().cpu(), dy.double().cpu(), a.double().cpu(), b.double().cpu(),
                                   scaling, geometry)
    assert grad_a.shape == a.shape and grad_b.shape == b.shape
    assert grad_a.dtype == dtype and grad_b.dtype == dtype
    for name, got, ref in (("dA", grad_a, ref_a), ("dB", grad_b, ref_b)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err <= REL_TOL[dtype], f"{name}: relative error {err:.2e} > {REL_TOL[dtype]:.0e} for {case} {dtype}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}g{c[6]}r{c[7]}")
def test_lowrank_grads_small(provider, case, dtype):
    _run_case(provider, case, dtype, channels_last=False)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", SMALL_CASES[:2], ids=["c3", "grouped"])
def test_lowrank_grads_channels_last(provider, case):
    _run_case(provider, case, torch.float32, channels_last=True)


@pytest.mark.skipif(not ON_GPU, reason="full-size shapes run on a GPU only")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2][0]}r{c[7]}")
def test_lowrank_grads_gpu_sizes(provider, case, dtype, channels_last):
    _run_case(provider, case, dtype, channels_last)


@pytest.mark.skipif(not ON_GPU, reason="the CUDA kernel's rank chunks and wide layers run on a GPU only")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "case",
    [
        (40, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1, 40, 2, 9, 11),  # r=40: two rank chunks of the CUDA kernel
        (64, 64, (3, 3), (2, 2), (1, 1), (1, 1), 64, 1, 2, 17, 13),  # depthwise (64 groups), stride 2
        (96, 80, (3, 3), (1, 1), (2, 2), (2, 2), 2, 8, 3, 20, 20),  # channels over several chunks, dilation 2
    ],
    ids=["rank40", "depthwise", "wide-dilated"],
)
def test_lowrank_grads_awkward_gpu_shapes(provider, case):
    _run_case(provider, case, torch.float32, channels_last=False)
    _run_case(provider, case, torch.float16, channels_last=True)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rejects_inconsistent_shapes(provider):
    lora_conv2d_lowrank_grads = _launcher(provider)

    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    dy = torch.randn(1, 6, 5, 5, device=DEVICE)
    a = torch.randn(2, 4, 3, 3, device=DEVICE)
    b = torch.randn(7, 2, 1, 1, device=DEVICE)  # 7 outputs, dy has 6
    with pytest.raises(ValueError, match=r"dy \(1, 6, 5, 5\)"):
        lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_fused_backend_conv_end_to_end(monkeypatch, provider, padding_mode):
    """The fused backend's whole op (cuDNN/torch dense parts + fused kernel) against float64."""
    import importlib

    import adaptsr
    from adaptsr.ops import lora_conv2d

    conv_module = importlib.import_module("adaptsr.ops.lora_conv2d")
    monkeypatch.setattr(conv_module, "_prefer_low_rank", lambda *args: True)
    x = torch.randn(2, 6, 7, 9, device=DEVICE)
    w, bias = torch.randn(8, 3, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE)
    a, b = torch.randn(2, 3, 3, 3, device=DEVICE), torch.randn(8, 2, 1, 1, device=DEVICE)
    dy = torch.randn(2, 8, 4, 5, device=DEVICE)
    results = {}
    for backend, dtype in ((provider, torch.float32), ("reference", torch.float64)):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, bias, a, b)]
        with adaptsr.set_backend(backend):
            y = lora_conv2d(leaves[0], w.to(dtype), leaves[1], leaves[2], leaves[3], 0.5,
                            stride=2, padding=1, dilation=1, groups=2, padding_mode=padding_mode)
        results[backend] = [y] + list(torch.autograd.grad(y, leaves, dy.to(dtype)))
    for name, got, ref in zip(("y", "dx", "dbias", "dA", "dB"), results[provider], results["reference"]):
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < END_TO_END_TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_backend_linear_end_to_end(monkeypatch, provider):
    import importlib

    import adaptsr
    from adaptsr.ops import lora_linear

    linear_module = importlib.import_module("adaptsr.ops.lora_linear")
    monkeypatch.setattr(linear_module, "_prefer_low_rank", lambda *args: True)
    x = torch.randn(3, 5, 20, device=DEVICE)
    w, a, b = torch.randn(30, 20, device=DEVICE), torch.randn(3, 20, device=DEVICE), torch.randn(30, 3, device=DEVICE)
    dy = torch.randn(3, 5, 30, device=DEVICE)
    results = {}
    for backend, dtype in ((provider, torch.float32), ("reference", torch.float64)):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, a, b)]
        with adaptsr.set_backend(backend):
            y = lora_linear(leaves[0], w.to(dtype), None, leaves[1], leaves[2], 0.5)
        results[backend] = [y] + list(torch.autograd.grad(y, leaves, dy.to(dtype)))
    for name, got, ref in zip(("y", "dx", "dA", "dB"), results[provider], results["reference"]):
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < END_TO_END_TOL, f"{name}: relative error {err:.2e}"


# -- the Triton forward: y = conv(x, W') + bias and z = conv(x, A) in one pass --


def _conv_case_tensors(case, dtype, channels_last):
    c_in, c_out, kernel, stride, padding, dilation, groups, rank, n, h, w = case
    x = torch.randn(n, c_in, h, w, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = c_in // groups * kernel[0] * kernel[1]
    weight = torch.randn(c_out, c_in // groups, *kernel, device=DEVICE, dtype=dtype) / fan_in**0.5
    a = torch.randn(rank, c_in // groups, *kernel, device=DEVICE, dtype=dtype) / fan_in**0.5
    bias = torch.randn(c_out, device=DEVICE, dtype=dtype)
    return x, weight, a, bias


_FORWARD_CASES = SMALL_CASES + [pytest.param(c, marks=pytest.mark.skipif(not ON_GPU, reason="full size on a GPU only"))
                                 for c in GPU_CASES]


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", _FORWARD_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}g{c[6]}r{c[7]}")
def test_triton_forward_y_and_z(case, dtype, channels_last):
    """y and z of the one-pass forward against float64 convolutions, in x's memory format."""
    from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd

    c_in, c_out, kernel, stride, padding, dilation, groups, rank, *_ = case
    x, weight, a, bias = _conv_case_tensors(case, dtype, channels_last)
    with_bias = case[7] % 2 == 1  # half the cases without bias
    y, z = lora_conv2d_fwd(x, weight, bias if with_bias else None, a, stride, padding, dilation, groups)
    x64 = x.double().cpu()
    ref_y = torch.nn.functional.conv2d(x64, weight.double().cpu(), bias.double().cpu() if with_bias else None,
                                       stride, padding, dilation, groups)
    ref_z = torch.nn.functional.conv2d(x64, a.double().cpu().repeat(groups, 1, 1, 1), None, stride, padding, dilation,
                                       groups)
    for name, got, ref in (("y", y, ref_y), ("z", z, ref_z)):
        assert got.shape == ref.shape and got.dtype == dtype
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        err = (got.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= REL_TOL[dtype], f"{name}: relative error {err:.2e} for {case} {dtype}"


def test_triton_forward_y_only_and_z_only():
    """Either output alone: the same numbers as both together, and nothing computed for the other."""
    from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd

    case = SMALL_CASES[1]
    _, _, _, stride, padding, dilation, groups, *_ = case
    x, weight, a, bias = _conv_case_tensors(case, torch.float32, False)
    y, z = lora_conv2d_fwd(x, weight, bias, a, stride, padding, dilation, groups)
    y_only, none_z = lora_conv2d_fwd(x, weight, bias, None, stride, padding, dilation, groups)
    none_y, z_only = lora_conv2d_fwd(x, None, None, a, stride, padding, dilation, groups)
    assert none_z is None and none_y is None
    torch.testing.assert_close(y_only, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_only, z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", SMALL_CASES[:4], ids=["c3", "grouped", "nonsquare", "wide"])
def test_triton_grads_from_saved_z(case):
    """The backward kernels with the forward's z give the same dA, dB as with z recomputed."""
    from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd, lora_conv2d_lowrank_grads

    c_in, c_out, kernel, stride, padding, dilation, groups, rank, *_ = case
    x, weight, a, _ = _conv_case_tensors(case, torch.float32, False)
    y, z = lora_conv2d_fwd(x, weight, None, a, stride, padding, dilation, groups)
    dy = torch.randn_like(y)
    b = torch.randn(c_out, rank, 1, 1, device=DEVICE)
    with_z = lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, stride, padding, dilation, groups, z=z)
    without = lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, stride, padding, dilation, groups)
    for got, ref in zip(with_z, without):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="z must have shape"):
        lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, stride, padding, dilation, groups, z=z[:, :, :1])


# -- float32 precision: TF32 where torch would use it --


class _PrecisionRecorder:
    """Stands in for a kernel: records the INPUT_PRECISION of each launch and computes nothing."""

    def __init__(self, seen: list):
        self.seen = seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append(kwargs["INPUT_PRECISION"])


@pytest.mark.parametrize("conv_tf32, matmul_tf32", [(True, False), (False, True), (False, False), (True, True)])
def test_triton_float32_precision_follows_torch_settings(monkeypatch, conv_tf32, matmul_tf32):
    """A conv's kernels take cudnn.allow_tf32, as cuDNN's own float32 convs do; a linear layer's take
    cuda.matmul.allow_tf32, as cuBLAS's do; 16-bit inputs are not affected."""
    from adaptsr.kernels import lora_conv2d as conv_kernels
    from adaptsr.kernels.lora_linear import lora_linear_fwd, lora_linear_lowrank_grads

    seen: list = []
    for name in ("_lora_conv2d_fwd_kernel", "_lowrank_u_db_kernel", "_lowrank_da_kernel"):
        monkeypatch.setattr(conv_kernels, name, _PrecisionRecorder(seen))
    # (the _ieee_float32 fixture restores both settings)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32

    x, w, a = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(2, 4, 3, 3)
    b, dy = torch.randn(6, 2, 1, 1), torch.randn(1, 6, 5, 5)
    conv_kernels.lora_conv2d_fwd(x, w, None, a, (1, 1), (1, 1), (1, 1), 1)
    conv_kernels.lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1)
    conv_expected = "tf32" if conv_tf32 else "ieee"
    assert seen == [conv_expected] * 4  # the forward, z recomputed, phases 1 and 2

    seen.clear()
    x2, dy2, a2, b2 = torch.randn(7, 4), torch.randn(7, 6), torch.randn(2, 4), torch.randn(6, 2)
    lora_linear_fwd(x2, torch.randn(6, 4), None, a2)
    lora_linear_lowrank_grads(x2, dy2, a2, b2, 1.0)
    assert seen == ["tf32" if matmul_tf32 else "ieee"] * 4

    seen.clear()
    conv_kernels.lora_conv2d_fwd(x.half(), w.half(), None, a.half(), (1, 1), (1, 1), (1, 1), 1)
    assert seen == ["tf32"]  # ignored by tl.dot for 16-bit operands


@pytest.mark.skipif(not ON_GPU, reason="TF32 products need a GPU (the interpreter computes float32 exactly)")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", GPU_CASES[:2], ids=lambda c: f"{c[0]}to{c[1]}k{c[2][0]}r{c[7]}")
def test_triton_tf32_conv_on_gpu(case, channels_last):
    """The TF32 tiles (the float32 default for convs) at full size: y, z, dA and dB within TF32's error."""
    from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd, lora_conv2d_lowrank_grads

    c_in, c_out, kernel, stride, padding, dilation, groups, rank, *_ = case
    x, weight, a, bias = _conv_case_tensors(case, torch.float32, channels_last)
    y, z = lora_conv2d_fwd(x, weight, bias, a, stride, padding, dilation, groups, allow_tf32=True)
    dy = torch.randn_like(y)
    b = torch.randn(c_out, rank, 1, 1, device=DEVICE)
    grad_a, grad_b = lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, stride, padding, dilation, groups, z=z,
                                               allow_tf32=True)
    x64, dy64 = x.double().cpu(), dy.double().cpu()
    geometry = ConvGeometry.from_args(kernel, stride, padding, dilation, groups)
    ref_y = torch.nn.functional.conv2d(x64, weight.double().cpu(), bias.double().cpu(), stride, padding, dilation, groups)
    ref_z = torch.nn.functional.conv2d(x64, a.double().cpu(), None, stride, padding, dilation, groups)
    ref_a, ref_b = _low_rank_grads(x64, dy64, a.double().cpu(), b.double().cpu(), 0.5, geometry)
    for name, got, ref in (("y", y, ref_y), ("z", z, ref_z), ("dA", grad_a, ref_a), ("dB", grad_b, ref_b)):
        err = (got.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= TF32_REL_TOL, f"{name}: relative error {err:.2e} in TF32 for {case}"


@pytest.mark.parametrize("dtype, precision, tile_set", [
    (torch.bfloat16, "tf32", "16-bit"), (torch.float16, "tf32", "16-bit"),
    (torch.float32, "tf32", "fp32 tf32"), (torch.float32, "ieee", "fp32 ieee"),
])
def test_forward_autotunes_the_tiles_made_for_its_products(dtype, precision, tile_set):
    """The forward's autotuner times only the tiles made (spill-free) for the operands' size and the products'
    precision, and keys its choice on the precision too, so a TF32 call never reuses an IEEE call's tile."""
    import triton

    from adaptsr.kernels import lora_conv2d as conv_kernels

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c, "TILE_SET": name}, num_warps=w, num_stages=s)
               for name, tiles in conv_kernels._FWD_TILES.items() for m, n, c, w, s in tiles]
    x = torch.empty(1, 1, 1, 1, dtype=dtype)
    kept = conv_kernels._configs_for_inputs(configs, {"x_ptr": x}, INPUT_PRECISION=precision, HAS_BIAS=True)
    assert {c.kwargs["TILE_SET"] for c in kept} == {tile_set}
    assert len(kept) == len(conv_kernels._FWD_TILES[tile_set])
    assert "INPUT_PRECISION" in conv_kernels._lora_conv2d_fwd_kernel.keys
