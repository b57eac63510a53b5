"""Opt-in: spandrel SwinIR, DRCT and HAT blocks that run their attention on the un-partitioned map.

spandrel's ``SwinTransformerBlock.forward`` rolls the normed map, partitions it into windows,
runs ``WindowAttention`` (qkv, attention core, proj) on the windows, pastes them back and rolls
back: four full copies of the activations, four more in the backward. qkv and proj are
position-wise, so the block can apply them on the map itself and leave the rest to
``adaptsr.ops.shifted_window_attention``, which finds each window's tokens by index arithmetic::

    x -> norm1 -> attn.qkv -> shifted_window_attention -> attn.proj -> + shortcut -> MLP half

HAT's hybrid attention block (``HAB``) adds a convolution branch on the normed map, which it
keeps. ``enable_shifted_window_attention(model)`` switches every eligible block of a model (a
SwinIR or DRCT ``SwinTransformerBlock`` or a HAT ``HAB`` whose ``attn`` is spandrel's
``WindowAttention`` of that architecture or a ``LoRAWindowAttention`` wrapping one) to that
forward; ``disable_shifted_window_attention(model)`` switches them back. Only the blocks'
``forward`` changes: parameters, buffers, state-dict keys and the blocks' classes stay
spandrel's, so merging, saving and loading are unaffected. ``qkv`` and ``proj`` are whatever
modules they are (``LoRALinear`` after ``inject_lora``: their merged-weight forward and LoRA
dropout apply as usual). A block in training with attention dropout falls back
to spandrel's forward (the op has no dropout on the attention weights).
"""

from __future__ import annotations

import torch
from spandrel.architectures.DRCT.__arch.drct_arch import SwinTransformerBlock as DRCTSwinTransformerBlock
from spandrel.architectures.DRCT.__arch.drct_arch import WindowAttention as DRCTWindowAttention
from spandrel.architectures.HAT.__arch.HAT import HAB
from spandrel.architectures.HAT.__arch.HAT import WindowAttention as HATWindowAttention
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinTransformerBlock
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention as SwinIRWindowAttention
from torch import nn

from adaptsr.nn._instance_forward import restore_forwards, set_forward
from adaptsr.nn.lora_window_attention import LoRAWindowAttention
from adaptsr.ops.shifted_window_attention import shifted_window_attention

__all__ = [
    "can_use_shifted_window_attention",
    "disable_shifted_window_attention",
    "enable_shifted_window_attention",
    "shifted_block_forward",
    "shifted_hab_forward",
]

# block class -> the window-attention class it holds. DRCT's block is a copy of SwinIR's (same
# attributes, same forward), so shifted_block_forward serves both.
_BLOCKS = {
    SwinTransformerBlock: SwinIRWindowAttention,
    DRCTSwinTransformerBlock: DRCTWindowAttention,
    HAB: HATWindowAttention,
}


def can_use_shifted_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a SwinIR, DRCT or HAT block whose attention these forwards know how to run."""
    attention_type = _BLOCKS.get(type(module))
    if attention_type is None:
        return False
    attn = module.attn
    return type(attn) is attention_type or (
        isinstance(attn, LoRAWindowAttention) and attn.original_type is attention_type
    )


def _attention_on_map(block: nn.Module, normed: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None):
    """qkv -> shifted_window_attention -> proj on a ``[B, H, W, C]`` normed map; ``[B, H W, C]``."""
    attn = block.attn
    batch, height, width, channels = normed.shape
    out = shifted_window_attention(attn.qkv(normed), attn.relative_position_bias_table, index, mask, attn.scale,
                                   block.window_size, block.shift_size, attn.num_heads)
    return attn.proj_drop(attn.proj(out)).view(batch, height * width, channels)


def shifted_block_forward(block: nn.Module, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """spandrel's SwinIR / DRCT ``SwinTransformerBlock.forward(x, x_size)`` without the roll / partition copies.

    ``x: [B, H*W, C]`` tokens of an ``x_size = (H, W)`` map; returns the block's output, same shape.
    """
    attn = block.attn
    if attn.training and attn.attn_drop.p > 0:
        return type(block).forward(block, x, x_size)
    height, width = x_size
    batch, _, channels = x.shape
    # the mask as spandrel picks it: the cached buffer at the build resolution, else rebuilt
    if block.input_resolution == x_size:
        mask = block.attn_mask
    else:
        mask = block.calculate_mask(x_size).to(x.device)
    out = _attention_on_map(block, block.norm1(x).view(batch, height, width, channels),
                            attn.relative_position_index, mask)
    x = x + block.drop_path(out)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def shifted_hab_forward(block: HAB, x: torch.Tensor, x_size: tuple[int, int], rpi_sa: torch.Tensor,
                        attn_mask: torch.Tensor | None) -> torch.Tensor:
    """spandrel's HAT ``HAB.forward(x, x_size, rpi_sa, attn_mask)`` without the roll / partition copies."""
    attn = block.attn
    if attn.training and attn.attn_drop.p > 0:
        return HAB.forward(block, x, x_size, rpi_sa, attn_mask)
    height, width = x_size
    batch, _, channels = x.shape
    normed = block.norm1(x).view(batch, height, width, channels)
    conv_x = block.conv_block(normed.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    out = _attention_on_map(block, normed, rpi_sa, attn_mask if block.shift_size > 0 else None)
    x = x + block.drop_path(out) + conv_x * block.conv_scale
    return x + block.drop_path(block.mlp(block.norm2(x)))


def enable_shifted_window_attention(model: nn.Module) -> list[str]:
    """Switch every eligible SwinIR / DRCT / HAT block of ``model`` to the forwards above; the names switched.

    The forward is set on the instance (a ``functools.partial``, which pickles and deep-copies
    with the module); the class and every key stay spandrel's.
    """
    names = []
    for name, module in model.named_modules():
        if can_use_shifted_window_attention(module):
            set_forward(module, shifted_hab_forward if type(module) is HAB else shifted_block_forward)
            names.append(name)
    return names


def disable_shifted_window_attention(model: nn.Module) -> list[str]:
    """Give every block switched by :func:`enable_shifted_window_attention` spandrel's forward back; the names."""
    return restore_forwards(model, (shifted_block_forward, shifted_hab_forward))
