r"""The CUDA C++ extension ``adaptsr._C``: finding it (or building it), and its Python-side contract.

Where the extension comes from, in order:
    1. ``import adaptsr._C``: built at install time (``pip install --no-build-isolation .`` with a
       CUDA toolkit; see the knobs at the top of ``setup.py``);
    2. a just-in-time build of the sources with ``torch.utils.cpp_extension.load`` (ninja), cached in
       ``$ADAPTSR_BUILD_DIR`` (default ``~/.cache/adaptsr``) under a folder named after the torch,
       CUDA and Python versions and the target architectures, so a rerun only imports it. The
       sources are the installed package's copy ``adaptsr/_csrc/`` (every wheel carries one), else
       the checkout's ``csrc/`` (a source checkout or an editable install).
The JIT build finds the toolkit itself: ``$CUDA_HOME`` / ``$CUDA_PATH``, the folder above ``nvcc`` on
``PATH``, or ``/usr/local/cuda*``, keeping the first that holds both ``bin/nvcc`` and
``include/cuda_runtime.h`` (an ``nvcc`` on ``PATH`` may be a wrapper script outside the toolkit).
The sources include only light torch headers (no ``ATen/cuda/CUDAContext.h``), so a toolkit without
the CUDA libraries' headers (``cusparse.h``, ...) is enough. Without a GPU, torch cannot guess the
architecture: set ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``).

The ops, with the contracts of the Triton launchers in ``adaptsr/kernels/`` (no autograd)::

    lora_conv2d_lowrank_grads(x, dy, lora_A, lora_B, scaling, stride, padding, dilation, groups, allow_tf32=None)
        -> (dA, dB)
    lora_linear_lowrank_grads(x2, dy2, lora_A, lora_B, scaling, allow_tf32=None) -> (dA, dB)
    window_attention_fwd(q, k, v, bias, mask, scale) -> (o, lse)
    window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale, need_dbias) -> (dq, dk, dv, dbias or None)

The math of each is written above its kernel in ``csrc/``. The kernels take float32, float16 and
bfloat16 and accumulate in float32; every reduction runs in a fixed order (deterministic). On sm_80
and later the low-rank pass multiplies float32 in TF32 on tensor cores where torch would
(``allow_tf32`` None: ``torch.backends.cudnn.allow_tf32`` for convolutions,
``torch.backends.cuda.matmul.allow_tf32`` for linear layers), as the Triton kernels do.

This module imports only the standard library at the top: ``setup.py`` loads it by path to share
the toolkit discovery, before the package (or even torch) is importable.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

__all__ = [
    "is_available",
    "load",
    "lora_conv2d_lowrank_grads",
    "lora_linear_lowrank_grads",
    "unavailable_reason",
    "window_attention_bwd",
    "window_attention_fwd",
    "window_attention_takes",
]

_LOG = logging.getLogger(__name__)
# Where the CUDA sources are: the copy setup.py's build_py puts into every built package, else the
# checkout's csrc/ (the one source of truth, which an editable install reads in place).
_PACKAGE_CSRC = Path(__file__).resolve().parent / "_csrc"
_CHECKOUT_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CSRC = next((d for d in (_PACKAGE_CSRC, _CHECKOUT_CSRC) if (d / "bindings.cpp").is_file()), _PACKAGE_CSRC)
# The JIT module's name (the ahead-of-time build is ``adaptsr._C``; the binding code serves both).
_JIT_NAME = "adaptsr_C"


# -- toolkit discovery (shared with setup.py) --


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def find_cuda_home(torch_cuda_version: str | None = None) -> str | None:
    """The CUDA toolkit folder holding ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    ``torch_cuda_version`` (e.g. ``"13.0"``) puts ``/usr/local/cuda-<version>`` ahead of the other
    versioned folders.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    if torch_cuda_version:
        candidates.append(f"/usr/local/cuda-{torch_cuda_version}")
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def sources(csrc: Path = _CSRC) -> list[str]:
    """The extension's translation units: the binding file, then every op's .cu files."""
    return [str(csrc / "bindings.cpp")] + sorted(str(p) for p in csrc.rglob("*.cu"))


