"""Every benchmark shape in one place, and the (shape, provider, rank) cases built from them.

CPU shapes run everywhere (they are what DESIGN.md section 5 measured on a 2-core CPU); GPU shapes
are collected too but skipped unless ``torch.cuda.is_available()``.

Providers (DESIGN.md convention 9):
    frozen      the base model, every parameter frozen, the input requiring grad: the frozen
                model's own forward + backward (input gradients through every layer)
    full_ft     the base model, every parameter trainable
    peft        peft.get_peft_model with LoraConfig(r, lora_alpha=r, same target layers)
    reference   adaptsr.inject_lora on the same layers, backend "reference" (two-path oracle)
    torch       adaptsr.inject_lora on the same layers, backend "torch"
    triton/cuda the fused backends, only where adaptsr reports them available and on CUDA

``frozen`` and ``full_ft`` do not depend on the rank, so they run once per shape, first, and every
LoRA provider's ``ratio_to_frozen`` divides by that frozen median.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
import torch

from adaptsr.backend import is_available

HAS_CUDA = torch.cuda.is_available()


def device_marks(shape) -> list:
    """pytest marks for a case on ``shape``: skipped without CUDA where its device is "cuda"."""
    return [pytest.mark.skipif(not HAS_CUDA, reason="GPU shape: needs CUDA")] if shape.device == "cuda" else []

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BASE_PROVIDERS = ("frozen", "full_ft")  # rank-independent, run first
LORA_PROVIDERS = ("peft", "reference", "torch")
FUSED_PROVIDERS = ("triton", "cuda")  # adaptsr backends that exist only on CUDA


@dataclass(frozen=True)
class ConvStackShape:
    """``depth`` x (conv kxk channels->channels + ReLU) on an ``[batch, channels, height, width]`` input."""

    batch: int
    channels: int
    height: int
    width: int
    depth: int
    kernel: int = 3
    dtype: str = "fp32"
    device: str = "cpu"
    channels_last: bool = False  # model and input in channels-last memory format

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def id(self) -> str:
        k = self.kernel
        layout = "-nhwc" if self.channels_last else ""
        return (
            f"{self.depth}x{k}x{k}conv{self.channels}-"
            f"{self.batch}x{self.channels}x{self.height}x{self.width}{layout}-{self.device}"
        )


@dataclass(frozen=True)
class UpDownStackShape:
    """``depth`` x (transposed conv kxk stride k up, ReLU, conv kxk stride k back down) at ``channels`` on an
    ``[batch, channels, height, width]`` input: Real-CUGAN's up-sampling layers, kept at one size."""

    batch: int
    channels: int
    height: int
    width: int
    depth: int
    kernel: int = 2
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def id(self) -> str:
        k = self.kernel
        size = f"{self.batch}x{self.channels}x{self.height}x{self.width}"
        return f"{self.depth}xup{k}x{k}conv{self.channels}-{size}-{self.device}"


@dataclass(frozen=True)
class LinearShape:
    """One linear in_features->out_features on ``[*tokens, in_features]``."""

    tokens: tuple[int, ...]
    in_features: int
    out_features: int
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (*self.tokens, self.in_features)

    @property
    def num_tokens(self) -> int:
        n = 1
        for t in self.tokens:
            n *= t
        return n

    @property
    def id(self) -> str:
        return f"linear{self.in_features}to{self.out_features}-{self.num_tokens}tok-{self.device}"


@dataclass(frozen=True)
class SwinIRShape:
    """A spandrel SwinIR (x``upscale``, pixelshuffledirect) on ``batch`` LR patches of ``patch`` x ``patch``."""

    batch: int
    patch: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int = 8
    upscale: int = 4
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, 3, self.patch, self.patch)

    def build(self) -> torch.nn.Module:
        from spandrel.architectures.SwinIR import SwinIR

        return SwinIR(
            img_size=self.patch,  # the input size: the shift mask is built once, not every call
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            upscale=self.upscale,
            upsampler="pixelshuffledirect",
            drop_path_rate=0.0,
        )

    @property
    def id(self) -> str:
        depths = "-".join(map(str, self.depths))
        return f"swinir-e{self.embed_dim}-d{depths}-w{self.window_size}-{self.batch}x3x{self.patch}x{self.patch}-{self.device}"


