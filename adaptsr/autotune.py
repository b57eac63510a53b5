"""Measured backend choice at run time: "auto" that times the backends on this machine's own calls.

The "auto" backend's default choice per op is a table (``adaptsr.backend.AUTO_ON_CUDA``), measured on one
GPU model at SR-training shapes. Which backend wins depends on the GPU, the shapes and the dtype, so with
autotuning on (``ADAPTSR_AUTOTUNE=1``, or ``adaptsr.autotune.enable()``) "auto" instead times every backend
that can take an op's call, the first time a call of that signature comes (the shapes, strides, dtypes and
options of its inputs, whether it needs gradients, and the autocast dtype), and runs the fastest from then
on. Triton's ``autotune`` does the same for kernel configurations; here the candidates are whole backends.

A trial runs the op on detached copies of the call's inputs, under the call's own autocast: the forward and,
where the call needs gradients, the backward with a constant output gradient (a constant, so the trials
draw nothing from the random number generator and a run's dropout or crops stay as they were). One warm-up
call each (compilation, autotuning of the kernels themselves, allocator growth), then ``REPEATS`` timed
calls, the median kept. The trials touch none of the caller's tensors or gradients.

Each choice is recorded with its times: ``measurements()`` lists them, and ``adaptsr adapt`` writes them
into ``metrics.json`` (``"autotune"``). Choices are also kept on disk per machine (``adaptsr.autotune_cache``:
``~/.cache/adaptsr/autotune.json``, or ``ADAPTSR_AUTOTUNE_CACHE``; ``off`` for none), so a later run of the
same calls on the same hardware and versions takes them without timing again. Backends that fail a trial
(an input their kernels refuse) are recorded with the error and not chosen. While torch.compile traces or
a CUDA graph is captured, "auto" keeps the table's choice, since a trial could not run there.

Different backends round differently (each matches the float64 reference within the tolerances of
tests/conftest.py), so two runs whose trials pick differently agree to float rounding, not bit for bit; leave
autotuning off, or set a backend, for bitwise-repeatable runs.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

from adaptsr import autotune_cache

__all__ = ["disable", "enable", "enabled", "measurements", "reset", "summary"]

_ENV_VAR = "ADAPTSR_AUTOTUNE"
REPEATS = 5  # timed calls per backend after one warm-up: a median of five
_TIMED_BACKENDS = ("torch", "triton", "cuda")  # "reference" is the oracle, not a contender

_lock = threading.Lock()
_switch: bool | None = None  # enable() / disable(); None: the environment variable decides
_choices: dict[tuple, str] = {}
_records: list[dict] = []


def enable() -> None:
    """Turn autotuning on for "auto" (whatever ``ADAPTSR_AUTOTUNE`` says)."""
    global _switch
    _switch = True


def disable() -> None:
    """Turn autotuning off: "auto" follows ``AUTO_ON_CUDA`` again (choices made so far are kept for later)."""
    global _switch
    _switch = False


def enabled() -> bool:
    if _switch is not None:
        return _switch
    return os.environ.get(_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def measurements() -> list[dict]:
    """Every choice made so far: ``{"op", "signature", "times_ms": {backend: median ms}, "errors": {backend:
    message}, "choice", "cached", "trials_ms"}``, in the order they were made; ``cached`` when the choice and
    its times came from the cache file, measured by an earlier run; ``trials_ms`` what the trials cost this
    run (copies, warm-ups and timed calls of every contender; 0 for a cached choice)."""
    with _lock:
        return [dict(r, times_ms=dict(r["times_ms"]), errors=dict(r["errors"])) for r in _records]


def reset() -> None:
    """Forget every choice and measurement made in this process; the next call of each signature is timed
    again, or takes the cache file's choice (read again) where it has one."""
    with _lock:
        _choices.clear()
        _records.clear()
    autotune_cache.forget()


def summary(records: list[dict]) -> str:
    """One line per op: how many call signatures autotuning gave to each backend; then what the trials cost."""
    counts: dict[str, dict[str, int]] = {}
    cached: dict[str, int] = {}
    for r in records:
        per_op = counts.setdefault(r["op"], {})
        per_op[r["choice"]] = per_op.get(r["choice"], 0) + 1
        cached[r["op"]] = cached.get(r["op"], 0) + bool(r.get("cached"))
    lines = []
    for op, chosen in counts.items():
        total = sum(chosen.values())
        parts = ", ".join(f"{name} {n}" for name, n in sorted(chosen.items(), key=lambda item: -item[1]))
        from_cache = f" ({cached[op]} from the cache)" if cached[op] else ""
        lines.append(f"autotune: {op}: {parts} of {total} signature{'s' if total > 1 else ''}{from_cache}")
    if records:
        lines.append(f"autotune: the trials took {sum(r.get('trials_ms', 0.0) for r in records) / 1e3:.2f} s")
    return "\n".join(lines)


