"""Swin2SR's cosine window attention on adaptsr's op computes what spandrel's forward computes.

The referee is spandrel's own forward on the same model: output and the gradients of the input and
of every trainable parameter (the position-bias MLP, the logit scales and the q / v biases included),
plain and with LoRA (Swin2SR reads its qkv weight: the adapted one reaches the op), at the build
resolution and at another one (where the blocks build their shift masks per call).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from spandrel.architectures.Swin2SR import Swin2SR
from torch import nn

import adaptsr
from adaptsr.backend import is_available
from adaptsr.nn.cosine_window_attention import (
    can_fuse_cosine_attention,
    disable_fused_cosine_attention,
    enable_fused_cosine_attention,
)

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

CONFIG = {"img_size": 16, "embed_dim": 24, "depths": [2], "num_heads": [2], "window_size": 4, "upscale": 2,
          "upsampler": "pixelshuffle", "drop_path_rate": 0.0}
# block 0 unshifted, block 1 shifted
NAMES = [f"layers.0.residual_group.blocks.{b}.attn" for b in (0, 1)]


def build(dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A tiny random Swin2SR whose position biases vary across the window, with non-zero q / v biases and
    per-head logit scales on both sides of spandrel's clamp (log 100)."""
    torch.manual_seed(0)
    model = Swin2SR(**{**CONFIG, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (".cpb_mlp." in name and p.dim() == 2) or name.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 1.0)
            elif name.endswith("logit_scale"):
                p.copy_(torch.tensor([math.log(10.0), math.log(150.0)]).view(2, 1, 1))
    return model.to(dtype)


def _compare(model: nn.Module, backend: str, size: tuple[int, int], check_switched_forward) -> None:
    switched = check_switched_forward(model, enable_fused_cosine_attention, disable_fused_cosine_attention, backend,
                                      size)
    assert switched == NAMES


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["img_size", "other-size"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plain_model_matches_spandrel(backend, size, check_switched_forward):
    """Every parameter trainable (full fine-tuning): all gradients agree, the logit scales' (one clamped)
    and the position-bias MLP's included."""
    _compare(build(), backend, size, check_switched_forward)


@pytest.mark.skipif(not is_available("triton"), reason="triton unavailable")
def test_triton_path_matches_spandrel(check_switched_forward):
    _compare(build(torch.float32), "triton", (16, 16), check_switched_forward)


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["img_size", "other-size"])
def test_lora_model_matches_spandrel(size, check_switched_forward):
    model = build()
    adaptsr.inject_lora(model, preset="swin2sr", rank=2, init_lora_weights=False, window_attention=False)
    _compare(model, "torch", size, check_switched_forward)


def test_inject_lora_switches_them_and_merge_lora_switches_back(check_inject_switches_and_merge_restores):
    assert check_inject_switches_and_merge_restores(build, "swin2sr", NAMES) == NAMES
    # default: only the attentions whose own qkv or proj is adapted
    partial = build()
    summary = adaptsr.inject_lora(partial, targets=["layers.0.residual_group.blocks.1.attn.proj"], rank=2)
    assert summary.window_attention == NAMES[1:]


def test_attention_dropout_in_training_falls_back_to_spandrel(assert_close):
    model = build(attn_drop_rate=0.5).train()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(3)
    expected = model(x)
    enable_fused_cosine_attention(model)
    torch.manual_seed(3)
    assert_close(model(x), expected, "output with attention dropout")


def test_enable_disable_keep_keys_and_copies(check_switch_keeps_keys_and_copies):
    check_switch_keeps_keys_and_copies(
        build(), enable_fused_cosine_attention, disable_fused_cosine_attention, can_fuse_cosine_attention, NAMES
    )
