"""`adaptsr bench`: what one training step costs on your model and your hardware.

Times the step ``adaptsr adapt`` runs (forward under the same autocast, L1 loss, backward,
gradient clipping, AdamW) for the frozen model, full fine-tuning and LoRA on each backend asked
for, on random LR/HR batches of the model's channels and scale (data loading is left out: it is
the same for every method). Every method's input requires grad, so "frozen" is the frozen
network's forward and backward, the floor a LoRA step is compared to, and every method does at
least that work.

The methods are timed in interleaved rounds (frozen, full, LoRA..., frozen, ...), so load that
drifts while the benchmark runs (a shared machine, a GPU warming up) hits every method alike; the
table gives medians and their ratio to the frozen median, the activation memory autograd keeps
for each method's backward and, on CUDA, the peak memory its step allocates.

``gan=True`` adds a row for ``adapt --gan``'s step on the first LoRA backend: Real-ESRGAN's losses (L1, the
VGG19 perceptual loss, whose ImageNet weights it needs, and the GAN loss through a fresh U-Net
discriminator), then the discriminator's own Adam step, as ``adapt`` runs them.

``micro_batch=N`` runs every method's step as ``adapt --micro-batch N`` does (the batch forward and backward N
items at a time, the gradients accumulated): the saved activations are then one piece's, and the table shows
what the smaller pieces save in memory and cost in time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adaptsr import autotune
from adaptsr.backend import _unavailable_reason, _validate, is_available, set_backend
from adaptsr.inject import inject_lora
from adaptsr.objective import Objective, batch_pieces
from adaptsr.presets import preset_for_architecture
from adaptsr.train import (
    TrainConfig,
    _accumulate_gradients,
    _apply_gradients,
    _fresh_discriminator,
    _training_loss,
    _tuned_convolutions,
    _uses_bf16,
)

__all__ = [
    "StepTime", "bench_training_step", "default_backends", "format_bench_table", "rows_as_dicts",
    "saved_activation_bytes", "sync_device",
]

# TrainConfig's defaults (clipping, the L1 loss), so the timed step is the step ``adapt`` runs (its learning rate and
# LoRA+ groups do not change the time of a step).
_TRAIN = TrainConfig()
_L1 = Objective(_TRAIN, torch.device("cpu"), None)
# adapt --gan's recipe
_GAN_TRAIN = TrainConfig(pixel_weight=1.0, perceptual_weight=1.0, gan_weight=0.1)


@dataclass
class StepTime:
    """One method's row: what it trains and what its step costs."""

    method: str  # "frozen", "full fine-tuning", "LoRA" or "LoRA + GAN" ("DoRA", "DoRA + GAN" with use_dora)
    backend: str | None  # the adaptsr backend of a LoRA row
    trainable_params: int
    total_params: int
    median_ms: float
    ratio_to_frozen: float
    saved_activation_bytes: int  # what autograd keeps for the backward in one step (parameters excluded)
    # on CUDA: the peak memory one step allocates beyond what stays resident (every method's weights, its
    # optimizer state), so that the methods, all resident at once, compare like with like
    peak_memory_bytes: int | None

    @property
    def label(self) -> str:
        return f"{self.method} ({self.backend})" if self.backend else self.method


def default_backends(device: str | torch.device) -> list[str]:
    """The backends worth timing on ``device``: torch everywhere, the fused ones where they run, and on CUDA with
    autotuning on (``adaptsr.autotune``) "auto", whose warm-up steps then run the trials."""
    if torch.device(device).type != "cuda":
        return ["torch"]
    fused = [name for name in ("triton", "cuda") if is_available(name)]
    return ["torch", *fused, *(["auto"] if autotune.enabled() else [])]


def _check_backends(backends: list[str], device: torch.device) -> list[str]:
    names = []
    for name in backends:
        name = _validate(name)  # an unknown name: ValueError listing the backends
        if name in ("triton", "cuda") and not is_available(name):
            raise ValueError(f"backend {name!r} is not available here: {_unavailable_reason(name)}")
        if name == "cuda" and device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors; pass a CUDA device, not {device}")
        names.append(name)
    if not names:
        raise ValueError("no backend to time: pass at least one")
    return names