# -- CPU shapes (fp32, rank 8): small enough that `pytest benchmarks --benchmark-only` takes minutes --

CPU_RANKS = (8,)
# NCHW (what spandrel models get by default) and channels-last (2x faster convolutions on this CPU).
CPU_CONV_SHAPES = tuple(
    ConvStackShape(batch=4, channels=64, height=64, width=64, depth=16, channels_last=cl) for cl in (False, True)
)
CPU_LINEAR_SHAPES = (LinearShape(tokens=(4, 1024), in_features=180, out_features=540),)
CPU_SWINIR_SHAPES = (SwinIRShape(batch=2, patch=48, embed_dim=48, depths=(4, 4), num_heads=(4, 4)),)
CPU_UP_DOWN_SHAPES = (UpDownStackShape(batch=4, channels=64, height=32, width=32, depth=4),)

# -- GPU shapes: SwinIR-M-like widths at training batch sizes; ranks 4, 8, 16; bf16 and fp32 --

GPU_RANKS = (4, 8, 16)
GPU_DTYPES = ("bf16", "fp32")
GPU_CONV_SHAPES = tuple(
    ConvStackShape(batch=16, channels=c, height=h, width=w, depth=4, dtype=d, device="cuda")
    for c, h, w in ((64, 128, 128), (180, 64, 64))
    for d in GPU_DTYPES
)
GPU_LINEAR_SHAPES = tuple(
    LinearShape(tokens=(16, 4096), in_features=180, out_features=out, dtype=d, device="cuda")
    for out in (540, 360)
    for d in GPU_DTYPES
)
GPU_SWINIR_SHAPES = tuple(
    SwinIRShape(batch=16, patch=64, embed_dim=180, depths=(6, 6), num_heads=(6, 6), dtype=d, device="cuda")
    for d in GPU_DTYPES
)


@dataclass(frozen=True)
class Case:
    """One benchmark: a shape, a provider and (for LoRA providers) a rank."""

    shape: ConvStackShape | UpDownStackShape | LinearShape | SwinIRShape
    provider: str
    rank: int | None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.shape.dtype]

    @property
    def frozen_key(self) -> tuple[str, str]:
        """What this case's ratio_to_frozen divides by: the frozen case of the same shape and dtype."""
        return (self.shape.id, self.shape.dtype)

    @property
    def id(self) -> str:
        rank = "" if self.rank is None else f"-r{self.rank}"
        return f"{self.shape.id}-{self.shape.dtype}-{self.provider}{rank}"


def _lora_providers(device: str) -> tuple[str, ...]:
    fused = tuple(p for p in FUSED_PROVIDERS if device == "cuda" and is_available(p))
    return LORA_PROVIDERS + fused


def cases(shapes: Iterable, ranks: Sequence[int], providers: Sequence[str] | None = None) -> list:
    """pytest.param(Case) per shape: frozen and full_ft first, then each LoRA provider at each rank.

    Shapes on a CUDA device are marked skip when CUDA is not available.
    """
    params = []
    for shape in shapes:
        marks = device_marks(shape)
        lora = _lora_providers(shape.device)
        chosen = [p for p in BASE_PROVIDERS + lora if providers is None or p in providers]
        for provider in chosen:
            for rank in (None,) if provider in BASE_PROVIDERS else ranks:
                case = Case(shape, provider, rank)
                params.append(pytest.param(case, id=case.id, marks=marks))
    return params


CONV_CASES = cases(CPU_CONV_SHAPES, CPU_RANKS) + cases(GPU_CONV_SHAPES, GPU_RANKS)
LINEAR_CASES = cases(CPU_LINEAR_SHAPES, CPU_RANKS) + cases(GPU_LINEAR_SHAPES, GPU_RANKS)
SWINIR_CASES = cases(CPU_SWINIR_SHAPES, CPU_RANKS) + cases(GPU_SWINIR_SHAPES, (8,))
# PEFT has no LoRA for transposed convs; adaptsr has no kernels of its own for them (no fused providers)
CONV_TRANSPOSE_CASES = cases(CPU_UP_DOWN_SHAPES, CPU_RANKS, providers=("frozen", "full_ft", "reference", "torch"))


