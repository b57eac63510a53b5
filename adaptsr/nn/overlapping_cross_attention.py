"""HAT's overlapping cross-attention block (OCAB) with its attention core on adaptsr's backends.

spandrel's HAT ``OCAB.forward(x, x_size, rpi)`` takes the queries from ``w x w`` windows and the
keys and values from the overlapping ``ow x ow`` windows around them (``ow = w + overlap_ratio w``;
``nn.Unfold``, zero-padded at the image border) and runs::

    softmax(q k^T * scale + table[rpi]) v        (N = w^2 queries, N_k = ow^2 keys per window)

then ``proj``, the residual and the MLP. That core is ``adaptsr.ops.window_attention`` with more
keys than queries: on the Triton backend the ``N x N_k`` scores (256 x 576 per head for HAT's
16 x 16 windows) never reach memory, and the torch backend's CPU path runs instead of the eager
matmuls. Here k and v go to the op as strided views of the unfolded map for a batch of one image
(for more, one reshape copy each, merging the batch and window dimensions), where spandrel copies
them into a new layout first.

The block owns its qkv and proj, which the hat preset adapts, and nothing else changes, so it is
not replaced: ``enable_fused_overlapping_attention(model)`` sets each block's ``forward`` to
:func:`fused_forward` on the instance (``adaptsr.nn._instance_forward``) and
``disable_fused_overlapping_attention(model)`` gives spandrel's back. ``inject_lora`` switches
them with the other attentions (its ``window_attention`` keyword); ``merge_lora`` switches them
back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spandrel.architectures.HAT.__arch.HAT import OCAB, window_reverse
from torch import nn

from adaptsr.nn._instance_forward import restore_forwards, set_forwards
from adaptsr.ops.window_attention import window_attention

__all__ = [
    "can_fuse_overlapping_attention",
    "disable_fused_overlapping_attention",
    "enable_fused_overlapping_attention",
    "fused_forward",
]


def can_fuse_overlapping_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a HAT overlapping cross-attention block :func:`fused_forward` runs."""
    return type(module) is OCAB


def fused_forward(block: nn.Module, x: torch.Tensor, x_size: tuple[int, int], rpi: torch.Tensor) -> torch.Tensor:
    """spandrel's ``OCAB.forward(x, x_size, rpi)`` with the softmax core on adaptsr's backends.

    ``x: [B, H*W, C]`` tokens of an ``H x W`` map (multiples of the window size); ``rpi: [N, N_k]``, the
    model's ``relative_position_index_OCA``; returns ``[B, H*W, C]``.
    """
    height, width = x_size
    batch, _, channels = x.shape
    window, overlap, heads = block.window_size, block.overlap_win_size, block.num_heads
    head_dim = channels // heads
    shortcut = x
    qkv = block.qkv(block.norm1(x).view(batch, height, width, channels))  # [B, H, W, 3C]

    # -- queries: w x w windows, [B nW, heads, N, d] (one copy, as spandrel's window_partition) --
    q = qkv[..., :channels].reshape(batch, height // window, window, width // window, window, heads, head_dim)
    q = q.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, window * window, head_dim)

    # -- keys, values: the ow x ow windows around them; unfold's rows are (k|v, head, d, offset) --
    kv = F.unfold(qkv[..., channels:].permute(0, 3, 1, 2), kernel_size=overlap, stride=window,
                  padding=(overlap - window) // 2)  # [B, 2C ow^2, nW]
    kv = kv.view(batch, 2, heads, head_dim, overlap * overlap, -1).permute(1, 0, 5, 2, 4, 3)
    k, v = kv.reshape(2, -1, heads, overlap * overlap, head_dim).unbind(0)  # [B nW, heads, N_k, d] each

    out = window_attention(q, k, v, block.relative_position_bias_table, rpi, None, block.scale)
    out = out.transpose(1, 2).reshape(-1, window, window, channels)
    x = window_reverse(out, window, height, width).view(batch, height * width, channels)
    x = block.proj(x) + shortcut
    return x + block.mlp(block.norm2(x))


def enable_fused_overlapping_attention(model: nn.Module, names: set[str] | None = None) -> list[str]:
    """Switch the HAT overlapping cross-attention blocks of ``model`` (those in ``names``, or all) to
    :func:`fused_forward`; the names switched."""
    return set_forwards(model, can_fuse_overlapping_attention, fused_forward, names)


def disable_fused_overlapping_attention(model: nn.Module) -> list[str]:
    """Give every block switched by :func:`enable_fused_overlapping_attention` spandrel's forward back; the names."""
    return restore_forwards(model, (fused_forward,))
