r"""Swin (shifted-)window attention of a whole block, on the un-partitioned feature map.

A Swin block rolls its normed map by ``-shift``, cuts it into ``ws x ws`` windows, runs window
attention, pastes the windows back and rolls by ``+shift``: four full copies of the activations
(and four more in the backward). The qkv linear before the attention and proj after it are
position-wise, so they commute with all of that. This op takes the qkv linear's output on the
original map and returns the attention output on the original map, finding each window's tokens
by index arithmetic.

Shapes: ``qkv: [B, H, W, 3C]`` (q, k, v in channels ``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``, head
``h`` at ``h d .. h d + d``, Swin's order); returns ``out: [B, H, W, C]``, heads concatenated, what
spandrel's block has after ``window_reverse`` and the roll back (before ``proj``). H and W are
multiples of ``ws``; ``0 <= shift < ws``; ``nW = (H / ws)(W / ws)`` windows per image, ``N = ws^2``
tokens per window. The bias table ``[(2ws-1)^2, heads]``, ``index [N, N]`` and scale as in
``adaptsr.ops.window_attention``; ``mask: [nW, N, N]`` (the block's shift mask) or None.

Index map: window ``b = n nW + wh (W / ws) + ww`` (image n, window row wh, column ww, spandrel's
window_partition order), token ``t = i ws + j``::

    pix(b, t) = ((wh ws + i + shift) mod H, (ww ws + j + shift) mod W)

a bijection from (window, token) onto the pixels of image n (``torch.roll(x, -shift)[wh ws + i,
ww ws + j] = x[pix]``).

Forward (for every window b, head h, token t)::

    q_b[h, t] = qkv[n, pix(b, t), h d : h d + d]        k_b, v_b likewise at C + h d, 2C + h d
    o_b       = softmax(q_b k_b^T * scale + table[index][h] + mask[b mod nW]) v_b
    out[n, pix(b, t), h d : h d + d] = o_b[h, t]

Backward (``dout = dL/dout``; the window-attention backward of ``adaptsr.ops.window_attention``
on each window)::

    do_b[h, t] = dout[n, pix(b, t), h d : h d + d]
    dq_b, dk_b, dv_b, dbias = window_attention backward of (q_b, k_b, v_b, do_b)
    dqkv[n, pix(b, t), :] = [dq_b | dk_b | dv_b][h, t]    (pix is a bijection: no sums)
    dtable[u, h] = sum over (i, j) with index[i, j] = u of dbias[h, i, j]; the mask gets none.

Backends:

- reference: ``shifted_window_attention_ref``, spandrel's eager path: roll, window_partition,
  ``window_attention_ref``, window_reverse, roll back. The oracle.
- torch (and cuda, whose fused core is ``window_attention``'s): one ``index_select`` of the qkv
  rows into window order (one copy of qkv, instead of the roll and the partition), the
  ``window_attention`` op, one ``index_select`` back into the map. The backward of each
  ``index_select`` is another ``index_select`` with the inverse permutation: no scatter, so it is
  deterministic and as fast as the forward.
- triton: the window-attention kernels reading q, k, v and writing o (dq, dk, dv) at ``pix``
  (``adaptsr.kernels.shifted_window_attention``): no copy at all.
"""

from __future__ import annotations

import functools

import torch

from adaptsr.backend import resolve
from adaptsr.ops.window_attention import _fused_takes, _gather_bias, window_attention, window_attention_ref

__all__ = ["shifted_window_attention", "shifted_window_attention_ref"]


def _partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """spandrel's ``window_partition``: ``[B, H, W, C]`` -> ``[B nW, N, C]``."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def _reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """spandrel's ``window_reverse``: ``[B nW, N, C]`` -> ``[B, H, W, C]``."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def _split_heads(windows: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B_, N, 3C]`` -> q, k, v ``[B_, heads, N, d]`` (views), as Swin's WindowAttention splits them."""
    batch_windows, n, three_c = windows.shape
    d = three_c // (3 * num_heads)
    return windows.view(batch_windows, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``[B_, heads, N, d]`` -> ``[B_, N, heads d]``."""
    batch_windows, heads, n, d = o.shape
    return o.transpose(1, 2).reshape(batch_windows, n, heads * d)