# -- Swin window attention (benchmarks/test_bench_window_attention.py) --

# Providers: "eager" is spandrel's SwinIR WindowAttention itself; the others are the same module as
# LoRAWindowAttention with its attention core on an adaptsr backend. The torch backend has two
# paths, each a provider: "sdpa" (F.scaled_dot_product_attention) and "matmul" (its hand-written
# autograd Function); extra_info says which one the torch backend picks on the device.
# "triton_single_pass" is the triton backend with LoRAWindowAttention.single_pass on (the qkv
# projection inside the attention kernel).
WINDOW_ATTENTION_PROVIDERS = ("eager", "sdpa", "matmul")
WINDOW_ATTENTION_FUSED_PROVIDERS = ("triton", "triton_single_pass", "cuda")


@dataclass(frozen=True)
class WindowAttentionShape:
    """One SwinIR ``WindowAttention`` (qkv, attention core, proj) over every window of ``batch`` images.

    Each image is ``tokens`` x ``tokens`` tokens cut into ``window`` x ``window`` windows; the input
    is ``[batch * windows per image, window * window, dim]``. ``shifted``: the block's shift mask
    (spandrel's, one per window of an image) is passed, as in every second Swin block.
    """

    batch: int
    tokens: int
    dim: int
    heads: int
    window: int = 8
    shifted: bool = True
    dtype: str = "fp32"
    device: str = "cpu"

    @property
    def windows_per_image(self) -> int:
        return (self.tokens // self.window) ** 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch * self.windows_per_image, self.window * self.window, self.dim)

    def build(self) -> torch.nn.Module:
        from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention

        return WindowAttention(self.dim, (self.window, self.window), self.heads)

    def mask(self) -> torch.Tensor | None:
        """spandrel's SW-MSA mask for a ``tokens`` x ``tokens`` image (shift = window / 2), or None."""
        if not self.shifted:
            return None
        from spandrel.architectures.SwinIR.__arch.SwinIR import SwinTransformerBlock

        block = SwinTransformerBlock(
            self.dim, (self.tokens, self.tokens), self.heads, window_size=self.window, shift_size=self.window // 2
        )
        return block.attn_mask

    @property
    def id(self) -> str:
        shift = "shifted" if self.shifted else "unshifted"
        return (
            f"winattn-c{self.dim}-h{self.heads}-w{self.window}-{shift}-"
            f"{self.batch}x{self.tokens}x{self.tokens}tok-{self.device}"
        )


# CPU: DESIGN.md section 5's shape, 32 windows of SwinIR-M (dim 180, 6 heads, window 8).
CPU_WINDOW_ATTENTION_SHAPES = tuple(
    WindowAttentionShape(batch=2, tokens=32, dim=180, heads=6, shifted=shifted) for shifted in (False, True)
)
# GPU: a SwinIR-M training batch (16 x 64 x 64 tokens); HAT's window 16 once.
GPU_WINDOW_ATTENTION_SHAPES = tuple(
    WindowAttentionShape(batch=16, tokens=64, dim=180, heads=6, shifted=shifted, dtype=d, device="cuda")
    for d in GPU_DTYPES
    for shifted in (False, True)
) + (WindowAttentionShape(batch=16, tokens=64, dim=180, heads=6, window=16, dtype="bf16", device="cuda"),)


def window_attention_cases(shapes: Iterable) -> list:
    """pytest.param(Case) per shape and provider, eager first (the others' ratios divide by it)."""
    params = []
    for shape in shapes:
        marks = device_marks(shape)
        fused = tuple(p for p in WINDOW_ATTENTION_FUSED_PROVIDERS
                      if shape.device == "cuda" and is_available(p.removesuffix("_single_pass")))
        for provider in WINDOW_ATTENTION_PROVIDERS + fused:
            case = Case(shape, provider, None)
            params.append(pytest.param(case, id=case.id, marks=marks))
    return params


WINDOW_ATTENTION_CASES = window_attention_cases(CPU_WINDOW_ATTENTION_SHAPES) + window_attention_cases(
    GPU_WINDOW_ATTENTION_SHAPES
)
