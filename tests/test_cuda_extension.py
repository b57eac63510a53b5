"""The CUDA extension adaptsr._C: it compiles and links on any machine with nvcc, and its bindings check inputs.

The build goes through the just-in-time path of ``adaptsr._cuda`` (the one a user without an
ahead-of-time build gets), for one architecture when no GPU is visible (``TORCH_CUDA_ARCH_LIST=9.0``
unless set), cached in ``~/.cache/adaptsr`` (or ``$ADAPTSR_BUILD_DIR``): the first run compiles
(about four minutes on a busy 2-core machine), later runs only import. It is skipped only where nvcc or a
CUDA build of torch is absent; a compile or link error fails it. The kernels' numbers are checked
on a GPU (the tests at the end, and tests/ops/ with the "cuda" backend).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from adaptsr import _cuda
from adaptsr.backend import _unavailable_reason, is_available, set_backend
from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import _low_rank_grads

BINDINGS = ("lora_lowrank_grads", "window_attention_fwd", "window_attention_bwd")
ON_GPU = torch.cuda.is_available()
needs_cuda_backend = pytest.mark.skipif(not is_available("cuda"), reason=f"cuda backend: {_unavailable_reason('cuda')}")


@pytest.fixture(scope="module")
def ext():
    """The compiled extension module (built here if needed)."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: nothing to compile against")
    if _cuda.find_cuda_home(torch.version.cuda) is None:
        pytest.skip("no CUDA toolkit (nvcc and include/cuda_runtime.h) in $CUDA_HOME, on PATH or in /usr/local/cuda*")
    with pytest.MonkeyPatch.context() as mp:
        if not ON_GPU and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to guess from: one architecture keeps the build short (Hopper).
            mp.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
        start = time.perf_counter()
        module = _cuda.load()  # raises (and fails every test here) on a compile or link error
        elapsed = time.perf_counter() - start
    print(f"adaptsr._C loaded in {elapsed:.1f} s from {getattr(module, '__file__', '?')}")
    return module


def test_extension_exposes_the_bindings(ext):
    for name in BINDINGS:
        assert callable(getattr(ext, name, None)), f"adaptsr._C has no {name}"


def test_window_attention_limits_come_from_the_extension(ext):
    """The sizes the kernels take, as the extension exports them (what "auto" asks before it picks cuda):
    Swin's 8 x 8 and 16 x 16 windows with SwinIR's and HAT's head dim 30 fit; one past a limit does not."""
    max_seq, max_head_dim = ext.window_attention_max_seq, ext.window_attention_max_head_dim
    assert max_seq >= 256 and max_head_dim >= 30
    assert _cuda.window_attention_takes(torch.bfloat16, max_seq, max_head_dim)
    assert not _cuda.window_attention_takes(torch.bfloat16, max_seq + 1, max_head_dim)
    assert not _cuda.window_attention_takes(torch.float16, max_seq, max_head_dim + 1)
    assert not _cuda.window_attention_takes(torch.float64, 64, 30)
    # keys from larger windows: up to max_seq everywhere; HAT's 576 on tensor cores with a frozen bias table only
    assert _cuda.window_attention_takes(torch.float32, 64, 30, 144)
    assert _cuda.window_attention_takes(torch.bfloat16, 36, 30, 16)
    assert _cuda.window_attention_takes(torch.bfloat16, 256, 30, 576, need_dbias=False, tensor_cores=True)
    assert not _cuda.window_attention_takes(torch.bfloat16, 256, 30, 576, need_dbias=True, tensor_cores=True)
    assert not _cuda.window_attention_takes(torch.bfloat16, 256, 30, 576, need_dbias=False, tensor_cores=False)
    assert not _cuda.window_attention_takes(torch.float32, 256, 30, 576, need_dbias=False, tensor_cores=True)


@needs_cuda_backend
def test_window_attention_kernels_reject_what_the_limits_exclude(ext):
    """The exported limits are the host checks' own: one token or one head channel more is refused, by name."""
    for n, d, what in ((ext.window_attention_max_seq + 1, 8, "window length"),
                       (16, ext.window_attention_max_head_dim + 1, "head dimension")):
        q = torch.randn(1, 1, n, d, device="cuda")
        with pytest.raises(ValueError, match=what):
            _cuda.window_attention_fwd(q, q, q, None, None, 1.0)


def test_kernels_neither_spill_nor_use_a_stack(ext):
    """Every kernel in the built extension keeps its state in registers and shared memory.

    ``cuobjdump --dump-resource-usage`` (Triton bundles one) lists per kernel the registers, the
    stack and the local memory (where spilled registers go): a kernel with local memory runs far
    below the card's bandwidth, which the compile alone does not show.
    """
    import glob
    import re
    import subprocess

    import triton

    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tools:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend bundles one)")
    report = subprocess.run([tools[0], "--dump-resource-usage", ext.__file__], capture_output=True, text=True,
                            check=True).stdout
    kernels = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    # every function parsed (a format the regex missed would hide a spill), and all of the kernels there
    assert len(kernels) == report.count("Function ") >= 7, report
    bad = [(name, stack, local) for name, _reg, stack, _shared, local in kernels if int(stack) or int(local)]
    assert not bad, f"kernels with a stack or local memory (spills): {bad}"