def can_tune() -> bool:
    """Whether a trial can run here: not while torch.compile traces, nor while a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _describe(value) -> object:
    """A hashable description of one input: a tensor's shape, strides, dtype, device and whether it needs a
    gradient (not its values); other values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), str(value.device), value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return value


def signature(args: Sequence) -> tuple:
    """What a choice is keyed on: the inputs' descriptions, grad mode and the autocast dtype in force."""
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    autocast = str(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
    return (tuple(_describe(a) for a in args), torch.is_grad_enabled(), autocast)


def _copy(value):
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(value.requires_grad and torch.is_grad_enabled())
    return value


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _trial(op_fn: Callable, args: Sequence) -> Callable[[str], None]:
    """A function running ``op_fn(*copies of args)`` under a given backend, forward and, where the call needs
    gradients, backward."""
    from adaptsr.backend import set_backend

    copies = [_copy(a) for a in args]
    leaves = [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]

    def run(backend: str) -> None:
        # plain saving for the trial's own graph: inside a non-reentrant checkpoint the call runs under the
        # checkpoint's saved-tensor hooks, which would otherwise take the trial's tensors for the region's own
        with set_backend(backend), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            out = op_fn(*copies)
            if leaves and out.requires_grad:
                out.backward(torch.full_like(out, 1e-2))
        for leaf in leaves:
            leaf.grad = None

    return run


def _median_ms(run: Callable[[str], None], backend: str, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(backend)  # warm-up
    times = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        run(backend)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def choose(op: str, op_fn: Callable, args: Sequence, candidates: Sequence[str]) -> str:
    """The backend ``op``'s call ``op_fn(*args)`` runs: the fastest of ``candidates`` for its signature, timed
    on the first call of that signature (module docstring)."""
    key = (op, signature(args))
    with _lock:
        known = _choices.get(key)
    if known is not None:
        return known
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    file = autotune_cache.cache_file()
    if file is not None:
        machine = autotune_cache.machine(device)
        cache_key = autotune_cache.entry_key(op, repr(key[1]), list(candidates))
        kept = autotune_cache.load(file, machine, cache_key)
        if kept is not None and kept.get("choice") in candidates:
            return _remember(op, key, kept["times_ms"], kept.get("errors", {}), kept["choice"], cached=True)
    started = time.perf_counter()
    run = _trial(op_fn, args)
    times, errors = {}, {}
    for backend in candidates:
        try:
            times[backend] = _median_ms(run, backend, device)
        except Exception as err:  # a backend's kernels may refuse the inputs in ways of their own
            errors[backend] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if not times:
        raise RuntimeError(f"adaptsr autotune: no backend ran {op} on these inputs: {errors}")
    best = min(times, key=times.get)
    if file is not None:
        autotune_cache.store(file, machine, cache_key, {"choice": best, "times_ms": times, "errors": errors})
    return _remember(op, key, times, errors, best, cached=False, trials_ms=1e3 * (time.perf_counter() - started))


def _remember(op: str, key: tuple, times: dict, errors: dict, choice: str, cached: bool,
              trials_ms: float = 0.0) -> str:
    with _lock:
        _choices[key] = choice
        _records.append({"op": op, "signature": repr(key[1]), "times_ms": dict(times), "errors": dict(errors),
                         "choice": choice, "cached": cached, "trials_ms": trials_ms})
    return choice


def candidates(device: torch.device, takes: Callable[[str], bool] | None) -> list[str]:
    """The backends a trial times for a call on ``device``: those available here that run on the device and take
    the call. Off CUDA that is torch alone, and triton where its interpreter runs the kernels on the CPU."""
    from adaptsr.backend import _triton_interpreting, is_available

    found = []
    for name in _TIMED_BACKENDS:
        on_device = name == "torch" or device.type == "cuda" or (name == "triton" and _triton_interpreting())
        if on_device and is_available(name) and (takes is None or takes(name)):
            found.append(name)
    return found
