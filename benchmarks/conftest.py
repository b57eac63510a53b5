"""What every benchmark shares: building a provider's model, timing forward+backward, memory.

A benchmark test builds its base model and input with ``shapes.py`` and calls the
``run_fwd_bwd`` fixture::

    def test_bench_x(case, run_fwd_bwd):
        run_fwd_bwd(case, build=lambda: MyModel(case.shape), targets=r"layers\\.\\d+")

``run_fwd_bwd`` builds the provider's model once, then times ``y = model(x); y.backward(dy)``
(one training step without the optimizer) with ``benchmark.pedantic``. Gradients are set to None
between rounds, outside the clock. The input always requires grad, for every provider, so each
provider does at least the frozen model's work (input gradients through every layer) and the
ratios compare like with like.

Recorded in ``benchmark.extra_info``: provider, shape, rank, dtype, device, trainable_params,
ratio_to_frozen (this median / the frozen median of the same shape and dtype, when the frozen
case ran earlier in the session), fwd_ms and bwd_ms (medians of the forward alone and of the
backward alone, timed by us after the benchmark's rounds), ratio_to_frozen_interleaved (this median / the median of frozen
steps timed between this provider's rounds, on a second model built for the purpose: robust to
load that drifts during the session, as on a shared 2-core machine), loadavg (the 1-minute load
average before and after the case), saved_activation_bytes (the unique storages autograd saves for
backward in one step, parameters and buffers excluded: the activation memory a training step
holds) and, on CUDA, peak_memory_bytes (torch.cuda.max_memory_allocated over one step) and
graphed_ms / graphed_ratio_to_frozen (the step replayed from CUDA graphs: the kernels' cost without
the host's launch overhead; graphed_error where a provider cannot be captured).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from adaptsr import inject_lora, set_backend
from adaptsr.backend import _unavailable_reason, is_available
from adaptsr.bench import saved_activation_bytes, sync_device
from adaptsr.inject import _WRAPPERS
from benchmarks.shapes import FUSED_PROVIDERS, Case, device_marks

# -- timing policy --

# On CPU a step of the 16-layer conv stack takes ~0.1-0.2 s on 2 cores: aim for ~2 s of timed
# rounds per case, never fewer than 9 rounds (an odd count, so the median is one measured round).
CPU_TARGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 2.0, 9, 41
GPU_TARGET_S, GPU_MIN_ROUNDS, GPU_MAX_ROUNDS = 1.0, 21, 201

# Medians of the frozen provider, keyed by Case.frozen_key; the frozen case runs first per shape.
FROZEN_MEDIANS: dict[tuple[str, str], float] = {}
# The same for steps replayed from CUDA graphs (time_graphed).
FROZEN_GRAPHED_MEDIANS: dict[tuple[str, str], float] = {}


def _targets_list(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """The names of the layers LoRA wraps that ``targets`` selects (a regex matched in full, or names)."""
    kinds = tuple(_WRAPPERS)
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [n for n, m in model.named_modules() if type(m) in kinds and pattern.fullmatch(n)]
    wanted = list(targets)
    return [n for n, m in model.named_modules() if type(m) in kinds and any(n == t or n.endswith("." + t) for t in wanted)]


def _peft_lora_names(model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names.add(name.removeprefix("base_model.model."))
    return names


def build_provider(
    case: Case, base: nn.Module, *, targets: str | Sequence[str] | None = None, preset: str | None = None
) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The provider's model (from a freshly built base) and the context its steps run in."""
    provider = case.provider
    if provider == "frozen":
        base.requires_grad_(False)
        return base, contextlib.nullcontext
    if provider == "full_ft":
        base.requires_grad_(True)
        return base, contextlib.nullcontext

    # The layers adaptsr wraps: the explicit targets, else the preset's; PEFT gets exactly these names.
    if preset is not None:
        from adaptsr.presets import preset_pattern

        names = _targets_list(base, preset_pattern(preset) if targets is None else targets)
    else:
        names = _targets_list(base, targets)
    if not names:
        raise ValueError(f"benchmark targets {targets or preset!r} select no layer LoRA wraps")

    if provider == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=case.rank, lora_alpha=case.rank, lora_dropout=0.0, target_modules=names, init_lora_weights=False
        )
        model = get_peft_model(base, config)
        wrapped = _peft_lora_names(model)
        if wrapped != set(names):
            raise RuntimeError(f"PEFT wrapped {sorted(wrapped ^ set(names))[:4]} differently from the targets")
        return model, contextlib.nullcontext

    # adaptsr backends: reference, torch, and the fused triton / cuda (the CUDA C++ extension,
    # built ahead of time or just in time on first use), skipped where they cannot run
    if provider in FUSED_PROVIDERS and not is_available(provider):
        pytest.skip(f"{provider} backend unavailable: {_unavailable_reason(provider)}")
    if preset is not None and targets is None:
        summary = inject_lora(base, preset=preset, rank=case.rank, init_lora_weights=False)
    else:
        summary = inject_lora(base, targets=names, rank=case.rank, init_lora_weights=False)
    if set(summary.layers) != set(names):
        raise RuntimeError(f"inject_lora wrapped {sorted(set(summary.layers) ^ set(names))[:4]} differently from the targets")
    return base, lambda: set_backend(provider)


