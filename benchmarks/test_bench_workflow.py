"""What two of the workflow's options cost, on the bundled SwinIR (the demo's model).

``test_bench_upscale``: ``adaptsr.upscale`` of one LR image, plain and with ``self_ensemble=True`` (the image also
run in its 7 other flips and quarter turns, the outputs averaged: about 8 forwards). ``ratio_to_frozen`` divides by
the plain median of the same shape, so the table's ratio column is the self-ensemble's price.

``test_bench_micro_batch``: one training step of ``adapt`` (the LoRA preset at rank 8, L1 loss, forward, backward,
clipping, AdamW) on a batch of crops, whole and in micro-batches (``TrainConfig.micro_batch``), timed with
``adaptsr.bench``'s step. ``saved_activation_bytes`` is one piece's, the activation memory the pieces buy, and on
CUDA ``peak_memory_bytes`` the step's peak beyond the resident weights. ``ratio_to_frozen`` divides by the whole
batch's median.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import adaptsr
from adaptsr.bench import _Method
from adaptsr.demo import bundled_model_path
from benchmarks.conftest import load_average, time_interleaved
from benchmarks.shapes import device_marks

# The whole-image or whole-batch median of each shape, which the other cases' ratios divide by; it runs first.
BASELINE_MEDIANS: dict[str, float] = {}


@dataclass(frozen=True)
class UpscaleShape:
    size: int  # LR image height and width
    device: str = "cpu"

    @property
    def id(self) -> str:
        return f"swinir-x4-{self.size}x{self.size}-{self.device}"


@dataclass(frozen=True)
class StepShape:
    batch: int
    patch: int  # LR crop height and width
    device: str = "cpu"

    @property
    def id(self) -> str:
        return f"swinir-x4-b{self.batch}-{self.patch}x{self.patch}-{self.device}"


UPSCALE_SHAPES = (UpscaleShape(64), UpscaleShape(256, "cuda"))
STEP_SHAPES = (StepShape(16, 32), StepShape(16, 64, "cuda"))
MICRO_BATCHES = (0, 4, 1)  # 0: the whole batch first, the baseline


def _params(shapes, providers):
    params = []
    for shape in shapes:
        marks = device_marks(shape)
        params += [pytest.param(shape, p, id=f"{shape.id}-{p}", marks=marks) for p in providers]
    return params


def _record(benchmark, provider: str, shape, device: torch.device, median: float, load_before) -> dict:
    extra = benchmark.extra_info
    if shape.id not in BASELINE_MEDIANS or provider in ("plain", "whole"):
        BASELINE_MEDIANS[shape.id] = median
    extra.update(provider=provider, shape=shape.id, dtype="fp32", rank=None,
                 device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 threads=torch.get_num_threads(), torch=torch.__version__,
                 ratio_to_frozen=median / BASELINE_MEDIANS[shape.id], loadavg=[load_before, load_average()])
    return extra


@pytest.mark.parametrize(("shape", "provider"), _params(UPSCALE_SHAPES, ("plain", "self_ensemble")))
def test_bench_upscale(benchmark, shape: UpscaleShape, provider: str):
    device = torch.device(shape.device)
    load_before = load_average()
    descriptor = adaptsr.load_model(bundled_model_path("swinir")).to(device).eval()
    image = torch.rand(1, descriptor.input_channels, shape.size, shape.size, generator=torch.Generator().manual_seed(0))
    image = image.to(device)

    def step() -> None:
        out = adaptsr.upscale(descriptor, image, self_ensemble=provider == "self_ensemble")
        assert out.shape[-1] == shape.size * descriptor.scale

    benchmark.group = f"upscale-{shape.id}"
    if benchmark.disabled:  # smoke test: one call
        benchmark.pedantic(step, rounds=1)
        return
    median, _ = time_interleaved(benchmark, step, lambda: None, None, device)
    _record(benchmark, provider, shape, device, median, load_before)


@pytest.mark.parametrize(("shape", "micro_batch"), _params(STEP_SHAPES, MICRO_BATCHES))
def test_bench_micro_batch(benchmark, shape: StepShape, micro_batch: int):
    device = torch.device(shape.device)
    load_before = load_average()
    descriptor = adaptsr.load_model(bundled_model_path("swinir"))
    adaptsr.inject_lora(descriptor, preset="swinir", rank=8)
    module = descriptor.model.to(device).train()
    method = _Method("LoRA", module, None, micro_batch=micro_batch)
    generator = torch.Generator().manual_seed(0)
    lr = torch.rand(shape.batch, 3, shape.patch, shape.patch, generator=generator).to(device)
    hr = torch.rand(shape.batch, 3, 4 * shape.patch, 4 * shape.patch, generator=generator).to(device)
    use_bf16 = False  # fp32 everywhere, so the CPU and GPU rows time the same arithmetic

    def step() -> None:
        method.step(lr, hr, use_bf16)

    provider = "whole" if micro_batch == 0 else f"micro-{micro_batch}"
    benchmark.group = f"micro-batch-{shape.id}"
    if benchmark.disabled:  # smoke test: one step and the memory probes
        benchmark.pedantic(step, rounds=1)
        assert method.saved_bytes(lr, hr, use_bf16) > 0
        return
    median, _ = time_interleaved(benchmark, step, lambda: None, None, device)
    extra = _record(benchmark, provider, shape, device, median, load_before)
    extra["saved_activation_bytes"] = method.saved_bytes(lr, hr, use_bf16)
    extra["peak_memory_bytes"] = method.peak_memory(lr, hr, use_bf16, device)
