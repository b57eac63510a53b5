"""enable_shifted_window_attention: SwinIR, HAT and DRCT blocks on the un-partitioned map compute what spandrel's do.

The referee is spandrel's own block forward on the same model: output and the
gradients of the input and of every trainable parameter, plain and with LoRA, at the build
resolution and at another one (where the block rebuilds its shift mask).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from spandrel.architectures.DRCT import DRCT
from spandrel.architectures.HAT import HAT
from spandrel.architectures.SwinIR import SwinIR
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinTransformerBlock
from torch import nn

import adaptsr
from adaptsr.backend import is_available
from adaptsr.nn.swin_block import (
    can_use_shifted_window_attention,
    disable_shifted_window_attention,
    enable_shifted_window_attention,
)

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

_TRITON = pytest.param("triton", marks=pytest.mark.skipif(not is_available("triton"), reason="triton unavailable"))


# arch -> the names of its tiny model's Swin blocks, in order (alternately unshifted and shifted)
BLOCKS = {
    "swinir": ["layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1"],
    "hat": ["layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1"],
    "drct": [f"layers.0.swin{b}" for b in range(1, 6)],
}


def build(dtype: torch.dtype = torch.float64, arch: str = "swinir", **kwargs) -> nn.Module:
    """A tiny random SwinIR or HAT (window 4, two blocks: 0 unshifted, 1 shifted) or DRCT (one residual dense
    group of five blocks, 12 to 28 channels)."""
    torch.manual_seed(0)
    config = {"img_size": 16, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4, "upscale": 2,
              "drop_path_rate": 0.0, **kwargs}
    if arch == "swinir":
        model = SwinIR(upsampler="pixelshuffledirect", **config)
    elif arch == "hat":
        model = HAT(num_feat=8, compress_ratio=3, squeeze_factor=4, **config)
    else:
        model = DRCT(upsampler="pixelshuffle", gc=4, **{**config, "depths": [1]})
    with torch.no_grad():  # a bias table far from its 0.02 init, so that it matters
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
    return model.to(dtype)


def _compare(model: nn.Module, arch: str, backend: str, size: tuple[int, int], check_switched_forward) -> None:
    switched = check_switched_forward(model, enable_shifted_window_attention, disable_shifted_window_attention,
                                      backend, size)
    assert switched == BLOCKS[arch]


@pytest.mark.parametrize("arch", list(BLOCKS))
@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["img_size", "other-size"])
@pytest.mark.parametrize("backend", ["reference", "torch", _TRITON])
def test_plain_model_matches_spandrel(backend, size, arch, check_switched_forward):
    """Every parameter trainable (full fine-tuning): the gradients of all of them agree."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    _compare(build(dtype, arch), arch, backend, size, check_switched_forward)


@pytest.mark.parametrize("arch", list(BLOCKS))
@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["img_size", "other-size"])
def test_lora_model_matches_spandrel(size, arch, check_switched_forward):
    """inject_lora (LoRAWindowAttention, LoRALinear qkv / proj with non-zero B): adapters and tables agree.

    On the torch backend only: under triton every LoRA layer of the model would run its own
    kernels in the interpreter (half a minute); the op's triton path is the plain model's test."""
    backend = "torch"
    model = build(torch.float64, arch)
    adaptsr.inject_lora(model, preset=arch, rank=2, init_lora_weights=False)
    for name, p in model.named_parameters():
        if name.endswith("relative_position_bias_table"):
            p.requires_grad_(True)
    _compare(model, arch, backend, size, check_switched_forward)


@pytest.mark.parametrize("arch", ["swinir", "drct"])
def test_attention_dropout_in_training_falls_back_to_spandrel(arch, assert_close):
    model = build(arch=arch, attn_drop_rate=0.5).train()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(3)
    expected = model(x)
    enable_shifted_window_attention(model)
    torch.manual_seed(3)
    assert_close(model(x), expected, "output with attention dropout")


def test_enable_disable_keep_keys_and_copies():
    model = build()
    keys = list(model.state_dict())
    names = enable_shifted_window_attention(model)
    assert len(names) == 2 and list(model.state_dict()) == keys
    assert all(type(m) is SwinTransformerBlock for m in model.modules() if isinstance(m, SwinTransformerBlock))
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    y = model(x)
    # copies carry the switched forward, bound to the copy itself
    twin = copy.deepcopy(model)
    block = twin.layers[0].residual_group.blocks[1]
    assert block.forward.args[0] is block
    torch.testing.assert_close(twin(x), y)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), y)
    assert disable_shifted_window_attention(model) == names
    assert "forward" not in model.layers[0].residual_group.blocks[0].__dict__
    assert disable_shifted_window_attention(model) == []


def test_only_window_attention_blocks_are_switched():
    """HAT's hybrid blocks are switched; its overlapping cross-attention block and other modules are not."""
    hat = build(arch="hat")
    names = enable_shifted_window_attention(hat)
    assert names == ["layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1"]
    assert not any("overlap_attn" in name for name in names)
    assert not can_use_shifted_window_attention(nn.Linear(2, 2))
