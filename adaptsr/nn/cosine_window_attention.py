"""Swin2SR's cosine window attention with its core on adaptsr's backends.

spandrel's Swin2SR ``WindowAttention.forward(x, mask=None)`` (Swin V2's attention) computes::

    softmax(c_h normalize(q) normalize(k)^T + 16 sigmoid(table)[index] + mask[b % nW]) v

with a learned per-head scale ``c_h = exp(min(logit_scale_h, log 100))`` and ``table`` the output of a
small MLP (``cpb_mlp``) over the log-spaced relative coordinates. That is
``adaptsr.ops.window_attention`` with q' = c_h normalize(q), k' = normalize(k), scale 1 and the
table 16 sigmoid(cpb_mlp(coords)) (the sigmoid is elementwise, so it commutes with the gather): on
the Triton backend the attention matrix never reaches memory, and on the CPU the torch backend's
path avoids the subnormal probabilities the shift mask makes (``adaptsr.ops.window_attention``).

The module keeps its qkv and proj, which the swin2sr preset adapts (its qkv weight is read, not
called: a LoRA layer's ``weight`` is the adapted one), so it is not replaced:
``enable_fused_cosine_attention(model)`` sets each one's ``forward`` to :func:`fused_forward` on the
instance (``adaptsr.nn._instance_forward``) and ``disable_fused_cosine_attention(model)`` gives
spandrel's back. ``inject_lora`` switches them with the other attentions (its ``window_attention``
keyword); ``merge_lora`` switches them back. In training with attention dropout the module runs
spandrel's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spandrel.architectures.Swin2SR.__arch.Swin2SR import WindowAttention as Swin2SRWindowAttention
from torch import nn

from adaptsr.nn._instance_forward import restore_forwards, set_forwards
from adaptsr.ops.window_attention import window_attention

__all__ = [
    "can_fuse_cosine_attention",
    "disable_fused_cosine_attention",
    "enable_fused_cosine_attention",
    "fused_forward",
]

# spandrel's clamp of the learned logit scale, at most 1 / 0.01: its log computed in float32, as spandrel's
# torch.log(torch.tensor(1.0 / 0.01)) is (math.log(100) differs in the 8th digit, which a clamped scale of 100
# carries into the logits)
_MAX_LOG_SCALE = float(torch.log(torch.tensor(1.0 / 0.01, dtype=torch.float32)))


def can_fuse_cosine_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a Swin2SR cosine window attention :func:`fused_forward` runs."""
    return type(module) is Swin2SRWindowAttention


def fused_forward(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """spandrel's ``forward(x, mask=None)`` with the softmax core on adaptsr's backends.

    ``x: [B_, N, C]`` window tokens; ``mask: [nW, N, N]`` or None; returns ``[B_, N, C]``.
    """
    if attn.training and attn.attn_drop.p > 0:
        return type(attn).forward(attn, x, mask)
    batch_windows, n, channels = x.shape
    qkv_bias = None
    if attn.q_bias is not None:  # no bias on k, as spandrel's
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(batch_windows, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logit_scale = torch.clamp(attn.logit_scale, max=_MAX_LOG_SCALE).exp()  # [heads, 1, 1]
    q = F.normalize(q, dim=-1) * logit_scale
    k = F.normalize(k, dim=-1)
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
    out = window_attention(q, k, v, table, attn.relative_position_index, mask, 1.0)
    out = out.transpose(1, 2).reshape(batch_windows, n, channels)
    return attn.proj_drop(attn.proj(out))


def enable_fused_cosine_attention(model: nn.Module, names: set[str] | None = None) -> list[str]:
    """Switch the Swin2SR window attentions of ``model`` (those in ``names``, or all) to :func:`fused_forward`;
    the names switched."""
    return set_forwards(model, can_fuse_cosine_attention, fused_forward, names)


def disable_fused_cosine_attention(model: nn.Module) -> list[str]:
    """Give every attention switched by :func:`enable_fused_cosine_attention` spandrel's forward back; the names."""
    return restore_forwards(model, (fused_forward,))