def _cpu_conv_args():
    x = torch.randn(1, 4, 5, 5)
    dy = torch.randn(1, 6, 5, 5)
    return x, dy, torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1)


def _cpu_attention_args():
    q, k, v = (torch.randn(2, 3, 64, 30) for _ in range(3))
    return q, k, v, torch.randn(3, 64, 64), torch.zeros(1, 64, 64)


def test_bindings_reject_cpu_tensors(ext):
    """The device check runs first, before any launch, and names the op and the argument."""
    x, dy, a, b = _cpu_conv_args()
    with pytest.raises(RuntimeError, match=r"lora_lowrank_grads: x must be a CUDA tensor, got a tensor on cpu"):
        ext.lora_lowrank_grads(x, dy, a, b, 1.0, [1, 1], [1, 1], [1, 1], 1, False)
    q, k, v, bias, mask = _cpu_attention_args()
    with pytest.raises(RuntimeError, match=r"window_attention_fwd: q must be a CUDA tensor, got a tensor on cpu"):
        ext.window_attention_fwd(q, k, v, bias, mask, 0.125)
    lse = torch.zeros(2, 3, 64)
    with pytest.raises(RuntimeError, match=r"window_attention_bwd: q must be a CUDA tensor, got a tensor on cpu"):
        ext.window_attention_bwd(q, q, k, v, q, lse, None, None, 0.125, True)


def test_python_wrappers_reject_cpu_tensors(ext):
    """adaptsr._cuda's wrappers (the Triton launchers' contract) reach the same checks."""
    x, dy, a, b = _cpu_conv_args()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _cuda.lora_linear_lowrank_grads(torch.randn(7, 4), torch.randn(7, 6), torch.randn(2, 4), torch.randn(6, 2), 1.0)
    q, k, v, bias, mask = _cpu_attention_args()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _cuda.window_attention_fwd(q, k, v, bias, mask, 0.125)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _cuda.window_attention_bwd(q, q, k, v, q, torch.zeros(2, 3, 64), bias, mask, 0.125, True)


def test_conv_wrapper_names_inconsistent_shapes():
    """Shape errors come from Python before the extension is touched (same message as the Triton launcher)."""
    x, dy, a, _ = _cpu_conv_args()
    with pytest.raises(ValueError, match=r"dy \(1, 6, 5, 5\)"):
        _cuda.lora_conv2d_lowrank_grads(x, dy, a, torch.randn(7, 2, 1, 1), 1.0, (1, 1), (1, 1), (1, 1), 1)


class _RecordingExtension:
    """Stands in for adaptsr._C: records the allow_tf32 each lora_lowrank_grads call gets, computes nothing."""

    def __init__(self):
        self.allow_tf32 = []

    def lora_lowrank_grads(self, x, dy, lora_A, lora_B, *args):
        self.allow_tf32.append(args[-1])
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B)


@pytest.mark.parametrize("conv_tf32, matmul_tf32", [(True, False), (False, True), (False, False), (True, True)])
def test_float32_precision_follows_torch_settings(monkeypatch, conv_tf32, matmul_tf32):
    """The wrappers ask for TF32 where torch would use it: a conv's pass takes cudnn.allow_tf32 (as cuDNN's
    float32 convs), a linear layer's cuda.matmul.allow_tf32 (as cuBLAS's); an explicit allow_tf32 wins."""
    fake = _RecordingExtension()
    monkeypatch.setattr(_cuda, "load", lambda: fake)
    x, dy, a, b = _cpu_conv_args()
    # (torch.backends.cuda.matmul is no plain module: monkeypatch cannot set its flag)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32
    try:
        _cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1)
        _cuda.lora_linear_lowrank_grads(torch.randn(7, 4), torch.randn(7, 6), torch.randn(2, 4), torch.randn(6, 2), 1.0)
        _cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 1.0, (1, 1), (1, 1), (1, 1), 1, allow_tf32=not conv_tf32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert fake.allow_tf32 == [conv_tf32, matmul_tf32, not conv_tf32]


def test_toolkit_discovery_skips_a_wrapper_nvcc(tmp_path, monkeypatch):
    """An nvcc outside a toolkit folder (a wrapper script) is not a CUDA_HOME; a folder with headers is."""
    wrapper = tmp_path / "wrapper"
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "bin" / "nvcc").write_text("#!/bin/sh\n")
    toolkit = tmp_path / "toolkit"
    for sub in ("bin/nvcc", "include/cuda_runtime.h"):
        (toolkit / sub).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / sub).write_text("")
    monkeypatch.setenv("CUDA_HOME", str(wrapper))
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    assert _cuda.find_cuda_home() == str(toolkit)


@pytest.mark.skipif(ON_GPU, reason="checks the message given where no GPU is visible")
def test_cuda_backend_says_why_it_is_unavailable():
    assert not is_available("cuda")
    reason = _unavailable_reason("cuda")
    assert "GPU" in reason or "CPU-only" in reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available here"):
        set_backend("cuda")