def _check_patch(descriptor, patch: int) -> None:
    requirements = descriptor.size_requirements
    if patch < 1 or not requirements.check(patch, patch):
        raise ValueError(
            f"a {patch}x{patch} LR patch does not fit this {descriptor.architecture.id} model: it needs at least "
            f"{requirements.minimum} pixels, a multiple of {requirements.multiple_of}"
        )


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(
    step_forward: Callable[[], torch.Tensor], grad_out: torch.Tensor | None, model: nn.Module
) -> int:
    """Bytes of the unique storages autograd saves for the backward of ``step_forward()`` (then run with
    ``grad_out``; None for a scalar loss): the activation memory a training step holds, ``model``'s
    parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. subclasses)
            return t
        ptr = storage.data_ptr()
        if ptr not in own:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step_forward()
    y.backward(grad_out)
    return sum(seen.values())


def _fresh_input(lr: torch.Tensor) -> torch.Tensor:
    """The step's input: a copy of the batch (some models, such as spandrel's RCAN, write into their input),
    through which the gradient still reaches ``lr``."""
    return lr.clone()


class _Method:
    """A model copy, its optimizer, the backend its steps run under and its losses (L1 unless given)."""

    def __init__(self, method: str, module: nn.Module, backend: str | None, objective: Objective = _L1,
                 micro_batch: int = 0) -> None:
        self.method, self.module, self.backend, self.objective = method, module, backend, objective
        self.micro_batch = micro_batch
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.optimizer = (torch.optim.AdamW(self.params.values(), lr=_TRAIN.lr, weight_decay=_TRAIN.weight_decay)
                          if self.params else None)
        self.times: list[float] = []

    def step(self, lr: torch.Tensor, hr: torch.Tensor, use_bf16: bool) -> None:
        lr.grad = None
        with set_backend(self.backend or "auto"):
            # forward and backward (frozen: down to the input alone)
            _, _, sr = _accumulate_gradients(self.module, self.objective, _fresh_input(lr), hr, use_bf16,
                                             self.micro_batch)
            if self.optimizer is not None:
                _apply_gradients(self.params, self.optimizer, _TRAIN.grad_clip)
            if self.objective.discriminator is not None:
                self.objective.discriminator_step(sr, hr, use_bf16, self.micro_batch)

    def timed_step(self, lr, hr, use_bf16: bool, device: torch.device) -> None:
        sync_device(device)
        start = time.perf_counter()
        self.step(lr, hr, use_bf16)
        sync_device(device)
        self.times.append(time.perf_counter() - start)

    def saved_bytes(self, lr, hr, use_bf16: bool) -> int:
        """What autograd keeps for one backward: the whole batch's forward, or the first (largest) piece's with
        micro-batches, since each piece's activations are freed by its backward before the next piece runs."""
        lr.grad = None
        _, (lr, hr) = batch_pieces(self.micro_batch, lr, hr)[0]
        with set_backend(self.backend or "auto"):
            # the loss networks' weights (VGG, discriminator) are not activations either
            networks = nn.ModuleList([self.module] + [net for net in (self.objective.perceptual,
                                                                        self.objective.discriminator) if net is not None])
            saved = saved_activation_bytes(
                lambda: _training_loss(self.module, self.objective, _fresh_input(lr), hr, use_bf16)[0], None, networks)
        for p in self.params.values():
            p.grad = None
        return saved

    def peak_memory(self, lr, hr, use_bf16: bool, device: torch.device) -> int | None:
        if device.type != "cuda":
            return None
        sync_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        self.step(lr, hr, use_bf16)
        sync_device(device)
        return torch.cuda.max_memory_allocated(device) - resident


