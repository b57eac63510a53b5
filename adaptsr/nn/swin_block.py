"""Opt-in: spandrel SwinIR blocks that run their attention on the un-partitioned map.

spandrel's ``SwinTransformerBlock.forward`` rolls the normed map, partitions it into windows,
runs ``WindowAttention`` (qkv, attention core, proj) on the windows, pastes them back and rolls
back: four full copies of the activations, four more in the backward. qkv and proj are
position-wise, so the block can apply them on the map itself and leave the rest to
``adaptsr.ops.shifted_window_attention``, which finds each window's tokens by index arithmetic::

    x -> norm1 -> attn.qkv -> shifted_window_attention -> attn.proj -> + shortcut -> MLP half

``enable_shifted_window_attention(model)`` switches every eligible block of a model (a SwinIR
``SwinTransformerBlock`` whose ``attn`` is spandrel's ``WindowAttention`` or a SwinIR
``LoRAWindowAttention``) to that forward; ``disable_shifted_window_attention(model)`` switches
them back. Only the blocks' ``forward`` changes: parameters, buffers, state-dict keys and the
blocks' classes stay spandrel's, so merging, saving and loading are unaffected. ``qkv`` and
``proj`` are whatever modules they are (``LoRALinear`` after ``inject_lora``: their merged-weight
forward and LoRA dropout apply as usual). A block in training with attention dropout falls back
to spandrel's forward (the op has no dropout on the attention weights).
"""

from __future__ import annotations

import functools

import torch
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinTransformerBlock
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention as SwinIRWindowAttention
from torch import nn

from adaptsr.nn.lora_window_attention import LoRAWindowAttention
from adaptsr.ops.shifted_window_attention import shifted_window_attention

__all__ = [
    "can_use_shifted_window_attention",
    "disable_shifted_window_attention",
    "enable_shifted_window_attention",
    "shifted_block_forward",
]


def can_use_shifted_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a SwinIR block whose attention this forward knows how to run."""
    if type(module) is not SwinTransformerBlock:
        return False
    attn = module.attn
    return type(attn) is SwinIRWindowAttention or (
        isinstance(attn, LoRAWindowAttention) and attn.original_type is SwinIRWindowAttention
    )


def shifted_block_forward(block: SwinTransformerBlock, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """spandrel's ``SwinTransformerBlock.forward(x, x_size)`` without the roll / partition copies.

    ``x: [B, H*W, C]`` tokens of an ``x_size = (H, W)`` map; returns the block's output, same shape.
    """
    attn = block.attn
    if attn.training and attn.attn_drop.p > 0:
        return SwinTransformerBlock.forward(block, x, x_size)
    height, width = x_size
    batch, _, channels = x.shape
    shortcut = x
    # the mask as spandrel picks it: the cached buffer at the build resolution, else rebuilt
    if block.input_resolution == x_size:
        mask = block.attn_mask
    else:
        mask = block.calculate_mask(x_size).to(x.device)
    qkv = attn.qkv(block.norm1(x).view(batch, height, width, channels))
    out = shifted_window_attention(qkv, attn.relative_position_bias_table, attn.relative_position_index, mask,
                                   attn.scale, block.window_size, block.shift_size, attn.num_heads)
    out = attn.proj_drop(attn.proj(out)).view(batch, height * width, channels)
    x = shortcut + block.drop_path(out)
    return x + block.drop_path(block.mlp(block.norm2(x)))


def enable_shifted_window_attention(model: nn.Module) -> list[str]:
    """Switch every eligible SwinIR block of ``model`` to :func:`shifted_block_forward`; the names switched.

    The forward is set on the instance (a ``functools.partial``, which pickles and deep-copies
    with the module); the class and every key stay spandrel's.
    """
    names = []
    for name, module in model.named_modules():
        if can_use_shifted_window_attention(module):
            module.forward = functools.partial(shifted_block_forward, module)
            names.append(name)
    return names


def disable_shifted_window_attention(model: nn.Module) -> list[str]:
    """Give every block switched by :func:`enable_shifted_window_attention` spandrel's forward back; the names."""
    names = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is shifted_block_forward:
            del module.forward
            names.append(name)
    return names
