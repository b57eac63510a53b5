r"""Swin window attention with the qkv projection fused in: the single pass.

Shapes: ``x: [B_, N, C]`` window tokens, ``w_qkv: [3C, C]`` (the LoRA-merged qkv weight),
``b_qkv: [3C]`` or None; the bias table, index, mask and scale as in
``adaptsr.ops.window_attention``. Returns the attention output ``[B_, N, C]``, heads concatenated
(what Swin's ``proj`` takes).

Forward::

    q, k, v = split(x w_qkv^T + b_qkv)      reshaped as (B_, N, 3, heads, d), Swin's order
    o       = window_attention(q, k, v, bias_table, index, mask, scale)

Backward (``do = dL/do``; ``dq, dk, dv`` from the window-attention backward)::

    dqkv   = stack(dq, dk, dv) in the same (B_, N, 3, heads, d) layout
    dx     = dqkv w_qkv
    dw_qkv = dqkv^T x                        (summed over every token)
    db_qkv = sum over tokens of dqkv

With LoRA the caller forms ``w_qkv = W + s B A`` differentiably, so autograd carries ``dw_qkv``
to the adapters (``dA = s B^T dw_qkv``, ``dB = s dw_qkv A^T``): the full-weight-gradient form.

Backends:

- reference / torch / cuda: the two steps, ``F.linear`` then ``window_attention`` (q, k, v are
  written to memory and read back).
- triton: one kernel per (window, head) projects the window's k, v and each query tile's q in
  registers from x, so q, k, v never reach device memory (float32 windows of more than 64 tokens excepted:
  those go through memory, see the kernel's ``_QKV_MAX_FP32_TOKENS``); the backward recomputes them with one
  matmul (``adaptsr.kernels.window_attention.qkv_window_attention_bwd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptsr.backend import resolve
from adaptsr.ops.window_attention import _fused_takes, _gather_bias, window_attention

__all__ = ["qkv_window_attention"]


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch_windows, n, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    return qkv.reshape(batch_windows, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _two_step(x, w_qkv, b_qkv, num_heads, bias_table, index, mask, scale) -> torch.Tensor:
    q, k, v = _split_heads(F.linear(x, w_qkv, b_qkv), num_heads)
    o = window_attention(q, k, v, bias_table, index, mask, scale)
    return o.transpose(1, 2).reshape(x.shape)


class _FusedQKVWindowAttention(torch.autograd.Function):
    """The Triton single pass: forward from x and the weight; backward recomputes q, k, v."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, bias, mask, num_heads, scale):
        from adaptsr.kernels.window_attention import qkv_window_attention_fwd

        o, lse = qkv_window_attention_fwd(x, w_qkv, b_qkv, num_heads, bias, mask, scale)
        ctx.save_for_backward(x, w_qkv, b_qkv, o, lse, bias, mask)
        ctx.num_heads, ctx.scale = num_heads, scale
        return o

    @staticmethod
    def backward(ctx, do):
        from adaptsr.kernels.window_attention import qkv_window_attention_bwd

        x, w_qkv, b_qkv, o, lse, bias, mask = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[3]
        dx, dw, db, dbias = qkv_window_attention_bwd(
            do.contiguous(), x, w_qkv, b_qkv, ctx.num_heads, o, lse, bias, mask, ctx.scale, need_bias
        )
        return dx, dw, db, dbias, None, None, None


def qkv_window_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    num_heads: int,
    bias_table: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``window_attention(split(x w_qkv^T + b_qkv))`` heads concatenated, on the selected backend."""
    if x.dim() != 3 or w_qkv.shape != (3 * x.shape[-1], x.shape[-1]) or x.shape[-1] % num_heads:
        raise ValueError(
            f"qkv_window_attention: x must be [B_, N, C] with C divisible by {num_heads} heads and w_qkv "
            f"[3C, C]; got x {tuple(x.shape)}, w_qkv {tuple(w_qkv.shape)}"
        )
    n, head_dim = x.shape[1], x.shape[-1] // num_heads
    if resolve(x.device, "window_attention", lambda name: _fused_takes(name, x.dtype, n, head_dim)) != "triton":
        return _two_step(x, w_qkv, b_qkv, num_heads, bias_table, index, mask, scale)
    # Under autocast the kernel runs in autocast's dtype, as the F.linear of the two steps would.
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        bias = _gather_bias(bias_table, index, x.shape[1]).to(torch.float32).contiguous()
        mask32 = None if mask is None else mask.detach().to(torch.float32).contiguous()
        x, w = x.to(dtype), w_qkv.to(dtype)
        b = None if b_qkv is None else b_qkv.to(dtype)
        return _FusedQKVWindowAttention.apply(x, w, b, bias, mask32, num_heads, float(scale))