def record_memory(info: dict, forward, step, clear_grads, grad_out, model, device: torch.device) -> None:
    """Into ``info``: the activation bytes autograd saves for one step and, on CUDA, the peak
    memory of one step; gradients cleared before and after."""
    clear_grads()
    info["saved_activation_bytes"] = saved_activation_bytes(forward, grad_out, model)
    if device.type == "cuda":
        clear_grads()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    clear_grads()


def time_phases(forward, grad_out, clear_grads, device: torch.device, rounds: int) -> tuple[float, float]:
    """Medians (ms) of the forward alone and of the backward alone over ``rounds`` steps.

    pytest-benchmark's clock covers the whole step; the split shows where a provider's extra time
    goes (a forward that does more, or a backward that does more).
    """
    fwd, bwd = [], []
    for _ in range(rounds):
        clear_grads()
        start = time.perf_counter()
        y = forward()
        sync_device(device)
        middle = time.perf_counter()
        y.backward(grad_out)
        sync_device(device)
        fwd.append(middle - start)
        bwd.append(time.perf_counter() - middle)
    clear_grads()
    return 1e3 * statistics.median(fwd), 1e3 * statistics.median(bwd)


def time_graphed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_out: torch.Tensor,
                 context, rounds: int) -> float:
    """Median ms of one forward + backward of ``fn(x)`` replayed from CUDA graphs.

    Eager steps of small layers are bound by kernel launches from the host (measured on an H100:
    the host side of a LoRA layer took longer than its GPU work); replayed graphs show what the
    kernels themselves cost. ``fn`` is a module or a function whose only tensor requiring grad is
    ``x`` (``torch.cuda.make_graphed_callables``); a module's forward is replaced for good: call it last.
    """
    with context():  # the backend's kernels are what gets captured (the warm-up runs autotuning)
        graphed = torch.cuda.make_graphed_callables(fn, (x,))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds + 1):
        x.grad = None
        start.record()
        graphed(x).backward(grad_out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def record_graphed(info: dict, fn, x, grad_out, context, medians: dict, key, is_baseline: bool) -> None:
    """Into ``info`` on CUDA: graphed_ms and graphed_ratio_to_frozen (to the baseline's graphed
    median in ``medians``), or graphed_error where the step cannot be captured."""
    if not x.is_cuda:
        return
    x.grad = None
    try:
        graphed = time_graphed(fn, x, grad_out, context, GPU_MIN_ROUNDS)
    except Exception as exc:  # noqa: BLE001 (a provider that cannot be captured keeps its eager numbers)
        info["graphed_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return
    info["graphed_ms"] = graphed
    if is_baseline:
        medians[key] = graphed
    info["graphed_ratio_to_frozen"] = graphed / medians[key] if key in medians else None


def time_interleaved(benchmark, step, clear_grads, baseline_step, device: torch.device) -> tuple[float, float | None]:
    """Time ``step`` with pytest-benchmark; return its median and, when ``baseline_step`` is given,
    the median of baseline steps timed (by us) in the untimed setup before each round.

    Two untimed steps first (allocator and kernel warm-up, then a calibration that sets the round
    count). The interleaved baseline sees the same load as the timed rounds: on a shared machine
    whose load drifts, the ratio to it is steadier than the ratio to a baseline timed earlier.
    """
    clear_grads()
    step()
    clear_grads()
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    if device.type == "cuda":
        target, lo, hi = GPU_TARGET_S, GPU_MIN_ROUNDS, GPU_MAX_ROUNDS
    else:
        target, lo, hi = CPU_TARGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS
    rounds = max(lo, min(hi, math.ceil(target / max(once, 1e-6))))
    rounds += 1 - rounds % 2  # odd

    baseline_times: list[float] = []
    setup = clear_grads
    if baseline_step is not None:

        def setup() -> None:
            sync_device(device)
            start = time.perf_counter()
            baseline_step()
            sync_device(device)
            baseline_times.append(time.perf_counter() - start)
            clear_grads()

    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1)
    median = benchmark.stats.stats.median
    # the first baseline step belongs to the warm-up round
    return median, (statistics.median(baseline_times[1:]) if baseline_step is not None else None)


@pytest.fixture
def run_fwd_bwd(benchmark):
    """Call as ``run_fwd_bwd(case, build=..., targets=... | preset=...)``; returns the benchmark's extra_info."""

    def run(
        case: Case,
        *,
        build: Callable[[], nn.Module],
        targets: str | Sequence[str] | None = None,
        preset: str | None = None,
    ) -> dict:
        shape = case.shape
        device = torch.device(shape.device)
        dtype = case.dtype
        load_before = load_average()
        torch.manual_seed(0)
        memory_format = torch.channels_last if getattr(shape, "channels_last", False) else torch.contiguous_format
        base = build().to(device=device, dtype=dtype, memory_format=memory_format)
        model, backend_ctx = build_provider(case, base, targets=targets, preset=preset)
        model.train()
        x = torch.randn(shape.input_shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        with torch.no_grad(), backend_ctx():
            grad_out = torch.randn_like(model(x))
        trainable = [p for p in model.parameters() if p.requires_grad]

        def forward() -> torch.Tensor:
            with backend_ctx():
                return model(x)

        def clear_grads() -> None:
            x.grad = None
            for p in trainable:
                p.grad = None
            sync_device(device)

        def step() -> None:
            with backend_ctx():
                y = model(x)
                y.backward(grad_out)
            sync_device(device)

        benchmark.group = f"{shape.id}-{shape.dtype}"
        info = benchmark.extra_info
        info.update(
            provider=case.provider,
            shape=shape.id,
            input_shape=list(shape.input_shape),
            rank=case.rank,
            dtype=shape.dtype,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            threads=torch.get_num_threads(),
            trainable_params=sum(p.numel() for p in trainable),
            total_params=sum(p.numel() for p in model.parameters()),
            torch=torch.__version__,
        )

        if benchmark.disabled:  # smoke test (--benchmark-disable): one step and the memory probe
            benchmark.pedantic(step, setup=clear_grads, rounds=1)
            clear_grads()
            info["saved_activation_bytes"] = saved_activation_bytes(forward, grad_out, model)
            return info

        twin_step = None
        if case.provider != "frozen":
            torch.manual_seed(0)
            twin = build().to(device=device, dtype=dtype, memory_format=memory_format).requires_grad_(False).train()
            twin_x = x.detach().clone().requires_grad_(True)

            def twin_step() -> None:
                twin_x.grad = None
                twin(twin_x).backward(grad_out)

        median, frozen_interleaved = time_interleaved(benchmark, step, clear_grads, twin_step, device)
        if case.provider == "frozen":
            FROZEN_MEDIANS[case.frozen_key] = median
        frozen = FROZEN_MEDIANS.get(case.frozen_key)
        info["ratio_to_frozen"] = median / frozen if frozen else None
        if case.provider == "frozen":
            info["ratio_to_frozen_interleaved"] = 1.0
        else:
            info["frozen_interleaved_median"] = frozen_interleaved
            info["ratio_to_frozen_interleaved"] = median / frozen_interleaved

        phase_rounds = GPU_MIN_ROUNDS if device.type == "cuda" else 5
        info["fwd_ms"], info["bwd_ms"] = time_phases(forward, grad_out, clear_grads, device, phase_rounds)
        record_memory(info, forward, step, clear_grads, grad_out, model, device)
        info["loadavg"] = [load_before, load_average()]
        clear_grads()
        record_graphed(info, model, x, grad_out, backend_ctx, FROZEN_GRAPHED_MEDIANS, case.frozen_key,
                       case.provider == "frozen")
        return info

    return run


def switched_module_cases(shapes, case_id: Callable, fused: Sequence[str] = ("triton", "cuda")) -> list:
    """``pytest.param(shape, provider)`` for the module-switch benchmarks: per shape "eager" first (the
    others' ratios divide by it), "torch", and on CUDA shapes the ``fused`` backends available here.
    ``case_id(shape)`` names the case; it must hold the dtype (benchmarks/gpu/run.sh selects with -k "bf16 ...")."""
    params = []
    for shape in shapes:
        marks = device_marks(shape)
        providers = ["eager", "torch"]
        if shape.device == "cuda":
            providers += [p for p in fused if is_available(p)]
        params += [pytest.param(shape, p, id=f"{case_id(shape)}-{p}", marks=marks) for p in providers]
    return params


def bench_switched_module(benchmark, *, provider: str, shape_id: str, dtype_name: str, build, call, inputs: list,
                          grad_out: torch.Tensor, eager_medians: dict) -> None:
    """Forward + backward of a spandrel attention module whose forward adaptsr switches (``provider``
    "eager": spandrel's own; otherwise the switched forward on that backend), into ``benchmark``.

    ``build(fused) -> module``: a fresh module, switched when ``fused``; ``call(module, *inputs)``: its
    output, with ``inputs`` the tensors requiring grad. ``extra_info``: ``ratio_to_eager`` (to the
    eager median in ``eager_medians``, eager running first per shape), ``ratio_to_eager_interleaved`` (to
    eager steps timed between this provider's rounds; both also as ``ratio_to_frozen*`` for
    ``benchmarks/to_markdown.py``), the saved activation bytes and, on CUDA, the peak memory of a step.
    """
    device = inputs[0].device
    load_before = load_average()
    module = build(provider != "eager")
    context = contextlib.nullcontext if provider == "eager" else lambda: set_backend(provider)

    def forward() -> torch.Tensor:
        with context():
            return call(module, *inputs)

    def clear_grads() -> None:
        for t in inputs:
            t.grad = None
        sync_device(device)

    def step() -> None:
        forward().backward(grad_out)
        sync_device(device)

    benchmark.group = f"{shape_id}-{dtype_name}"
    extra = benchmark.extra_info
    extra.update(provider=provider, shape=shape_id, input_shape=list(inputs[0].shape), rank=None, dtype=dtype_name,
                 device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 threads=torch.get_num_threads(), torch=torch.__version__)
    if benchmark.disabled:  # smoke test (--benchmark-disable): one step and the memory probe
        benchmark.pedantic(step, setup=clear_grads, rounds=1)
        record_memory(extra, forward, step, clear_grads, grad_out, module, device)
        return

    twin_step = None
    if provider != "eager":
        twin = build(False)
        twin_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]

        def twin_step() -> None:
            call(twin, *twin_inputs).backward(grad_out)
            for t in twin_inputs:
                t.grad = None

    median, eager_interleaved = time_interleaved(benchmark, step, clear_grads, twin_step, device)
    if provider == "eager":
        eager_medians[shape_id] = median
    base = eager_medians.get(shape_id)
    extra["ratio_to_eager"] = extra["ratio_to_frozen"] = median / base if base else None
    interleaved = median / eager_interleaved if eager_interleaved else 1.0
    extra["ratio_to_eager_interleaved"] = extra["ratio_to_frozen_interleaved"] = interleaved
    record_memory(extra, forward, step, clear_grads, grad_out, module, device)
    extra["loadavg"] = [load_before, load_average()]


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None

