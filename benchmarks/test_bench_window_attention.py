"""Swin window attention (SwinIR-M block shape): forward + backward per provider.

``test_bench_window_attention``: one window-attention module on partitioned windows.
``test_bench_shifted_window_attention``: the attention half of a Swin block on the un-partitioned
map (roll, partition, qkv, core, proj, reverse, roll back), spandrel's way against
``adaptsr.ops.shifted_window_attention`` (no roll / partition copies).

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
bytes and, on CUDA, the peak memory of one step and the step replayed from CUDA graphs
(graphed_ms, graphed_ratio_to_frozen: to the baseline's graphed median). ``ratio_to_frozen`` repeats ``ratio_to_eager``
for ``benchmarks/to_markdown.py``, whose baseline column it fills. In the block-level benchmark the
baseline is ``block_eager`` (spandrel's path, no adaptsr).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from spandrel.architectures.SwinIR.__arch.SwinIR import window_partition, window_reverse

from adaptsr import LoRAWindowAttention, set_backend
from adaptsr.backend import is_available
from adaptsr.bench import saved_activation_bytes, sync_device
from adaptsr.ops.shifted_window_attention import shifted_window_attention
from benchmarks.conftest import (
    load_average,
    record_graphed,
    record_memory,
    time_interleaved,
)
from benchmarks.shapes import (
    CPU_WINDOW_ATTENTION_SHAPES,
    GPU_WINDOW_ATTENTION_SHAPES,
    WINDOW_ATTENTION_CASES,
    Case,
    WindowAttentionShape,
    device_marks,
)

attention_op = importlib.import_module("adaptsr.ops.window_attention")

# Medians of the eager provider, keyed by Case.frozen_key; eager runs first per shape.
EAGER_MEDIANS: dict[tuple[str, str], float] = {}
# Graphed medians of each benchmark's baseline (eager, block_eager), keyed by (baseline, Case.frozen_key).
GRAPHED_MEDIANS: dict = {}


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


def _bench(case: Case, benchmark, module: torch.nn.Module, forward_fn: Callable[[torch.Tensor], torch.Tensor],
           twin_fn: Callable[[torch.Tensor], torch.Tensor] | None, input_shape, medians: dict, baseline: str,
           **info) -> None:
    """Time forward + backward of ``forward_fn(x)`` (x requires grad) and record the ratios to the
    ``baseline`` provider: to its median from earlier in the session (``medians``) and to
    ``twin_fn`` steps timed between the rounds (None for the baseline itself)."""
    shape = case.shape
    device, dtype = torch.device(shape.device), case.dtype
    load_before = load_average()
    x = torch.randn(input_shape, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(input_shape, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        return forward_fn(x)

    def clear_grads() -> None:
        x.grad = None
        sync_device(device)

    def step() -> None:
        forward().backward(grad_out)
        sync_device(device)

    benchmark.group = f"{shape.id}-{shape.dtype}"
    extra = benchmark.extra_info
    extra.update(
        provider=case.provider,
        shape=shape.id,
        input_shape=list(input_shape),
        rank=None,
        dtype=shape.dtype,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        **info,
    )

    if benchmark.disabled:  # smoke test (--benchmark-disable): one step and the memory probe
        benchmark.pedantic(step, setup=clear_grads, rounds=1)
        clear_grads()
        extra["saved_activation_bytes"] = saved_activation_bytes(forward, grad_out, module)
        return

    twin_step = None
    if twin_fn is not None:
        twin_x = x.detach().clone().requires_grad_(True)

        def twin_step() -> None:
            twin_x.grad = None
            twin_fn(twin_x).backward(grad_out)

    median, baseline_interleaved = time_interleaved(benchmark, step, clear_grads, twin_step, device)
    if case.provider == baseline:
        medians[case.frozen_key] = median
    base = medians.get(case.frozen_key)
    extra["ratio_to_eager"] = extra["ratio_to_frozen"] = median / base if base else None
    if twin_fn is None:
        extra["ratio_to_eager_interleaved"] = extra["ratio_to_frozen_interleaved"] = 1.0
    else:
        extra["eager_interleaved_median"] = baseline_interleaved
        extra["ratio_to_eager_interleaved"] = extra["ratio_to_frozen_interleaved"] = median / baseline_interleaved

    record_memory(extra, forward, step, clear_grads, grad_out, module, device)
    extra["loadavg"] = [load_before, load_average()]
    record_graphed(extra, forward_fn, x, grad_out, contextlib.nullcontext, GRAPHED_MEDIANS,
                   (baseline, case.frozen_key), case.provider == baseline)


def _mask(shape: WindowAttentionShape, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    mask = shape.mask()
    return None if mask is None else mask.to(device=device, dtype=dtype)


@pytest.mark.parametrize("case", WINDOW_ATTENTION_CASES)
def test_bench_window_attention(case, benchmark):
    shape = case.shape
    device, dtype = torch.device(shape.device), case.dtype
    module = _build(case, device, dtype)
    context = PROVIDER_CONTEXTS[case.provider] or contextlib.nullcontext
    mask = _mask(shape, device, dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with context():
            return module(x, mask)

    twin_fn = None
    if case.provider != "eager":
        twin = _build(Case(shape, "eager", None), device, dtype)

        def twin_fn(x: torch.Tensor) -> torch.Tensor:
            return twin(x, mask)

    torch_path = case.provider in ("sdpa", "matmul") and (case.provider == "sdpa") == attention_op._sdpa_wins(device)
    _bench(case, benchmark, module, forward, twin_fn, shape.input_shape, EAGER_MEDIANS, "eager",
           torch_backend_path=torch_path)


# -- the attention half of a Swin block on the un-partitioned map --

# provider -> (through shifted_window_attention?, backend; None: spandrel's own module, no adaptsr)
#   block_eager     roll, window_partition, spandrel's WindowAttention, window_reverse, roll back
#   block_<b>       the same path with LoRAWindowAttention (the core on adaptsr backend <b>)
#   shifted_<b>     qkv linear on the map, shifted_window_attention on backend <b>, proj: no copies
BLOCK_PROVIDERS: dict[str, tuple[bool, str | None]] = {
    "block_eager": (False, None),
    "block_torch": (False, "torch"),
    "shifted_torch": (True, "torch"),
    "block_triton": (False, "triton"),
    "shifted_triton": (True, "triton"),
}
BLOCK_MEDIANS: dict[tuple[str, str], float] = {}


def _block_cases() -> list:
    """pytest.param(Case) per window-attention shape (benchmarks/shapes.py) and block provider, block_eager first."""
    params = []
    for shape in CPU_WINDOW_ATTENTION_SHAPES + GPU_WINDOW_ATTENTION_SHAPES:
        marks = device_marks(shape)
        for provider, (_, backend) in BLOCK_PROVIDERS.items():
            if backend == "triton" and not (shape.device == "cuda" and is_available("triton")):
                continue
            case = Case(shape, provider, None)
            params.append(pytest.param(case, id=case.id, marks=marks))
    return params


class _BlockAttention(torch.nn.Module):
    """The attention half of a Swin block: normed map ``[B, H, W, C]`` -> proj output on the map."""

    def __init__(self, attention: torch.nn.Module, shape: WindowAttentionShape, mask, through_op: bool) -> None:
        super().__init__()
        self.attn = attention
        self.window, self.shift = shape.window, shape.window // 2 if shape.shifted else 0
        self.mask, self.through_op = mask, through_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        attn = self.attn
        if self.through_op:
            out = shifted_window_attention(attn.qkv(x), attn.relative_position_bias_table,
                                           attn.relative_position_index, self.mask, attn.scale, self.window,
                                           self.shift, attn.num_heads)
            return attn.proj(out)
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        windows = window_partition(x, self.window).view(-1, self.window * self.window, channels)
        out = window_reverse(attn(windows, self.mask), self.window, height, width)
        return torch.roll(out, (self.shift, self.shift), (1, 2)) if self.shift else out


def _build_block(case: Case, device: torch.device, dtype: torch.dtype, mask) -> _BlockAttention:
    through_op, backend = BLOCK_PROVIDERS[case.provider]
    torch.manual_seed(0)
    attention = case.shape.build().to(device=device, dtype=dtype).requires_grad_(False).train()
    if backend is not None and not through_op:
        attention = LoRAWindowAttention.from_module(attention)
    return _BlockAttention(attention, case.shape, mask, through_op)


@pytest.mark.parametrize("case", _block_cases())
def test_bench_shifted_window_attention(case, benchmark):
    shape = case.shape
    device, dtype = torch.device(shape.device), case.dtype
    mask = _mask(shape, device, dtype)
    module = _build_block(case, device, dtype, mask)
    backend = BLOCK_PROVIDERS[case.provider][1]
    context = (lambda: set_backend(backend)) if backend is not None else contextlib.nullcontext

    def forward(x: torch.Tensor) -> torch.Tensor:
        with context():
            return module(x)

    twin_fn = None
    if case.provider != "block_eager":
        twin_fn = _build_block(Case(shape, "block_eager", None), device, dtype, mask)

    side = shape.tokens
    _bench(case, benchmark, module, forward, twin_fn, (shape.batch, side, side, shape.dim), BLOCK_MEDIANS,
           "block_eager", window_shift=module.shift)
