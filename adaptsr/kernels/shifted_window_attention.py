r"""Triton launchers: Swin (shifted-)window attention read from and written to the un-partitioned map.

The window-attention kernels of ``adaptsr.kernels.window_attention`` with their token rows found by
index arithmetic (``_token_rows`` with ``SPATIAL``) instead of in a rolled, partitioned copy. For
image ``n``, window ``(wh, ww)`` (window ``b = n nW + wh (W / ws) + ww``) and token ``(i, j)``::

    pix(b, i, j) = ((wh ws + i + shift) mod H, (ww ws + j + shift) mod W)

q, k, v of the token are read at ``pix`` of the qkv linear's ``[B, H, W, 3C]`` output (channels
``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``, head h at ``h d``), and o is written at ``pix`` of a
``[B, H, W, C]`` output; the backward reads dout there and writes dq, dk, dv into one
``[B, H, W, 3C]`` dqkv. ``pix`` is a bijection onto the pixels, so every output entry is written
exactly once: torch.roll, window_partition, window_reverse and the roll back (two copies of the
activations each way, and their backward copies) disappear. lse stays per window,
``[B nW, heads, N]``; dbias is reduced as in the windowed kernels (deterministic).
"""

from __future__ import annotations

import torch

from adaptsr.kernels import window_attention as _wa

__all__ = ["shifted_window_attention_bwd", "shifted_window_attention_fwd"]


def _check_geometry(qkv, window_size: int, shift_size: int, num_heads: int) -> tuple[int, int, int, int, int]:
    """(B, H, W, C, d) after checking qkv and the window geometry; ValueError says what is wrong."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"shifted window attention (triton): qkv must be a [B, H, W, 3C] tensor, got {got}")
    batch, height, width, three_c = qkv.shape
    if qkv.dtype not in _wa._DTYPES:
        raise ValueError(
            f"shifted window attention (triton): qkv must be float32/float16/bfloat16, got {qkv.dtype} "
            "(use the torch backend for other dtypes)"
        )
    _wa._check_device("qkv", qkv)
    if num_heads < 1 or three_c % (3 * num_heads):
        raise ValueError(
            f"shifted window attention (triton): qkv's last dim {three_c} is not 3 x C with C divisible by "
            f"num_heads = {num_heads}"
        )
    if window_size < 1 or height % window_size or width % window_size:
        raise ValueError(
            f"shifted window attention (triton): H x W = {height} x {width} is not a multiple of the window "
            f"size {window_size}; pad the map first (as spandrel's check_image_size does)"
        )
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shifted window attention (triton): shift {shift_size} not in [0, window {window_size})")
    if min(batch, height, width) == 0:
        raise ValueError(f"shifted window attention (triton): empty input of shape {tuple(qkv.shape)}")
    channels = three_c // 3
    d = channels // num_heads
    if d > _wa._MAX_HEAD_DIM:
        raise ValueError(
            f"shifted window attention (triton): head dim {d} > {_wa._MAX_HEAD_DIM} is not supported (registers "
            "would spill); use the torch backend"
        )
    return batch, height, width, channels, d


def _check_mask(mask, windows: int, n: int) -> None:
    """Stricter than the windowed kernels: the mask is the block's own, one per window of the map."""
    if mask is not None and (mask.dim() != 3 or mask.shape[0] != windows):
        raise ValueError(
            f"shifted window attention (triton): mask must be [nW, N, N] = {(windows, n, n)} (one per window of "
            f"the map), got {tuple(mask.shape)}"
        )


def _heads_view(t: torch.Tensor, batch: int, pixels: int, heads: int, d: int) -> torch.Tensor:
    """``[B, H, W, C]`` (any strides) -> ``[B, heads, H*W, d]``, the kernels' (slot, head, row, col)
    order; a view when H and W merge, else one copy."""
    return t.reshape(batch, pixels, heads, d).permute(0, 2, 1, 3)


def _qkv_views(qkv: torch.Tensor, heads: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, height, width, _ = qkv.shape
    return qkv.reshape(batch, height * width, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def shifted_window_attention_fwd(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    window_size: int,
    shift_size: int,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window attention of every (shifted) window of the map, read from and written to the map; no autograd.

    qkv: ``[B, H, W, 3C]``; bias: float32 ``[heads, N, N]`` or None; mask: float32 ``[nW, N, N]``
    or None (N = ws^2, nW = H W / ws^2). Returns out ``[B, H, W, C]`` in qkv's dtype, un-rolled and
    un-partitioned, and lse ``[B nW, heads, N]`` float32.
    """
    batch, height, width, channels, d = _check_geometry(qkv, window_size, shift_size, num_heads)
    heads, n = num_heads, window_size * window_size
    windows = (height // window_size) * (width // window_size)
    _check_mask(mask, windows, n)
    _wa._check_bias_mask(bias, mask, batch * windows, heads, n, qkv.device)
    q, k, v = _qkv_views(qkv, heads, d)
    out = _wa._alloc((batch, height, width, channels), qkv.dtype, qkv.device)
    lse = _wa._alloc((batch * windows, heads, n), torch.float32, qkv.device)
    token_map = _wa._TokenMap(True, window_size, shift_size, height, width)
    _wa._window_attention_fwd_into(q, k, v, bias, mask, scale, _heads_view(out, batch, height * width, heads, d), lse,
                                   token_map)
    return out, lse


def shifted_window_attention_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    window_size: int,
    shift_size: int,
    num_heads: int,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dqkv ``[B, H, W, 3C]`` (qkv's dtype) and, when ``need_dbias``, dbias (float32 ``[heads, N, N]``,
    summed over every window, deterministic); no autograd.

    ``out`` and ``lse`` are the outputs of :func:`shifted_window_attention_fwd` for the same inputs.
    """
    batch, height, width, channels, d = _check_geometry(qkv, window_size, shift_size, num_heads)
    heads, n = num_heads, window_size * window_size
    windows = (height // window_size) * (width // window_size)
    _check_mask(mask, windows, n)
    _wa._check_bias_mask(bias, mask, batch * windows, heads, n, qkv.device)
    expected = (batch, height, width, channels)
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != expected or t.dtype != qkv.dtype or t.device != qkv.device:
            raise ValueError(
                f"shifted window attention (triton) backward: {name} must be {qkv.dtype} {expected} on "
                f"{qkv.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if tuple(lse.shape) != (batch * windows, heads, n) or lse.dtype != torch.float32:
        raise ValueError(
            f"shifted window attention (triton) backward: lse must be the forward's float32 "
            f"{(batch * windows, heads, n)}, got {lse.dtype} {tuple(lse.shape)}"
        )
    if need_dbias and bias is None:
        raise ValueError("shifted window attention (triton) backward: need_dbias=True but no bias was given")
    q, k, v = _qkv_views(qkv, heads, d)
    dqkv = _wa._alloc(tuple(qkv.shape), qkv.dtype, qkv.device)
    dq, dk, dv = _qkv_views(dqkv, heads, d)
    pixels = height * width
    token_map = _wa._TokenMap(True, window_size, shift_size, height, width)
    dbias = _wa._window_attention_bwd_into(
        _heads_view(dout, batch, pixels, heads, d), q, k, v, _heads_view(out, batch, pixels, heads, d), lse,
        bias, mask, scale, need_dbias, dq, dk, dv, token_map,
    )
    return dqkv, dbias
