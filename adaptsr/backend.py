"""Backend selection: which implementation the functional ops run.

Backends, in the order "auto" prefers them on a CUDA device:
    cuda       dense parts in cuDNN/cuBLAS, low-rank gradients in the CUDA C++ kernels of
               ``adaptsr._C`` (built at install time or just in time: see ``adaptsr/_cuda.py``)
    triton     dense parts in cuDNN/cuBLAS, low-rank gradients in fused Triton kernels
    torch      merged-weight forward, hand-written backward (default on CPU)
    reference  the two-path form in plain torch: the oracle

Choose with ``set_backend("torch")`` (a plain call, or ``with set_backend("torch"): ...``
for a block) or the ``ADAPTSR_BACKEND`` environment variable.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from contextlib import AbstractContextManager

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
_ENV_VAR = "ADAPTSR_BACKEND"

# A thread-local so that a ``with set_backend(...)`` block in one thread does not change
# what another thread's ops run.
_state = threading.local()


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown adaptsr backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend name in force: the last ``set_backend``, else ``$ADAPTSR_BACKEND``, else auto."""
    name = getattr(_state, "name", None)
    if name is None:
        name = _validate(os.environ.get(_ENV_VAR, "auto"))
    return name


class set_backend(AbstractContextManager):
    """Select the backend; usable as a plain call or as a context manager.

    ``set_backend("torch")`` switches for the rest of the thread;
    ``with set_backend("reference"): ...`` switches for the block and restores afterwards.
    """

    def __init__(self, name: str) -> None:
        name = _validate(name)
        self._previous = getattr(_state, "name", None)
        if name in ("triton", "cuda") and not is_available(name):
            raise RuntimeError(f"adaptsr backend {name!r} is not available here: {_unavailable_reason(name)}")
        _state.name = name

    def __exit__(self, *exc) -> None:
        _state.name = self._previous


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(name: str) -> str:
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        return "Triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)"
    if name == "cuda":
        from adaptsr import _cuda

        return _cuda.unavailable_reason()
    return ""


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run in this installation."""
    name = _validate(name)
    if name == "triton":
        has_triton = importlib.util.find_spec("triton") is not None
        return has_triton and (torch.cuda.is_available() or _triton_interpreting())
    if name == "cuda":
        # A GPU first (cheap); only then load the extension, which may build it just in time.
        from adaptsr import _cuda

        return torch.cuda.is_available() and _cuda.is_available()
    return name in ("auto", "reference", "torch")


def resolve(device: torch.device) -> str:
    """The concrete backend an op on ``device`` runs under the current setting."""
    name = get_backend()
    if name != "auto":
        return name
    # Measured on an H100 (benchmarks/results/gpu-h100-2026-11-25-kernels.md): the fused Triton
    # low-rank gradient kernel is slower than cuDNN/cuBLAS's thin ops on most SR shapes, so
    # "auto" stays on torch until the kernel wins; select "triton" explicitly to use it. The CUDA
    # C++ kernels have not been timed on a GPU yet: "cuda" is opt-in too.
    return "torch"
