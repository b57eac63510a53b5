"""Backend selection: which implementation the functional ops run.

Backends:
    cuda       dense parts in cuDNN/cuBLAS, low-rank gradients and window attention in the CUDA C++
               kernels of ``adaptsr._C`` (built at install time or just in time: see ``adaptsr/_cuda.py``)
    triton     the forward's y and z = A(x) in one Triton pass (while the ops' ``_DENSE_FORWARD_IN_TRITON``
               is set; cuDNN/cuBLAS for y otherwise), dx in cuDNN/cuBLAS, low-rank gradients and window
               attention in Triton kernels
    torch      merged-weight forward, hand-written backward (what "auto" runs on the CPU)
    reference  the two-path form in plain torch: the oracle (never chosen by "auto")

Choose with ``set_backend("torch")`` (a plain call, or ``with set_backend("torch"): ...``
for a block) or the ``ADAPTSR_BACKEND`` environment variable. "auto" follows ``AUTO_ON_CUDA``, or with
``ADAPTSR_AUTOTUNE=1`` times the backends on each call signature's first call (``adaptsr.autotune``).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from adaptsr import autotune

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


# What "auto" runs on a CUDA device, op by op (any op not listed runs "torch"). Each entry is a
# measurement: benchmarks/gpu/run.sh times every backend per op and its results file ends with the
# choice benchmarks/gpu/auto_choice.py derives from the numbers; copy it here.
#   lora_conv2d, lora_linear: the first fused Triton kernel lost to cuDNN/cuBLAS's thin ops on most
#       SR shapes (benchmarks/results/gpu-h100-2026-11-25-kernels-bf16-fp32.md); the redesigned kernels
#       (one-pass forward, split-K streaming backward) and the CUDA C++ kernels are not measured yet.
#   window_attention, shifted_window_attention: Triton and CUDA kernels not measured on a GPU yet.
#   qkv_window_attention: "triton" turns on LoRAWindowAttention's single pass (q, k, v never in
#       memory) where the module leaves the choice to auto; not measured yet.
AUTO_ON_CUDA: dict[str, str] = {
    "lora_conv2d": "torch",
    "lora_linear": "torch",
    "window_attention": "torch",
    "shifted_window_attention": "torch",
    "qkv_window_attention": "torch",
}


def resolve(device: torch.device, op: str | None = None, takes: Callable[[str], bool] | None = None,
            call: tuple[Callable, Sequence] | None = None) -> str:
    """The concrete backend that op ``op`` on ``device`` runs under the current setting.

    An explicit setting applies to every op (a backend that cannot take some input says so in its
    error). "auto" runs "torch" off CUDA, and on CUDA the measured choice for the op in
    ``AUTO_ON_CUDA`` where that backend is available here and, when the op passes ``takes``,
    ``takes(choice)`` says its kernels take this call's inputs (dtype, sizes); "torch" otherwise.
    With autotuning on (``adaptsr.autotune``), an op that passes ``call`` (``(op_fn, args)``, the call
    itself) runs the backend its trials timed fastest for the call's signature, where more than one
    can take it.
    """
    name = get_backend()
    if name != "auto":
        return name
    if op is not None and call is not None and autotune.enabled() and autotune.can_tune():
        contenders = autotune.candidates(torch.device(device), takes)
        if len(contenders) > 1:
            return autotune.choose(op, call[0], call[1], contenders)
    if torch.device(device).type != "cuda" or op is None:
        return "torch"
    choice = AUTO_ON_CUDA.get(op, "torch")
    if choice in ("reference", "torch"):
        return choice
    if not is_available(choice) or (takes is not None and not takes(choice)):
        return "torch"
    return choice