def bench_training_step(
    descriptor,
    *,
    backends: list[str] | None = None,
    preset: str | None = None,
    targets: str | None = None,
    rank: int = 8,
    alpha: float | None = None,
    full_finetune: bool = True,
    batch_size: int = 8,
    patch: int = 32,
    device: str | torch.device = "cpu",
    amp: str = "auto",
    rounds: int = 10,
    warmup: int = 2,
    seed: int = 0,
    gan: bool = False,
    micro_batch: int = 0,
    **lora_options,
) -> list[StepTime]:
    """Time one training step of each method on ``descriptor`` (a spandrel model, left unchanged).

    Rows: frozen, full fine-tuning (unless ``full_finetune=False``), then LoRA (``preset`` or
    ``targets``, ``rank``, ``alpha`` and any other ``lora_options`` as for ``inject_lora``; by
    default the architecture's preset) under each of ``backends`` (default:
    ``default_backends(device)``), and with ``gan`` a "LoRA + GAN" row (``adapt --gan``'s step: module
    docstring) on the first of them. ``amp`` is TrainConfig's: "auto" (bf16 on CUDA), "bf16" or "off".
    Medians over ``rounds`` interleaved rounds, after ``warmup`` untimed steps each (compilation,
    autotuning, allocator growth). ``micro_batch``: every step in pieces of that many items, as ``adapt`` runs them
    (0: the whole batch at once).
    """
    device = torch.device(device)
    use_bf16 = _uses_bf16(amp, device.type)
    if batch_size < 1 or rounds < 1 or warmup < 0 or micro_batch < 0:
        raise ValueError(f"batch_size and rounds must be positive and warmup and micro_batch not negative, got "
                         f"{batch_size}, {rounds}, {warmup}, {micro_batch}")
    backends = _check_backends(default_backends(device) if backends is None else list(backends), device)
    _check_patch(descriptor, patch)

    base = descriptor.model
    total = sum(p.numel() for p in base.parameters())
    methods = [_Method("frozen", copy.deepcopy(base).requires_grad_(False), None, micro_batch=micro_batch)]
    if full_finetune:
        methods.append(_Method("full fine-tuning", copy.deepcopy(base).requires_grad_(True), None,
                               micro_batch=micro_batch))
    if preset is None and targets is None:
        preset = preset_for_architecture(descriptor.architecture.id)
    adapted = copy.deepcopy(base).requires_grad_(False)
    # inject_lora names the fault when the targets match nothing
    inject_lora(adapted, preset=preset, targets=targets, rank=rank, alpha=alpha, **lora_options)
    # One adapted copy serves every backend: the backend is chosen per call, not stored in the layers.
    kind = "DoRA" if lora_options.get("use_dora") else "LoRA"
    methods += [_Method(kind, adapted, name, micro_batch=micro_batch) for name in backends]
    if gan:  # its own copy: the LoRA rows' optimizer must not step these adapters
        gan_objective = Objective(_GAN_TRAIN, device, _fresh_discriminator(descriptor.output_channels, seed))
        methods.append(_Method(f"{kind} + GAN", copy.deepcopy(adapted), backends[0], gan_objective, micro_batch))
    for m in methods:
        m.module.to(device).train()

    generator = torch.Generator().manual_seed(seed)
    scale = descriptor.scale
    lr = torch.rand(batch_size, descriptor.input_channels, patch, patch, generator=generator).to(device)
    hr = torch.rand(batch_size, descriptor.output_channels, patch * scale, patch * scale, generator=generator)
    lr, hr = lr.requires_grad_(True), hr.to(device)

    with _tuned_convolutions(device):  # as adapt trains: cuDNN autotuned on CUDA (the warm-up steps tune it)
        for m in methods:
            for _ in range(warmup):
                m.step(lr, hr, use_bf16)
        for _ in range(rounds):
            for m in methods:
                m.timed_step(lr, hr, use_bf16, device)

        frozen_ms = 1e3 * statistics.median(methods[0].times)
        rows = []
        for m in methods:
            median_ms = 1e3 * statistics.median(m.times)
            rows.append(StepTime(
                method=m.method, backend=m.backend, trainable_params=sum(p.numel() for p in m.params.values()),
                total_params=sum(p.numel() for p in m.module.parameters()) if m.method.startswith(kind) else total,
                median_ms=median_ms, ratio_to_frozen=median_ms / frozen_ms,
                saved_activation_bytes=m.saved_bytes(lr, hr, use_bf16),
                peak_memory_bytes=m.peak_memory(lr, hr, use_bf16, device),  # with the tuned algorithms' workspace
            ))
    return rows


def _count(n: int) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_bench_table(rows: list[StepTime]) -> str:
    """A markdown table: method, trainable share, ms per step, ratio to frozen, saved activations, peak memory."""
    lines = ["| method | trainable | ms / step | x frozen | saved MB | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = "0"
        if r.trainable_params:
            share = f"{_count(r.trainable_params)} ({100 * r.trainable_params / r.total_params:.1f}%)"
        peak = f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes is not None else "-"
        saved = f"{r.saved_activation_bytes / 2**20:.1f}"
        lines.append(f"| {r.label} | {share} | {r.median_ms:.1f} | {r.ratio_to_frozen:.2f} | {saved} | {peak} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[StepTime]) -> list[dict]:
    """The rows as JSON-ready dicts (``label`` included)."""
    return [{**asdict(r), "label": r.label} for r in rows]
