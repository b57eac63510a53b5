"""The CUDA kernels' numbers, checked on the CPU: csrc/'s kernel headers compiled with g++ on an emulation of
the CUDA execution model (tests/cuda_emulation/: one fiber per CUDA thread, barriers for __syncthreads,
emulated warp shuffles) and compared with float64 references under the tolerance rule of tests/conftest.py.

The harness launches the kernels with the extension's own launch geometry (csrc/**/*_geometry.h) and
dtype dispatch; what it copies from the .cu host code is listed at the top of tests/cuda_emulation/
harness.cpp. Memory ordering, occupancy and real warp scheduling are not checked (see emu.h); the GPU
tests (tests/test_cuda_extension.py, tests/ops/ with the "cuda" backend) are. Every case runs twice, the
threads of a block in ascending and in descending order between barriers, so that a missing
__syncthreads shows. All CUDA threads run on one core, so the shapes are small. The harness is built once with torch.utils.cpp_extension
(about a minute) and cached next to the extension's JIT build (``$ADAPTSR_BUILD_DIR``, default
``~/.cache/adaptsr``); ninja rebuilds it when a kernel header changes. Skipped only where no C++
compiler is found.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from adaptsr import _cuda
from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import _low_rank_grads

HARNESS = Path(__file__).resolve().parent / "cuda_emulation"
CSRC = _cuda._CSRC  # the sources the extension itself builds from (checkout or installed copy)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would run ($CXX, else c++), if it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_directory() -> Path:
    """A sibling of the extension's JIT build folder, one per torch and Python version."""
    tag = f"cuda_emulation-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return _cuda.build_directory().parent / re.sub(r"[^A-Za-z0-9.+_-]", "_", tag)


@pytest.fixture(scope="module")
def emu():
    """The harness module (built here when missing or out of date)."""
    if _compiler() is None:
        pytest.skip(f"no C++ compiler ({os.environ.get('CXX', 'c++')} on PATH) to build the CUDA kernel emulation")
    from torch.utils import cpp_extension

    build_dir = _build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = cpp_extension.load(
        name="adaptsr_cuda_emulation",
        sources=[str(HARNESS / "harness.cpp")],
        extra_include_paths=[str(CSRC), str(HARNESS)],
        extra_cflags=["-O2", "-Wno-unknown-pragmas"],
        build_directory=str(build_dir),
        verbose=False,
    )
    print(f"CUDA kernel emulation loaded in {time.perf_counter() - start:.1f} s from {build_dir}")
    yield module
    module.set_descending_schedule(False)


@pytest.fixture(params=["ascending", "descending"])
def schedule(request, emu):
    """The order the emulated threads of a block run in between barriers (a missing barrier shows in one or the other)."""
    emu.set_descending_schedule(request.param == "descending")
    yield request.param
    emu.set_descending_schedule(False)


def _seed(*labels: str) -> int:
    """A fixed seed per test case (str hashes change from run to run)."""
    return zlib.crc32("/".join(labels).encode())