def shifted_window_attention_ref(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> torch.Tensor:
    """The oracle: spandrel's eager block path (roll, partition, attention, reverse, roll back) in qkv's dtype."""
    _, height, width, _ = qkv.shape
    if shift_size:
        qkv = torch.roll(qkv, shifts=(-shift_size, -shift_size), dims=(1, 2))
    q, k, v = _split_heads(_partition(qkv, window_size), num_heads)
    o = window_attention_ref(q, k, v, bias_table, index, mask, scale)
    out = _reverse(_merge_heads(o), window_size, height, width)
    if shift_size:
        out = torch.roll(out, shifts=(shift_size, shift_size), dims=(1, 2))
    return out


# -- host helpers --


def _check_inputs(qkv, bias_table, index, mask, window_size, shift_size, num_heads) -> None:
    """A ValueError that names the shapes when the arguments do not fit together.

    The attention-core arguments (table, index, dtypes, devices) are checked again by
    ``window_attention`` on the paths that call it; what is checked here is the map's geometry.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"shifted_window_attention: qkv must be a [B, H, W, 3C] tensor, got {got}")
    if not qkv.is_floating_point():
        raise ValueError(f"shifted_window_attention: qkv must be a floating tensor, got {qkv.dtype}")
    _, height, width, three_c = qkv.shape
    if not isinstance(num_heads, int) or num_heads < 1 or three_c % (3 * num_heads):
        raise ValueError(
            f"shifted_window_attention: qkv's last dim must be 3C with C divisible by num_heads = {num_heads}, "
            f"got qkv {tuple(qkv.shape)}"
        )
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"shifted_window_attention: window_size must be a positive int, got {window_size!r}")
    if height % window_size or width % window_size:
        raise ValueError(
            f"shifted_window_attention: H x W = {height} x {width} (qkv {tuple(qkv.shape)}) is not a multiple of "
            f"the window size {window_size}; pad the map to a multiple first (spandrel's SwinIR check_image_size "
            "does)"
        )
    if not isinstance(shift_size, int) or not 0 <= shift_size < window_size:
        raise ValueError(f"shifted_window_attention: shift_size must be in [0, {window_size}), got {shift_size!r}")
    n = window_size * window_size
    windows = (height // window_size) * (width // window_size)
    if bias_table.dim() != 2 or bias_table.shape != ((2 * window_size - 1) ** 2, num_heads):
        raise ValueError(
            f"shifted_window_attention: bias_table must be [(2ws-1)^2, heads] = "
            f"{((2 * window_size - 1) ** 2, num_heads)}, got {tuple(bias_table.shape)}"
        )
    if index.numel() != n * n:
        raise ValueError(
            f"shifted_window_attention: index must be [N, N] = {(n, n)} for window {window_size}, "
            f"got {tuple(index.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (windows, n, n):
        raise ValueError(
            f"shifted_window_attention: mask must be [nW, N, N] = {(windows, n, n)}, one per window of the "
            f"{height} x {width} map (window {window_size}), got {tuple(mask.shape)}; a mask built for another "
            "resolution does not fit"
        )


@functools.lru_cache(maxsize=32)
def _token_maps(height: int, width: int, window_size: int, shift_size: int, device: torch.device):
    """``(to_windows, to_map)``: ``to_windows[w N + t] = pix(w, t)`` as a flat pixel index
    (y W + x) for the nW windows of one image, and its inverse permutation ``to_map``."""
    starts_y = torch.arange(0, height, window_size, device=device)
    starts_x = torch.arange(0, width, window_size, device=device)
    offs = torch.arange(window_size, device=device)
    y = (starts_y[:, None] + offs[None, :] + shift_size) % height  # [H / ws, ws]: (wh, i)
    x = (starts_x[:, None] + offs[None, :] + shift_size) % width  # [W / ws, ws]: (ww, j)
    to_windows = (y[:, None, :, None] * width + x[None, :, None, :]).reshape(-1)  # (wh, ww, i, j)
    to_map = torch.empty_like(to_windows)
    to_map[to_windows] = torch.arange(to_windows.numel(), device=device)
    return to_windows, to_map


class _PermuteTokens(torch.autograd.Function):
    """``x[:, order]`` along dim 1 (a permutation of the tokens); the backward gathers with ``inverse``."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return torch.index_select(x, 1, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.index_select(grad, 1, inverse), None, None


def _gathered_window_attention(qkv, bias_table, index, mask, scale, window_size, shift_size, num_heads):
    """The torch (and cuda) path: rows into window order, the ``window_attention`` op, rows back."""
    batch, height, width, three_c = qkv.shape
    # Under torch.compile the maps are traced into the graph (a few aranges) instead of cached: Dynamo
    # would skip the lru_cache anyway, with a warning about silent incorrectness for every user who compiles.
    token_maps = _token_maps.__wrapped__ if torch.compiler.is_compiling() else _token_maps
    to_windows, to_map = token_maps(height, width, window_size, shift_size, qkv.device)
    n = window_size * window_size
    # [B, H W, 3C] -> [B, nW N, 3C] = [B nW, N, 3C]: the layout spandrel's qkv linear produces
    windows = _PermuteTokens.apply(qkv.reshape(batch, height * width, three_c), to_windows, to_map)
    q, k, v = _split_heads(windows.view(-1, n, three_c), num_heads)
    o = _merge_heads(window_attention(q, k, v, bias_table, index, mask, scale))
    out = _PermuteTokens.apply(o.view(batch, height * width, -1), to_map, to_windows)
    return out.view(batch, height, width, -1)


# -- the triton backend --


class _FusedShiftedWindowAttention(torch.autograd.Function):
    """The kernels' forward (out, lse) and backward (dqkv, dbias) on the map itself.

    ``bias``: float32 contiguous ``[heads, N, N]``; ``mask``: float32 ``[nW, N, N]`` or None.
    """

    @staticmethod
    def forward(ctx, qkv, bias, mask, scale, window_size, shift_size, num_heads):
        from adaptsr.kernels.shifted_window_attention import shifted_window_attention_fwd

        out, lse = shifted_window_attention_fwd(qkv, bias, mask, scale, window_size, shift_size, num_heads)
        ctx.save_for_backward(qkv, out, lse, bias, mask)
        ctx.geometry = (scale, window_size, shift_size, num_heads)
        return out

    @staticmethod
    def backward(ctx, dout):
        from adaptsr.kernels.shifted_window_attention import shifted_window_attention_bwd

        qkv, out, lse, bias, mask = ctx.saved_tensors
        need_bias = ctx.needs_input_grad[1]
        dqkv, dbias = shifted_window_attention_bwd(dout, qkv, out, lse, bias, mask, *ctx.geometry, need_bias)
        return dqkv, dbias, None, None, None, None, None


def _fused_shifted_window_attention(qkv, bias_table, index, mask, scale, window_size, shift_size, num_heads):
    # Under autocast the kernels run in autocast's dtype (float64 stays, and is refused by the kernels).
    device_type = qkv.device.type
    autocast = torch.is_autocast_enabled(device_type) and qkv.dtype != torch.float64
    dtype = torch.get_autocast_dtype(device_type) if autocast else qkv.dtype
    with torch.autocast(device_type, enabled=False):
        # the gathered bias as float32 [heads, N, N]; autograd carries dbias back to the table
        bias = _gather_bias(bias_table, index, window_size * window_size).to(torch.float32).contiguous()
        mask32 = None if mask is None else mask.to(torch.float32).contiguous()
        return _FusedShiftedWindowAttention.apply(qkv.to(dtype), bias, mask32, scale, window_size, shift_size,
                                                  num_heads)


# -- functional entry point --


def shifted_window_attention(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> torch.Tensor:
    """Swin's W-MSA / SW-MSA core on the un-partitioned map, on the selected backend.

    qkv ``[B, H, W, 3C]`` (the qkv linear on the normed, un-rolled map); bias_table
    ``[(2ws-1)^2, heads]``; index ``[N, N]`` (or flat); mask ``[nW, N, N]`` or None. Returns
    ``[B, H, W, C]`` in qkv's dtype (autocast's under autocast): spandrel's
    ``roll(window_reverse(attn(window_partition(roll(x, -shift)))), +shift)`` before ``proj``.
    Gradients reach qkv and the table; the mask is a constant.
    """
    _check_inputs(qkv, bias_table, index, mask, window_size, shift_size, num_heads)
    if mask is not None:
        mask = mask.detach()
    scale = float(scale)
    n, head_dim = window_size * window_size, qkv.shape[-1] // (3 * num_heads)
    args = (qkv, bias_table, index, mask, scale, window_size, shift_size, num_heads)
    backend = resolve(
        qkv.device, "shifted_window_attention", lambda name: _fused_takes(name, qkv.dtype, n, head_dim),
        call=(shifted_window_attention, args),
    )
    if backend == "reference":
        return shifted_window_attention_ref(*args)
    if backend in ("torch", "cuda"):
        return _gathered_window_attention(*args)
    if backend == "triton":
        return _fused_shifted_window_attention(*args)
    raise NotImplementedError(f"shifted_window_attention has no {backend!r} backend")
