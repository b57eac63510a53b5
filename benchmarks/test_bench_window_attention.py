"""One Swin window-attention module (SwinIR-M block shape): forward + backward per provider.

``eager`` is spandrel's SwinIR ``WindowAttention``; every other provider is the same module as
``LoRAWindowAttention`` with the attention core on an adaptsr backend (shapes and providers:
``benchmarks/shapes.py``). The module's weights are frozen and its input requires grad, as in
LoRA training with the adapters elsewhere: the step is the frozen module's own forward + backward
(qkv, attention core, proj), so the providers differ only in the attention core.

Recorded in ``extra_info`` besides what ``benchmarks/conftest.py`` records: ``ratio_to_eager``
(this median / the eager median of the same shape, when the eager case ran first in the session),
``ratio_to_eager_interleaved`` (this median / the median of eager steps timed between this
provider's rounds: robust to load that drifts, as on a shared 2-core machine), ``torch_backend_path``
(whether ``set_backend("torch")`` runs this provider's path on this device), the saved activation
bytes and, on CUDA, the peak memory of one step. ``ratio_to_frozen`` repeats ``ratio_to_eager``
for ``benchmarks/to_markdown.py``, whose baseline column it fills.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from unittest import mock

import pytest
import torch

from adaptsr import LoRAWindowAttention, set_backend
from benchmarks.conftest import load_average, record_memory, saved_activation_bytes, sync_device, time_interleaved
from benchmarks.shapes import WINDOW_ATTENTION_CASES, Case

attention_op = importlib.import_module("adaptsr.ops.window_attention")

# Medians of the eager provider, keyed by Case.frozen_key; eager runs first per shape.
EAGER_MEDIANS: dict[tuple[str, str], float] = {}


@contextlib.contextmanager
def _torch_path(sdpa: bool):
    """The torch backend with its path forced: scaled_dot_product_attention or the matmul Function."""
    with set_backend("torch"), mock.patch.object(attention_op, "_sdpa_wins", lambda device: sdpa):
        yield


# provider -> the context its steps run in (None: spandrel's own module, no adaptsr involved)
PROVIDER_CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager] | None] = {
    "eager": None,
    "sdpa": lambda: _torch_path(sdpa=True),
    "matmul": lambda: _torch_path(sdpa=False),
    "triton": lambda: set_backend("triton"),
    # the qkv projection inside the attention kernel (LoRAWindowAttention.single_pass)
    "triton_single_pass": lambda: set_backend("triton"),
    "cuda": lambda: set_backend("cuda"),
}




def _build(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    module = case.shape.build().to(device=device, dtype=dtype).requires_grad_(False).train()
    if PROVIDER_CONTEXTS[case.provider] is not None:
        module = LoRAWindowAttention.from_module(module)
        module.single_pass = case.provider == "triton_single_pass"
    return module


@pytest.mark.parametrize("case", WINDOW_ATTENTION_CASES)
def test_bench_window_attention(case, benchmark):
    shape = case.shape
    device, dtype = torch.device(shape.device), case.dtype
    load_before = load_average()
    module = _build(case, device, dtype)
    context = PROVIDER_CONTEXTS[case.provider] or contextlib.nullcontext
    mask = shape.mask()
    mask = None if mask is None else mask.to(device=device, dtype=dtype)
    x = torch.randn(shape.input_shape, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape.input_shape, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        with context():
            return module(x, mask)

    def clear_grads() -> None:
        x.grad = None
        sync_device(device)

    def step() -> None:
        forward().backward(grad_out)
        sync_device(device)

    benchmark.group = f"{shape.id}-{shape.dtype}"
    info = benchmark.extra_info
    info.update(
        provider=case.provider,
        shape=shape.id,
        input_shape=list(shape.input_shape),
        rank=None,
        dtype=shape.dtype,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        torch_backend_path=case.provider in ("sdpa", "matmul")
        and (case.provider == "sdpa") == attention_op._sdpa_wins(device),
    )

    if benchmark.disabled:  # smoke test (--benchmark-disable): one step and the memory probe
        benchmark.pedantic(step, setup=clear_grads, rounds=1)
        clear_grads()
        info["saved_activation_bytes"] = saved_activation_bytes(forward, grad_out, module)
        return

    twin_step = None
    if case.provider != "eager":
        twin = _build(Case(shape, "eager", None), device, dtype)
        twin_x = x.detach().clone().requires_grad_(True)

        def twin_step() -> None:
            twin_x.grad = None
            twin(twin_x, mask).backward(grad_out)

    median, eager_interleaved = time_interleaved(benchmark, step, clear_grads, twin_step, device)
    if case.provider == "eager":
        EAGER_MEDIANS[case.frozen_key] = median
    eager = EAGER_MEDIANS.get(case.frozen_key)
    info["ratio_to_eager"] = info["ratio_to_frozen"] = median / eager if eager else None
    if case.provider == "eager":
        info["ratio_to_eager_interleaved"] = info["ratio_to_frozen_interleaved"] = 1.0
    else:
        info["eager_interleaved_median"] = eager_interleaved
        info["ratio_to_eager_interleaved"] = info["ratio_to_frozen_interleaved"] = median / eager_interleaved

    record_memory(info, forward, step, clear_grads, grad_out, module, device)
    info["loadavg"] = [load_before, load_average()]
