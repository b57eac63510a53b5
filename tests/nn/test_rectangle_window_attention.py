"""DAT's and RGT's rectangle-window attention on adaptsr's op compute what spandrel's forward computes.

The referee is spandrel's own forward on the same model: output and the gradients of the input and
of every trainable parameter (the dynamic position-bias MLPs included), plain and with LoRA, at the
build resolution and at another one (where the blocks rebuild their shift masks).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from spandrel.architectures.DAT import DAT
from spandrel.architectures.RGT import RGT
from torch import nn

import adaptsr
from adaptsr.backend import is_available
from adaptsr.nn.rectangle_window_attention import (
    can_fuse_rectangle_attention,
    disable_fused_rectangle_attention,
    enable_fused_rectangle_attention,
)

warnings.filterwarnings("ignore", message=r"Initializing zero-element tensors")


ARCHS = {"dat": DAT, "rgt": RGT}
# embed_dim 96: the attentions' position-bias MLPs get a hidden width of 3 (at 1 their layer norm makes the
# bias one constant, which the softmax ignores; at 2 RGT's came out constant too)
CONFIG = {"img_size": 16, "embed_dim": 96, "depth": [4], "num_heads": [4], "split_size": [2, 4], "upscale": 2,
          "drop_path_rate": 0.0}
# depth 4: blocks 0 and 2 attend in 2 x 4 and 4 x 2 windows (attns.0 / attns.1); block 2's are shifted
NAMES = [f"layers.0.blocks.{b}.attn.attns.{i}" for b in (0, 2) for i in (0, 1)]


def build(arch: str, dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """A tiny random DAT or RGT whose position biases vary across the window by O(1), so that they matter."""
    torch.manual_seed(0)
    model = ARCHS[arch](**{**CONFIG, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".pos." in name and p.dim() == 2:  # the MLPs' linear weights (their init is std 0.02)
                p.normal_(0.0, 1.0)
    attention = model.get_submodule(NAMES[0])
    table = attention.pos(attention.rpe_biases)
    assert (table - table.mean(0)).abs().max() > 0.1
    return model.to(dtype)


def _compare(model: nn.Module, backend: str, size: tuple[int, int], check_switched_forward) -> None:
    model.eval()  # DAT's channel interaction has a batch norm: keep its statistics out of the comparison
    switched = check_switched_forward(model, enable_fused_rectangle_attention, disable_fused_rectangle_attention,
                                      backend, size)
    assert switched == NAMES


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("size", [(16, 16), (16, 24)], ids=["img_size", "other-size"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plain_model_matches_spandrel(arch, backend, size, check_switched_forward):
    """Every parameter trainable (full fine-tuning): the gradients of all of them agree, the position-bias
    MLPs' included (their output is the op's bias table)."""
    model = build(arch)
    assert any(".attns.0.pos.pos_proj.weight" in name for name, _ in model.named_parameters())
    _compare(model, backend, size, check_switched_forward)


@pytest.mark.skipif(not is_available("triton"), reason="triton unavailable")
def test_triton_path_matches_spandrel(check_switched_forward):
    """The op's triton kernels under the interpreter (half a minute a model, so DAT only: RGT's attention is
    the same code, and the op's own tests cover the kernels' range)."""
    _compare(build("dat", torch.float32), "triton", (16, 16), check_switched_forward)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("size", [(16, 16), (16, 24)], ids=["img_size", "other-size"])
def test_lora_model_matches_spandrel(arch, size, check_switched_forward):
    model = build(arch)
    adaptsr.inject_lora(model, preset=arch, rank=2, init_lora_weights=False, window_attention=False)
    _compare(model, "torch", size, check_switched_forward)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_inject_lora_switches_them_and_merge_lora_switches_back(arch, check_inject_switches_and_merge_restores):
    assert check_inject_switches_and_merge_restores(lambda: build(arch), arch, NAMES) == NAMES
    # default: only the attentions whose parent's qkv or proj is adapted
    partial = build(arch)
    summary = adaptsr.inject_lora(partial, targets=["layers.0.blocks.2.attn.qkv"], rank=2)
    assert summary.window_attention == NAMES[2:]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_attention_dropout_in_training_falls_back_to_spandrel(arch, assert_close):
    model = build(arch, attn_drop_rate=0.5).train()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)  # two images: DAT's batch norm trains on 1 x 1 maps
    torch.manual_seed(3)
    expected = model(x)
    enable_fused_rectangle_attention(model)
    torch.manual_seed(3)
    assert_close(model(x), expected, "output with attention dropout")


def test_enable_disable_keep_keys_and_copies(check_switch_keeps_keys_and_copies):
    check_switch_keeps_keys_and_copies(
        build("dat"), enable_fused_rectangle_attention, disable_fused_rectangle_attention,
        can_fuse_rectangle_attention, NAMES,
    )