# -- on a GPU: the window-attention kernels against float64 (the lora kernels: tests/ops/) --


def _attention_ref(q, k, v, bias, mask, scale):
    """softmax(scale q k^T + bias + mask[b % nW]) v and lse, float64 autograd-able."""
    s = scale * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    if mask is not None:
        nw = mask.shape[0]
        idx = torch.arange(q.shape[0], device=q.device) % nw
        s = s + mask[idx][:, None]
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


ATT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@needs_cuda_backend
@pytest.mark.parametrize("dtype", list(ATT_TOL), ids=str)
@pytest.mark.parametrize(
    "windows, heads, n, d, num_masks, with_bias",
    [(4, 3, 64, 30, 2, True), (2, 2, 256, 64, 1, True), (3, 1, 64, 16, 0, False), (6, 6, 64, 32, 3, True)],
)
def test_window_attention_kernels_match_float64(windows, heads, n, d, num_masks, with_bias, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(windows, heads, n, d, device="cuda", generator=gen).to(dtype) for _ in range(4))
    bias = torch.randn(heads, n, n, device="cuda", generator=gen) if with_bias else None
    mask = None
    if num_masks:
        mask = torch.where(torch.rand(num_masks, n, n, device="cuda", generator=gen) < 0.3, -100.0, 0.0)
    scale = d**-0.5

    o, lse = _cuda.window_attention_fwd(q, k, v, bias, mask, scale)
    dq, dk, dv, dbias = _cuda.window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, with_bias)

    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    bias64 = bias.double().requires_grad_(True) if with_bias else None
    o_ref, lse_ref = _attention_ref(*leaves, bias64, mask.double() if mask is not None else None, scale)
    grads = torch.autograd.grad(o_ref, leaves + ([bias64] if with_bias else []), do.double())
    results = {"o": (o, o_ref), "lse": (lse, lse_ref), "dq": (dq, grads[0]), "dk": (dk, grads[1]), "dv": (dv, grads[2])}
    if with_bias:
        results["dbias"] = (dbias, grads[3])
    else:
        assert dbias is None
    assert o.dtype == dtype and lse.dtype == torch.float32
    for name, (got, ref) in results.items():
        assert got.shape == ref.shape, name
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        assert err <= ATT_TOL[dtype] * math.sqrt(n / 64), f"{name}: relative error {err:.2e} ({dtype})"


@needs_cuda_backend
def test_cuda_kernels_are_deterministic():
    """Two runs give bitwise-equal gradients: per-block partials summed in a fixed order."""
    q, k, v, do = (torch.randn(64, 6, 64, 30, device="cuda") for _ in range(4))
    bias = torch.randn(6, 64, 64, device="cuda")
    o, lse = _cuda.window_attention_fwd(q, k, v, bias, None, 0.2)
    first = _cuda.window_attention_bwd(do, q, k, v, o, lse, bias, None, 0.2, True)
    second = _cuda.window_attention_bwd(do, q, k, v, o, lse, bias, None, 0.2, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    x = torch.randn(4, 32, 40, 40, device="cuda").contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 48, 40, 40, device="cuda").contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(8, 32, 3, 3, device="cuda"), torch.randn(48, 8, 1, 1, device="cuda")
    runs = [_cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, (1, 1), (1, 1), (1, 1), 1) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@needs_cuda_backend
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float32_lowrank_grads_in_tf32_on_gpu(channels_last):
    """float32 with TF32 allowed: on sm_80 and later the z and dA kernels run on tensor cores in TF32, within
    TF32's error of float64; with it refused, IEEE float32 on CUDA cores, within float32's."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8, 64, 48, 48, device="cuda", generator=gen)
    dy = torch.randn(8, 64, 48, 48, device="cuda", generator=gen)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    a = torch.randn(8, 64, 3, 3, device="cuda", generator=gen) / 24
    b = torch.randn(64, 8, 1, 1, device="cuda", generator=gen) / 3
    geometry = ConvGeometry.from_args((3, 3), (1, 1), (1, 1), (1, 1), 1)
    ref_a, ref_b = _low_rank_grads(x.double(), dy.double(), a.double(), b.double(), 0.5, geometry)
    for allow_tf32, tol in ((True, 5e-3), (False, 2e-5)):
        grad_a, grad_b = _cuda.lora_conv2d_lowrank_grads(x, dy, a, b, 0.5, (1, 1), (1, 1), (1, 1), 1, allow_tf32)
        for name, got, ref in (("dA", grad_a, ref_a), ("dB", grad_b, ref_b)):
            err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
            assert err <= tol, f"{name}: relative error {err:.2e} with allow_tf32={allow_tf32}"


@needs_cuda_backend
def test_cuda_kernels_reject_float64_with_a_readable_error():
    q = torch.randn(1, 1, 64, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16, got Double"):
        _cuda.window_attention_fwd(q, q, q, None, None, 1.0)
    with pytest.raises(ValueError, match=r"the head dimension d = q.size\(3\) must be in \[1, 64\]"):
        big = torch.randn(1, 1, 64, 80, device="cuda")
        _cuda.window_attention_fwd(big, big, big, None, None, 1.0)