def _rounded(gen: torch.Generator, shape, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Random values drawn in float64 and rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


# -- the LoRA low-rank gradient pass (csrc/lora_lowrank_grads/) --

# (c_in, c_out, kernel, stride, padding, dilation, groups, rank, batch, height, width, SMs the grid is sized for)
CONV_CASES = {
    "3x3-c3-odd": (3, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, 2, 7, 9, 1),
    "groups3-stride2-dilation2": (6, 9, (3, 3), (2, 2), (1, 1), (2, 2), 3, 3, 2, 8, 7, 3),
    "1x1-33-outputs": (17, 33, (1, 1), (1, 1), (0, 0), (1, 1), 1, 16, 2, 5, 7, 2),
    "groups2-36-per-group-3x1": (72, 34, (3, 1), (2, 1), (1, 0), (1, 1), 2, 4, 1, 9, 6, 1),
    "rank37-two-chunks": (12, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1, 37, 2, 9, 10, 1),
    # three output tiles (u summed over them) and three input-channel tiles, ranks in two lane groups
    "1x1-130-to-140-rank12": (130, 140, (1, 1), (1, 1), (0, 0), (1, 1), 1, 12, 1, 9, 10, 2),
    # 330 pixels: runs of two tiles, the last one ragged (a thread still checking the previous
    # tile's pixels while another sets the next tile's shows here)
    "rank12-runs-of-two-tiles": (5, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1, 12, 1, 15, 22, 1),
    # channels in multiples of 8: channels-last x and dy staged 16 bytes at a time, with a ragged
    # last run of 8 channels (72 = 64 + 8) and zero padding at the borders
    "3x3-72-to-80-vector-loads": (72, 80, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, 1, 6, 7, 2),
    "groups2-24-per-group-vector-loads": (48, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2, 4, 1, 5, 6, 1),
    # 36 channels: 8-byte vectors of bf16 (as SwinIR-M's 180), 16-byte of fp32; 18: 8-byte fp32, no bf16 vectors
    "3x3-36-to-18-8-byte-vectors": (36, 18, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, 1, 5, 6, 1),
    # a single pixel: no stride constrains the vectors, so 13 and 11 channels end mid-vector
    "one-pixel-vector-loads-ragged": (13, 11, (1, 1), (1, 1), (0, 0), (1, 1), 1, 3, 1, 1, 1, 1),
}


def _lowrank_params():
    """Every case, layout (mixed: x channels-last, dy NCHW) and dtype on the CUDA-core kernels; the 16-bit ones
    on the tensor-core z and dA too."""
    for case_name in CONV_CASES:
        for layout in ("nchw", "channels_last", "mixed"):
            for dtype_name in DTYPES:
                for units in ("cuda_cores", "tensor_cores") if dtype_name != "fp32" else ("cuda_cores",):
                    yield pytest.param(case_name, layout, dtype_name, units, id=f"{case_name}-{layout}-{dtype_name}-{units}")


def _lowrank_case(case_name: str, layout: str, dtype: torch.dtype, seed_label: str):
    """(x, dy, lora_A, lora_B, geometry) of CONV_CASES[case_name] in ``dtype``; x and dy in ``layout`` ("mixed":
    x channels-last, dy NCHW)."""
    c_in, c_out, kernel, stride, padding, dilation, groups, rank, batch, height, width, _ = CONV_CASES[case_name]
    gen = torch.Generator().manual_seed(_seed(case_name, layout, seed_label))
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    fan_in = c_in // groups * kernel[0] * kernel[1]
    x = _rounded(gen, (batch, c_in, height, width), dtype)
    dy = _rounded(gen, (batch, c_out, out_h, out_w), dtype)
    lora_a = _rounded(gen, (rank, c_in // groups, *kernel), dtype, fan_in**-0.5)
    lora_b = _rounded(gen, (c_out, rank, 1, 1), dtype, rank**-0.5)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    elif layout == "mixed":  # each tensor is staged by its own layout
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dy, lora_a, lora_b, ConvGeometry.from_args(kernel, stride, padding, dilation, groups)


@pytest.mark.parametrize("case_name, layout, dtype_name, units", list(_lowrank_params()))
def test_lowrank_grads_match_float64(emu, schedule, case_name, layout, dtype_name, units, assert_close_to_reference):
    _, _, _, stride, padding, dilation, groups, *_, sms = CONV_CASES[case_name]
    dtype = DTYPES[dtype_name]
    x, dy, lora_a, lora_b, geometry = _lowrank_case(case_name, layout, dtype, dtype_name)
    scaling = 0.75

    grad_a, grad_b = emu.lora_lowrank_grads(
        x, dy, lora_a, lora_b, scaling, stride, padding, dilation, groups, sms, units == "tensor_cores"
    )

    tensors = (x, dy, lora_a, lora_b)
    ref64 = _low_rank_grads(*(t.double() for t in tensors), scaling, geometry)
    plain = _low_rank_grads(*tensors, scaling, geometry)
    magnitude = _low_rank_grads(*(t.double().abs() for t in tensors), scaling, geometry)
    for name, got, r64, p, m in zip(("dA", "dB"), (grad_a, grad_b), ref64, plain, magnitude):
        assert got.dtype == dtype, f"{name}: {got.dtype}"
        assert_close_to_reference(got, r64, p, f"emulated {name} {case_name} {layout} ({schedule})", magnitude=m)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 as cvt.rna.tf32.f32 rounds (nearest, ties away from zero; 10-bit mantissa), on
    the bits: adding half of the dropped 13 bits' range to the magnitude and clearing them."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_rounding_of_the_test():
    """The rounding the TF32 checks below rely on: to nearest, ties away from zero, 10 mantissa bits."""
    one_ulp = 2.0**-10
    values = torch.tensor([1.0, 1 + one_ulp / 4, 1 + one_ulp / 2, 1 + 3 * one_ulp / 4, -(1 + one_ulp / 2),
                           2.0**-20 * (1 + one_ulp / 2 - 2.0**-23), 2.0**-20 * (3 - one_ulp / 2)])
    expected = torch.tensor([1.0, 1.0, 1 + one_ulp, 1 + one_ulp, -(1 + one_ulp), 2.0**-20, 2.0**-20 * 3])
    assert torch.equal(_tf32(values), expected)


# TF32's unit roundoff: products of two rounded operands are off by at most about twice it.
_TF32_UNIT_ROUNDOFF = 2.0**-11


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case_name", list(CONV_CASES))
def test_lowrank_grads_tf32_tensor_cores(emu, schedule, case_name, layout, assert_close_to_reference):
    """fp32 inputs on the tensor-core kernels (the host takes them where torch allows TF32): x and A rounded to
    TF32 for z, u and x for dA, everything else fp32. dB (from z on the CUDA-core kernel) matches the float64
    reference of TF32-rounded x and A to fp32 accuracy, which a kernel that truncates (skips the rounding) or
    runs in IEEE fails; dA is within TF32's error of the exact float64 result."""
    _, _, _, stride, padding, dilation, groups, *_, sms = CONV_CASES[case_name]
    x, dy, lora_a, lora_b, geometry = _lowrank_case(case_name, layout, torch.float32, "tf32")
    scaling = 0.75

    grad_a, grad_b = emu.lora_lowrank_grads(x, dy, lora_a, lora_b, scaling, stride, padding, dilation, groups, sms, True)
    assert grad_a.dtype == grad_b.dtype == torch.float32

    label = f"emulated TF32 {case_name} {layout} ({schedule})"
    magnitude = _low_rank_grads(*(t.double().abs() for t in (x, dy, lora_a, lora_b)), scaling, geometry)
    # dB = s dy^T z, z from TF32 operands: exact up to fp32 sums against the float64 result of the rounded operands
    rounded = (_tf32(x), dy, _tf32(lora_a), lora_b)
    ref_b = _low_rank_grads(*(t.double() for t in rounded), scaling, geometry)[1]
    plain_b = _low_rank_grads(*rounded, scaling, geometry)[1]
    assert_close_to_reference(grad_b, ref_b, plain_b, f"{label} dB", magnitude=magnitude[1])
    # dA = s tf32(u)^T tf32(x): within TF32's rounding of the exact result
    exact_a = _low_rank_grads(*(t.double() for t in (x, dy, lora_a, lora_b)), scaling, geometry)[0]
    err = (grad_a.double() - exact_a).abs().max().item()
    bound = 3 * _TF32_UNIT_ROUNDOFF * magnitude[0].max().item()
    assert err <= bound, f"{label} dA: max abs error {err:.3e} > TF32 bound {bound:.3e}"


# -- window attention forward and backward (csrc/window_attention/) --


def f32(t):
    """bias and mask as the extension's Python wrappers hand them over: float32, contiguous."""
    return None if t is None else t.float().contiguous()


def f64(t):
    return None if t is None else t.double()


def _attention(q, k, v, bias, mask, scale):
    """(o, lse) of softmax(scale q k^T + bias[h] + mask[b % nW]) v, autograd-able, in the inputs' dtype
    (lse at least float32, as the kernel's)."""
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s + mask[torch.arange(q.shape[0]) % mask.shape[0]][:, None]
    return _softmax(s) @ v, torch.logsumexp(s.to(torch.promote_types(s.dtype, torch.float32)), -1)


def _softmax(s):
    """Row softmax that gives P = 0 (not NaN) on a row whose every score is -inf, as the kernels do."""
    dead = torch.isneginf(s).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def _attention_magnitudes(q, k, v, do, bias, mask, scale) -> dict:
    """Entry by entry the sum of |terms| behind each result (tests/ops/test_window_attention.py::magnitudes)."""
    s = scale * q @ k.transpose(-1, -2)
    s_abs = scale * q.abs() @ k.abs().transpose(-1, -2)
    if bias is not None:
        s, s_abs = s + bias, s_abs + bias.abs()
    if mask is not None:
        plane = mask[torch.arange(q.shape[0]) % mask.shape[0]][:, None]
        s, s_abs = s + plane, s_abs + plane.abs()
    p = _softmax(s)
    a = do.abs() @ v.abs().transpose(-1, -2)
    ds_plus = p * (a + (p * a).sum(-1, keepdim=True))
    return {
        "o": p @ v.abs(),
        "lse": s_abs.amax(-1),
        "dq": scale * ds_plus @ k.abs(),
        "dk": scale * ds_plus.transpose(-2, -1) @ q.abs(),
        "dv": p.transpose(-2, -1) @ do.abs(),
        "dbias": ds_plus.sum(0),
    }


# (windows, heads, N, d, mask planes (0: no mask), with bias, SMs the dbias splits are sized for)
ATTENTION_CASES = {
    "N64-bias-mask": (3, 2, 64, 30, 2, True, 1),
    "N64-plain": (2, 2, 64, 30, 0, False, 1),
    # Swin's 7 x 7 windows: N is no multiple of any tile; two dq splits sum dbias; in mask plane 0
    # row 3 is fully masked (-inf: o = 0, lse = -inf, no NaN anywhere) and row 5 half masked
    "N49-ragged-bias-mask-dead-row": (4, 2, 49, 30, 2, True, 5),
    "N256-bias-mask": (2, 1, 256, 30, 1, True, 2),
    # the largest head dimension (four 16-wide tensor-core steps), 4 x 4 windows: one key tile,
    # three of the four warps past the last row
    "N16-d64-bias": (3, 2, 16, 64, 0, True, 2),
    # one padded head step (d = 8 of 16), 72 keys: the last 32-key tile of the forward holds 8
    "N72-d8-mask": (2, 3, 72, 8, 2, False, 1),
    # a one-token window (P = 1), the head dimension one whole tensor-core step
    "N1-d16-bias": (3, 2, 1, 16, 0, True, 2),
    # keys from larger windows than the queries (HAT's overlapping cross-attention, N_k below)
    "N16-Nk36-bias-mask": (3, 2, 16, 30, 2, True, 2),
    "N64-Nk144-bias": (2, 2, 64, 30, 0, True, 1),  # 1 query tile x 5 key tiles of the forward, 3 of dk/dv
    "N36-Nk16-mask": (2, 2, 36, 16, 1, False, 1),  # fewer keys than queries
    # HAT's own sizes: 256 queries, 576 keys, more than the shared-memory score rows hold, so tensor cores
    # only and with a frozen bias table (no dbias)
    "N256-Nk576-frozen-bias": (1, 1, 256, 30, 0, True, 1),
}
# keys per window where they are not the N queries
ATTENTION_KEYS = {"N16-Nk36-bias-mask": 36, "N64-Nk144-bias": 144, "N36-Nk16-mask": 16, "N256-Nk576-frozen-bias": 576}
# cases whose bias gets no gradient (the kernels take N_k > 256 keys only then)
_FROZEN_BIAS = {"N256-Nk576-frozen-bias"}
# the dtypes of each case; the 16-bit ones run on both kernels unless listed as tensor-core only
_ATTENTION_DTYPES = {
    "N64-bias-mask": ["fp32", "fp16", "bf16"],
    "N64-plain": ["fp32", "bf16"],
    "N49-ragged-bias-mask-dead-row": ["fp32", "bf16"],
    "N256-bias-mask": ["fp32", "bf16"],
    "N16-d64-bias": ["fp32", "fp16"],
    "N72-d8-mask": ["bf16"],
    "N1-d16-bias": ["fp32", "bf16"],
    "N16-Nk36-bias-mask": ["fp32", "bf16"],
    "N64-Nk144-bias": ["fp32", "bf16"],
    "N36-Nk16-mask": ["fp32", "fp16"],
    "N256-Nk576-frozen-bias": ["bf16"],
}
_ATTENTION_TENSOR_CORES_ONLY = {
    ("N64-plain", "bf16"), ("N256-bias-mask", "bf16"), ("N72-d8-mask", "bf16"), ("N64-Nk144-bias", "bf16"),
    ("N256-Nk576-frozen-bias", "bf16"),
}


def _attention_params():
    for name, dtypes in _ATTENTION_DTYPES.items():
        for dtype_name in dtypes:
            for units in ("cuda_cores", "tensor_cores") if dtype_name != "fp32" else ("cuda_cores",):
                if units == "cuda_cores" and (name, dtype_name) in _ATTENTION_TENSOR_CORES_ONLY:
                    continue
                yield pytest.param(name, dtype_name, units, id=f"{name}-{dtype_name}-{units}")


@pytest.mark.parametrize("case_name, dtype_name, units", list(_attention_params()))
def test_window_attention_fwd_bwd_match_float64(
    emu, schedule, case_name, dtype_name, units, assert_close_to_reference
):
    windows, heads, n, d, num_masks, with_bias, sms = ATTENTION_CASES[case_name]
    n_keys = ATTENTION_KEYS.get(case_name, n)
    need_dbias = with_bias and case_name not in _FROZEN_BIAS
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(_seed(case_name, dtype_name))
    q, do = (_rounded(gen, (windows, heads, n, d), dtype) for _ in range(2))
    k, v = (_rounded(gen, (windows, heads, n_keys, d), dtype) for _ in range(2))
    bias = _rounded(gen, (heads, n, n_keys), dtype) if with_bias else None
    mask = None
    if num_masks:
        mask = torch.where(torch.rand(num_masks, n, n_keys, generator=gen) < 0.3, -100.0, 0.0)
        if "dead-row" in case_name:
            mask[0, 3, :] = -float("inf")
            mask[0, 5, ::2] = -float("inf")
        mask = mask.to(dtype)
    scale = d**-0.5

    tensor_cores = units == "tensor_cores"
    o, lse = emu.window_attention_fwd(q, k, v, f32(bias), f32(mask), scale, tensor_cores)
    dq, dk, dv, _delta, dbias = emu.window_attention_bwd(
        do, q, k, v, o, lse, f32(bias), f32(mask), scale, need_dbias, sms, tensor_cores
    )
    got = {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv, **({"dbias": dbias} if need_dbias else {})}
    assert (dbias is None) == (not need_dbias)

    def reference(run_dtype):
        leaves = [t.to(run_dtype).requires_grad_(True) for t in (q, k, v)]
        b = bias.to(run_dtype).requires_grad_(True) if with_bias else None
        out, lse_ = _attention(*leaves, b, None if mask is None else mask.to(run_dtype), scale)
        grads = torch.autograd.grad(out, leaves + ([b] if with_bias else []), do.to(run_dtype))
        result = {"o": out, "lse": lse_, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
        if need_dbias:
            result["dbias"] = grads[3].float() if run_dtype != torch.float64 else grads[3]
        return {key: value.detach() for key, value in result.items()}

    ref64, plain = reference(torch.float64), reference(dtype)
    magnitude = _attention_magnitudes(*(f64(t) for t in (q, k, v, do, bias, mask)), scale)
    for key, value in got.items():
        # lse and dbias are float32 whatever the inputs' dtype; the rest is in the inputs' dtype
        expected_dtype = torch.float32 if key in ("lse", "dbias") else dtype
        assert value.dtype == expected_dtype, f"{key}: {value.dtype}"
        r64, plain_value, m = ref64[key], plain[key].to(expected_dtype), magnitude[key]
        if key == "lse":  # -inf exactly on the fully masked rows; the rule on the others
            dead = torch.isneginf(r64)
            assert torch.equal(torch.isneginf(value), dead), "lse: -inf on other rows than the fully masked ones"
            value, r64, plain_value, m = value[~dead], r64[~dead], plain_value[~dead], m[~dead]
        assert_close_to_reference(
            value, r64, plain_value, f"emulated {key} {case_name} ({units}, {schedule})", dtype=dtype, magnitude=m
        )
    if "dead-row" in case_name:
        assert torch.equal(o[0::2, :, 3], torch.zeros_like(o[0::2, :, 3])), "o of a fully masked row must be 0"
        assert torch.equal(dq[0::2, :, 3], torch.zeros_like(dq[0::2, :, 3])), "dq of a fully masked row must be 0"
