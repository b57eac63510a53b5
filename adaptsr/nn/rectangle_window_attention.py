"""DAT's and RGT's rectangle-window attention with its core on adaptsr's backends.

spandrel's DAT ``Spatial_Attention`` and RGT ``WindowAttention`` (RGT's is a copy of DAT's) take
the q, k, v their parent computed, cut them into ``H_sp x W_sp`` windows, and run::

    softmax(q k^T * scale + table[index] + mask[b % nW]) v,    table = pos(rpe_biases)

where ``pos`` is a small MLP over the relative offsets of the window (the dynamic position bias)
and ``index`` the ``relative_position_index`` buffer. That is ``adaptsr.ops.window_attention``
with the MLP's output as the bias table, so the attention matrix need not be materialised (Triton
and CUDA backends) and the torch backend's path runs on the CPU.

These modules hold no adapters (qkv and proj belong to the parent), so nothing is replaced:
``enable_fused_rectangle_attention(model)`` sets each one's ``forward`` to :func:`fused_forward`
(a ``functools.partial`` on the instance, as ``adaptsr.nn.swin_block`` does), and
``disable_fused_rectangle_attention(model)`` gives spandrel's back. Parameters, buffers, keys and
classes stay spandrel's. ``inject_lora`` switches them with the Swin attentions (its
``window_attention`` keyword) and ``merge_lora`` switches them back. A module without the position
bias, or in training with attention dropout, runs spandrel's own forward.
"""

from __future__ import annotations

import torch
from spandrel.architectures.DAT.__arch.DAT import Spatial_Attention as DATSpatialAttention
from spandrel.architectures.DAT.__arch.DAT import windows2img
from spandrel.architectures.RGT.__arch.rgt import WindowAttention as RGTWindowAttention
from torch import nn

from adaptsr.nn._instance_forward import restore_forwards, set_forwards
from adaptsr.ops.window_attention import window_attention

__all__ = [
    "can_fuse_rectangle_attention",
    "disable_fused_rectangle_attention",
    "enable_fused_rectangle_attention",
    "fused_forward",
]

_RECTANGLE_ATTENTIONS = (DATSpatialAttention, RGTWindowAttention)


def can_fuse_rectangle_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a DAT or RGT rectangle-window attention :func:`fused_forward` runs."""
    return type(module) in _RECTANGLE_ATTENTIONS


def fused_forward(
    attn: nn.Module, qkv: torch.Tensor, height: int, width: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """spandrel's ``forward(qkv, H, W, mask=None)`` with the softmax core on adaptsr's backends.

    ``qkv: [3, B, H*W, C]`` of a ``height x width`` map; ``mask: [nW, N, N]`` or None; returns
    ``[B, H, W, C]``.
    """
    if not attn.position_bias or (attn.training and attn.attn_drop.p > 0):
        return type(attn).forward(attn, qkv, height, width, mask)
    q, k, v = (attn.im2win(t, height, width) for t in (qkv[0], qkv[1], qkv[2]))  # [B nW, heads, N, d] each
    table = attn.pos(attn.rpe_biases)  # [(2 H_sp - 1)(2 W_sp - 1), heads]
    out = window_attention(q, k, v, table, attn.relative_position_index, mask, attn.scale)
    windows, heads, n, head_dim = out.shape
    out = out.transpose(1, 2).reshape(windows, n, heads * head_dim)
    return windows2img(out, attn.H_sp, attn.W_sp, height, width)


def enable_fused_rectangle_attention(model: nn.Module, names: set[str] | None = None) -> list[str]:
    """Switch the DAT / RGT rectangle-window attentions of ``model`` (those in ``names``, or all) to
    :func:`fused_forward`; the names switched."""
    return set_forwards(model, can_fuse_rectangle_attention, fused_forward, names)


def disable_fused_rectangle_attention(model: nn.Module) -> list[str]:
    """Give every attention switched by :func:`enable_fused_rectangle_attention` spandrel's forward back; the names."""
    return restore_forwards(model, (fused_forward,))
