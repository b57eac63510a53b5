"""HAT's overlapping cross-attention blocks on adaptsr's op compute what spandrel's forward computes.

The referee is spandrel's own forward on the same model: output and the gradients of the input and
of every trainable parameter (the blocks' position-bias tables included), plain and with LoRA, at
the build resolution and at one that HAT pads to a multiple of its window.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from spandrel.architectures.HAT import HAT
from torch import nn

import adaptsr
from adaptsr.backend import is_available
from adaptsr.nn.overlapping_cross_attention import (
    can_fuse_overlapping_attention,
    disable_fused_overlapping_attention,
    enable_fused_overlapping_attention,
)

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

# window 4: 16 queries per window; overlap ratio 0.5: keys from the 6 x 6 windows around them (36)
CONFIG = {"img_size": 16, "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 2], "window_size": 4, "upscale": 2,
          "num_feat": 8, "compress_ratio": 3, "squeeze_factor": 4, "drop_path_rate": 0.0}
NAMES = [f"layers.{i}.residual_group.overlap_attn" for i in (0, 1)]


def build(dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A tiny random HAT whose position-bias tables are O(1) (their init is std 0.02), so that they matter."""
    torch.manual_seed(0)
    model = HAT(**{**CONFIG, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
    return model.to(dtype)


def test_the_index_counts_some_entries_from_the_tables_end():
    """HAT's overlapping index holds negative entries that spandrel's indexing reads from the table's end:
    the models here exercise that, the gradient's scatter included."""
    model = build()
    index = model.relative_position_index_OCA
    assert index.shape == (16, 36) and index.min() < 0


def _compare(model: nn.Module, backend: str, size: tuple[int, int], check_switched_forward) -> None:
    switched = check_switched_forward(model, enable_fused_overlapping_attention, disable_fused_overlapping_attention,
                                      backend, size)
    assert switched == NAMES[: len(model.layers)]


@pytest.mark.parametrize("size", [(16, 16), (12, 22)], ids=["img_size", "padded-size"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plain_model_matches_spandrel(backend, size, check_switched_forward):
    """Every parameter trainable (full fine-tuning): all gradients agree, the bias tables' included."""
    _compare(build(), backend, size, check_switched_forward)


def test_another_overlap_ratio_matches_spandrel(check_switched_forward):
    """Overlap ratio 1: 8 x 8 key windows (spandrel's own forward breaks where the ratio makes the key
    window's padding round down, e.g. 0.25 with window 4)."""
    _compare(build(overlap_ratio=1.0), "torch", (16, 16), check_switched_forward)


@pytest.mark.skipif(not is_available("triton"), reason="triton unavailable")
def test_triton_path_matches_spandrel(check_switched_forward):
    """The op's triton kernels (under the interpreter without a GPU) with 16 queries and 36 keys per window."""
    _compare(build(torch.float32, depths=[2], num_heads=[2]), "triton", (16, 16), check_switched_forward)


@pytest.mark.parametrize("size", [(16, 16), (12, 22)], ids=["img_size", "padded-size"])
def test_lora_model_matches_spandrel(size, check_switched_forward):
    model = build()
    adaptsr.inject_lora(model, preset="hat", rank=2, init_lora_weights=False, window_attention=False)
    _compare(model, "torch", size, check_switched_forward)


def test_inject_lora_switches_them_and_merge_lora_switches_back(check_inject_switches_and_merge_restores):
    # (the blocks' window attentions become LoRAWindowAttention too)
    assert set(NAMES) < set(check_inject_switches_and_merge_restores(build, "hat", NAMES))
    # default: only the blocks whose own qkv or proj is adapted
    partial = build()
    summary = adaptsr.inject_lora(partial, targets=["layers.1.residual_group.overlap_attn.proj"], rank=2)
    assert summary.window_attention == NAMES[1:]


def test_enable_disable_keep_keys_and_copies(check_switch_keeps_keys_and_copies):
    check_switch_keeps_keys_and_copies(
        build(), enable_fused_overlapping_attention, disable_fused_overlapping_attention,
        can_fuse_overlapping_attention, NAMES,
    )
    assert enable_fused_overlapping_attention(build(), {NAMES[1]}) == NAMES[1:]