def nvcc_flags() -> list[str]:
    """Flags for nvcc shared by the ahead-of-time and the JIT build."""
    flags = ["-O3", "-lineinfo"]
    threads = os.environ.get("NVCC_THREADS")
    if threads:
        flags.append(f"--threads={int(threads)}")
    return flags


# -- loading --

_lock = threading.Lock()
_module = None
_load_error: str | None = None


def build_directory() -> Path:
    """Where the JIT build keeps its objects: one folder per torch / CUDA / Python / architecture set."""
    import torch

    root = Path(os.environ.get("ADAPTSR_BUILD_DIR") or Path.home() / ".cache" / "adaptsr")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "native"
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}-sm{archs}"
    return root / "torch_extensions" / re.sub(r"[^A-Za-z0-9.+_-]", "_", tag)


def _jit_build(verbose: bool):
    import torch

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    cuda_home = find_cuda_home(torch.version.cuda)
    if cuda_home is None:
        raise RuntimeError(
            "no CUDA toolkit found (nvcc with include/cuda_runtime.h) in $CUDA_HOME, next to nvcc on PATH or in "
            "/usr/local/cuda*: install one matching torch's CUDA " + str(torch.version.cuda) + " and set CUDA_HOME"
        )
    srcs = sources()
    missing = [s for s in srcs if not os.path.isfile(s)]
    if missing or not srcs[1:]:
        raise RuntimeError(
            f"the CUDA sources are not part of this installation (looked in {_PACKAGE_CSRC} and {_CHECKOUT_CSRC}): "
            "reinstall adaptsr with pip (its wheels carry them as adaptsr/_csrc/) or from a source checkout, or "
            "build the extension at install time (pip install --no-build-isolation .)"
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        raise RuntimeError("no GPU to build the CUDA extension for: set TORCH_CUDA_ARCH_LIST (e.g. 9.0)")

    from torch.utils import cpp_extension

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{_JIT_NAME}.so").exists():  # a first build: say why the next minutes are quiet
        _LOG.warning("adaptsr: building the CUDA extension adaptsr._C in %s (a few minutes, once)", build_dir)
    # torch.utils.cpp_extension reads CUDA_HOME once, at import, from the environment or from the
    # nvcc on PATH (which may be a wrapper script outside the toolkit): point it at the toolkit
    # found above for this build only.
    previous_home = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = cuda_home
    try:
        return cpp_extension.load(
            name=_JIT_NAME,
            sources=srcs,
            extra_cflags=["-O3"],
            extra_cuda_cflags=nvcc_flags(),
            extra_include_paths=[str(_CSRC)],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        cpp_extension.CUDA_HOME = previous_home


def load(verbose: bool = False):
    """The extension module: ``adaptsr._C`` if it was built at install time, else a cached JIT build.

    Raises RuntimeError saying why when neither works; the failure is remembered for the process.
    """
    global _module, _load_error
    with _lock:
        if _module is not None:
            return _module
        if _load_error is not None:
            raise RuntimeError(_load_error)
        try:
            from adaptsr import _C  # type: ignore[attr-defined]

            _module = _C
            return _module
        except ImportError as exc:
            # Not built at install time, or built against another torch: build it here instead.
            _LOG.debug("adaptsr._C not importable (%s); trying a JIT build", exc)
        try:
            _module = _jit_build(verbose)
        except Exception as exc:  # compiler errors come as several exception types
            _load_error = f"the CUDA extension adaptsr._C could not be built: {type(exc).__name__}: {exc}"
            raise RuntimeError(_load_error) from exc
        return _module


def unavailable_reason() -> str:
    """Why the CUDA kernels cannot run here ("" when they can). Builds the extension when needed."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return ""


def is_available() -> bool:
    """Whether the CUDA kernels can run here: a visible GPU and an extension that loads."""
    return unavailable_reason() == ""


# -- the ops --


def lora_conv2d_lowrank_grads(
    x, dy, lora_A, lora_B, scaling: float, stride, padding, dilation, groups: int, allow_tf32: bool | None = None
):
    """dA, dB of a LoRA conv from x (already padded where the mode needs it) and dy; no autograd.

    ``padding`` is the symmetric zero padding the kernel applies itself. ``allow_tf32``: float32 products
    in TF32 (None: as torch's convolutions, ``torch.backends.cudnn.allow_tf32``). Same contract as
    ``adaptsr.kernels.lora_conv2d.lora_conv2d_lowrank_grads``.
    """
    from adaptsr.ops._conv_geometry import check_lowrank_grad_inputs
    from adaptsr.ops._tf32 import conv_allows_tf32

    check_lowrank_grad_inputs("cuda", x, dy, lora_A, lora_B, groups)
    c_out, rank = dy.shape[1], lora_A.shape[0]
    # Any strides: the kernels read each tensor through its own (coalesced over pixels for NCHW,
    # over channels, 16 bytes at a time where aligned, for channels-last).
    return load().lora_lowrank_grads(
        x, dy, lora_A, lora_B.reshape(c_out, rank, 1, 1), float(scaling),
        [int(s) for s in stride], [int(p) for p in padding], [int(d) for d in dilation], int(groups),
        conv_allows_tf32(allow_tf32),
    )


def lora_linear_lowrank_grads(x2, dy2, lora_A, lora_B, scaling: float, allow_tf32: bool | None = None):
    """dA ``[r, in]`` and dB ``[out, r]`` from 2-D x ``[M, in]`` and dy ``[M, out]``: the 1x1 conv case.

    ``allow_tf32`` None: as torch's matmuls, ``torch.backends.cuda.matmul.allow_tf32``.
    """
    from adaptsr.ops._tf32 import matmul_allows_tf32

    grad_a, grad_b = lora_conv2d_lowrank_grads(
        x2.contiguous()[:, :, None, None], dy2.contiguous()[:, :, None, None],
        lora_A[:, :, None, None], lora_B[:, :, None, None], scaling, (1, 1), (0, 0), (1, 1), 1,
        matmul_allows_tf32(allow_tf32),
    )
    return grad_a.reshape(lora_A.shape), grad_b.reshape(lora_B.shape)


def _f32(t):
    return None if t is None else t.float().contiguous()


def window_attention_fwd(q, k, v, bias, mask, scale: float):
    """``(o, lse)``: o = softmax(scale q k^T + bias[h] + mask[b % nW]) v over windows, q ``[B_, heads, N, d]``,
    k and v ``[B_, heads, N_k, d]``.

    bias ``[heads, N, N_k]`` and mask ``[nW, N, N_k]`` are optional (float32); lse ``[B_, heads, N]`` float32.
    """
    return tuple(load().window_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), _f32(bias), _f32(mask),
                                             float(scale)))


def window_attention_bwd(do, q, k, v, o, lse, bias, mask, scale: float, need_dbias: bool):
    """``(dq, dk, dv, dbias)`` of window attention; dbias ``[heads, N, N_k]`` float32 summed over windows, or None."""
    return tuple(load().window_attention_bwd(
        do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), lse.float().contiguous(),
        _f32(bias), _f32(mask), float(scale), bool(need_dbias),
    ))


def window_attention_takes(
    dtype, n: int, head_dim: int, n_keys: int | None = None, need_dbias: bool = True, tensor_cores: bool | None = None
) -> bool:
    """Whether the window-attention kernels take q of ``dtype`` in windows of ``n`` queries and ``n_keys`` keys
    (default ``n``), with heads of ``head_dim`` (the extension's limits: csrc/window_attention/window_attention_limits.h).

    Up to ``window_attention_max_seq`` keys on every path; more (HAT's overlapping cross-attention: 576) only on
    the tensor-core kernels, which stream the keys, and only without the bias table's gradient (``need_dbias``
    False): the CUDA-core kernels and the dbias sum keep whole rows of scores in shared memory.
    ``tensor_cores``: whether fp16 / bf16 run on tensor cores (sm_80 and later); None asks the current GPU.
    """
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    ext = load()
    max_seq = ext.window_attention_max_seq
    if not (1 <= n <= max_seq and 1 <= head_dim <= ext.window_attention_max_head_dim):
        return False
    n_keys = n if n_keys is None else n_keys
    if n_keys <= max_seq:
        return n_keys >= 1
    if tensor_cores is None:
        tensor_cores = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    return dtype != torch.float32 and tensor_cores and not need_dbias
