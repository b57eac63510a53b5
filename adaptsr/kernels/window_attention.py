r"""Triton kernels: fused Swin window attention, forward and backward, flash-attention style.

For one window b and head h, with ``N`` tokens, head dimension ``d`` and ``w = b mod nW``::

    S = q k^T * scale + bias[h] + mask[w]          (logits, N x N)
    lse_i = log sum_j exp(S_ij)                    (saved by the forward)
    P = exp(S - lse)                               (softmax of each row)
    o = P v

and, given do = dL/do::

    D_i   = sum_c do_ic o_ic                       (= sum_j P_ij dP_ij)
    dP    = do v^T
    dS    = P * (dP - D)                           (dL/dS, the gradient of the logits)
    dv    = P^T do
    dq    = scale * dS k
    dk    = scale * dS^T q
    dbias[h] = sum_b dS                            (summed over every window)

Keys may come from larger windows than the queries (HAT's overlapping cross-attention: ``N_K``
keys per window, ``N`` queries; bias ``[heads, N, N_K]``); the kernels tile the two lengths
separately. The N x N_K matrices (S, P, dP, dS) only ever live in registers: the forward keeps a running
maximum and row sum over key tiles (online softmax) and saves the logsumexp; the backward
recomputes P from it. Logits are kept in base 2 inside the kernels (``exp2`` is the native
instruction): ``S * log2(e)``; the saved ``lse`` is in natural log.

Programs and reductions (no atomics anywhere, so every result is bitwise reproducible):

- forward: one program per (window, head, query tile of BLOCK_M rows), looping over key tiles.
- backward: one program per (window group, head, tile index t); for each window of its group it
  accumulates dk, dv of key tile t over the query tiles. When the whole window is one tile
  (N, N_K <= 32) the same pass also writes dq and accumulates dbias over the group's windows in
  registers. Otherwise (windows 8 and 16: 2 x 2 and 8 x 8 tiles of 32) the program then computes
  dq of query tile t (square tiles, the flash-attention-2 split; with more key tiles than query
  tiles the programs past the last query tile skip this), and a third kernel owns one
  (head, query tile, key tile) of dbias per window group.
- dbias: each window group writes one float32 partial ``[heads, N, N_K]``; the host sums the
  partials over groups (a torch reduction over a fixed shape: deterministic).

Token rows: the kernels find the rows of window b through ``_token_rows``. By default windows
are stored one after another (``[B_, heads, N, d]``); with ``SPATIAL`` (``_TokenMap``) the rows
are pixels of Swin's un-partitioned ``[B, H*W, ...]`` map, the cyclic shift applied by index
arithmetic, so a block needs no roll / partition / reverse copies
(``adaptsr.kernels.shifted_window_attention``). lse and the dbias partials stay per window.

``qkv_window_attention_fwd`` is the single pass the package is named for: the program projects
k and v of its whole window from the window's x tile and the LoRA-merged ``W_qkv`` into registers,
then each query tile's q, so q, k and v never reach device memory (16-bit windows, and float32 windows of at most
``_QKV_MAX_FP32_TOKENS`` tokens; longer float32 windows project q, k, v with torch and run the tiled forward).
Its backward recomputes q, k, v with one torch matmul and runs the backward kernels above.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from adaptsr.ops._tf32 import matmul_allows_tf32

# Triton's CPU interpreter (TRITON_INTERPRET=1): slow per operation, so the tiled path uses
# smaller tiles there; and its bf16 tl.dot gives wrong results, so bf16 dot operands are upcast
# to fp32 there (DESIGN.md section 5).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# tl.dot needs at least 16 in every dimension on the GPU's matrix units.
_MIN_DOT = 16
# Tiles, measured with benchmarks/gpu/ptxas_report.py (Triton 3.8, ptxas for sm_80/86/90, SwinIR-M
# head dim 30 padded to 32, window 8 and 16) -- a spill is a kernel that runs slowly everywhere:
# - backward: the whole 8 x 8 window as one 64 x 64 tile (dq, dk, dv and the fused dbias in one
#   pass) spilled 250-1000 B per thread in bf16 at 4 or 8 warps and 10-50 KB in fp32; 64 x 64
#   tiles of a 16 x 16 window spilled alike. 32 x 32 tiles at 8 warps compile without spills for
#   both windows and dtypes (bf16 230-250 registers, fp32 150-255). So a window is one tile (the
#   fused single pass) only up to 32 tokens, and is otherwise tiled by 32. The interpreter uses
#   the same rule, so the tests run the tiled path the GPU runs for windows 8 and 16.
_BWD_TILE = 32
_BWD_WARPS = 8
# - forward: 64 x 64 tiles are clean in 16-bit types (124-180 registers at 4 warps); in fp32 (ieee
#   dots are FMA loops over register operands) they spilled 700-18000 B on sm_80 and overflowed
#   sm_86's 99 KB of shared memory; 32 x 32 is clean (96-112 registers).
_FWD_TILE = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
# Warps of the forward: 4. The exception: on the shifted-window map (_TokenMap.spatial) the 16-bit
# 64 x 64 tile at 4 warps hit 255 registers and spilled 80 B on sm_86 when shifted (the token-row
# arithmetic of the rolled frame on top of the tile); at 8 warps it is clean on sm_80/86/90, shifted
# or not (157-188 registers, 124-135 on sm_90). fp32's 32 x 32 tile is clean at 4.
_FWD_WARPS = 4
_SPATIAL_16BIT_FWD_WARPS = 8
# Window-group size: enough programs to fill the GPU (about 8 resident per SM on a 132-SM H100)
# and no more, so the float32 dbias partials (one [heads, N, N] per group) stay a small fraction
# of the bytes of q, k, v, do.
_TARGET_PROGRAMS = 1024
# Under the interpreter two windows per program, so the in-program window loop, several groups
# and a ragged last group (odd window counts) are all exercised on the tiny test shapes.
_INTERPRET_WINDOWS_PER_PROGRAM = 2
# Register budget: a head dim above 128 (padded) spills the fp32 accumulators.
_MAX_HEAD_DIM = 128
# qkv single pass: channel chunk of the in-kernel projection (x tile [N, 32] + two [32, d] weight
# tiles per step), and the query tile when the whole key row of the window is held in registers.
# ptxas_report.py: 64-row query tiles spilled (bf16 window 16: 60-240 B; fp32 window 8: 8-640 B);
# 16 rows at 8 warps are clean in bf16 for windows 8 and 16 and in fp32 for window 8 on sm_80/90.
_QKV_BLOCK_C = 32
_QKV_BLOCK_M = 16
_QKV_WARPS = 8
# fp32 with a window above 64 tokens: the window's k and v in fp32 registers spill (150-1800 B at
# any query tile), so the launcher projects q, k, v with torch and runs the tiled forward instead.
_QKV_MAX_FP32_TOKENS = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def window_attention_takes(dtype: torch.dtype, n: int, head_dim: int, n_keys: int | None = None) -> bool:
    """Whether these kernels take q, k, v of ``dtype`` with heads of ``head_dim`` (any window lengths n, n_keys)."""
    return dtype in _DTYPES and n >= 1 and (n_keys is None or n_keys >= 1) and 1 <= head_dim <= _MAX_HEAD_DIM


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and workspace buffer of the launchers (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base_ptr, offs_r, r_ok, stride_r, offs_d, d_ok, stride_d, UPCAST: tl.constexpr):
    """A [rows, D_PAD] tile (token rows x head-dim columns), zero where masked (padding, ragged edges)."""
    tile = tl.load(base_ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _token_rows(b, offs, SPATIAL: tl.constexpr, WS: tl.constexpr, SHIFT, IMG_H, IMG_W):
    """(slot, rows): token ``offs`` of window ``b`` is row ``rows`` of slot ``slot`` of a tensor,
    i.e. at ``slot * stride_b + rows * stride_n``.

    Windows stored one after another (``[B_, heads, N, d]``): slot b, rows offs. SPATIAL (Swin's
    un-partitioned ``[B, H*W, ...]`` map; adaptsr.kernels.shifted_window_attention): window b is
    window (wh, ww) = divmod(b mod nW, W / WS) of image b // nW in the frame rolled by -SHIFT, so
    token (i, j) = divmod(offs, WS) sits at pixel ((wh WS + i + SHIFT) mod H, (ww WS + j + SHIFT) mod W).
    """
    if SPATIAL:
        windows_w = IMG_W // WS
        windows = (IMG_H // WS) * windows_w
        # b is int64 (from the program id); the window within its image is < H W / WS^2 and fits
        # int32, so the per-token divisions and modulos below run in 32 bits (a 64-bit one is a
        # software routine: the SPATIAL forward used 202 registers on sm_90 with them, 124 without).
        win = (b % windows).to(tl.int32)
        slot = b // windows
        y = ((win // windows_w) * WS + offs // WS + SHIFT) % IMG_H
        x = ((win % windows_w) * WS + offs % WS + SHIFT) % IMG_W
        rows = y * IMG_W + x
    else:
        slot = b
        rows = offs
    return slot, rows


@triton.jit
def _logits_log2(q, kT, bias_ptr, mask_ptr, h, w, offs_m, offs_n, row_ok, col_ok, qk_scale,
                 stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """S * log2(e) for a [BLOCK_M, BLOCK_N] tile; -inf in the columns past the window's N_K keys."""
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h * stride_bh + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       mask=tile_ok, other=0.0)
        s += bias * _LOG2E
    if HAS_MASK:
        shift = tl.load(mask_ptr + w * stride_mw + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                        mask=tile_ok, other=0.0)
        s += shift * _LOG2E
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _softmax_grad(q, kT, vT, do, lse, delta, bias_ptr, mask_ptr, h, w, offs_m, offs_n, row_ok, col_ok, qk_scale,
                  stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """P and dS = P * (do v^T - D) of one tile, P recomputed from the saved logsumexp."""
    s = _logits_log2(q, kT, bias_ptr, mask_ptr, h, w, offs_m, offs_n, row_ok, col_ok, qk_scale,
                     stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                     HAS_BIAS, HAS_MASK, INPUT_PRECISION)
    p = tl.exp2(s - lse[:, None] * _LOG2E)
    dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _query_side(q_base, do_base, o_base, lse_base, offs_m, rows_m, row_ok, offs_d, d_ok,
                stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_ln,
                UPCAST: tl.constexpr):
    """q, do, lse and D = rowsum(do * o) of one query tile of one window (q, do, o at token rows
    ``rows_m`` of their slot, lse at the window-local ``offs_m``)."""
    q = _load_rows(q_base, rows_m, row_ok, stride_qn, offs_d, d_ok, stride_qd, UPCAST)
    do = _load_rows(do_base, rows_m, row_ok, stride_don, offs_d, d_ok, stride_dod, UPCAST)
    o = _load_rows(o_base, rows_m, row_ok, stride_on, offs_d, d_ok, stride_od, UPCAST)
    lse = tl.load(lse_base + offs_m * stride_ln, mask=row_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    return q, do, lse, delta


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


# S = q k^T * scale + bias[h] + mask[b % nW];  o = softmax(S) v;  lse = logsumexp(S) per row.
@triton.jit
def _window_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, o_ptr, lse_ptr,
    N, N_K, HEAD_DIM, HEADS, NUM_MASKS, M_TILES, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_bh, stride_bm, stride_bn,
    stride_mw, stride_mm, stride_mn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SHIFT, IMG_H, IMG_W, SPATIAL: tl.constexpr, WS: tl.constexpr,
):
    tl.static_assert(D_PAD >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid = tl.program_id(0).to(tl.int64)
    tile_m = pid % M_TILES
    bh = pid // M_TILES
    b = bh // HEADS
    h = bh % HEADS
    w = b % NUM_MASKS

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    slot, q_rows = _token_rows(b, offs_m, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
    k_base = k_ptr + slot * stride_kb + h * stride_kh
    v_base = v_ptr + slot * stride_vb + h * stride_vh

    # -- load q tile --
    q = _load_rows(q_ptr + slot * stride_qb + h * stride_qh, q_rows, row_ok, stride_qn, offs_d, d_ok, stride_qd,
                   UPCAST)

    # -- online softmax over key tiles (base 2) --
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N_K
        _slot, k_rows = _token_rows(b, offs_n, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
        k = _load_rows(k_base, k_rows, col_ok, stride_kn, offs_d, d_ok, stride_kd, UPCAST)
        v = _load_rows(v_base, k_rows, col_ok, stride_vn, offs_d, d_ok, stride_vd, UPCAST)
        s = _logits_log2(q, tl.trans(k), bias_ptr, mask_ptr, h, w, offs_m, offs_n, row_ok, col_ok, qk_scale,
                         stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                         HAS_BIAS, HAS_MASK, INPUT_PRECISION)
        # every key tile holds at least one real key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    # -- store o and lse --
    o = acc / l_i[:, None]
    tl.store(o_ptr + slot * stride_ob + h * stride_oh + q_rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * _LN2
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_ln, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


# dv = P^T do;  dk = scale dS^T q  (per key tile, over the query tiles);
# SINGLE_TILE (N, N_K <= BLOCK): also dq = scale dS k and, with FUSED_DBIAS, dbias_partial[g] = sum_b dS;
# otherwise also dq = scale sum_n dS k_n for the query tile with this program's tile index.
@triton.jit
def _window_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, o_ptr, lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbias_ws_ptr,
    B, N, N_K, HEAD_DIM, HEADS, NUM_MASKS, M_TILES, N_TILES, TILES, WINDOWS_PER_PROGRAM, scale, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bh, stride_bm, stride_bn,
    stride_mw, stride_mm, stride_mn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SINGLE_TILE: tl.constexpr, FUSED_DBIAS: tl.constexpr,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SHIFT, IMG_H, IMG_W, SPATIAL: tl.constexpr, WS: tl.constexpr,
):
    tl.static_assert(D_PAD >= 16)
    tl.static_assert(BLOCK >= 16)
    if FUSED_DBIAS:
        # dbias in registers across windows needs the whole N x N tile in this program
        tl.static_assert(SINGLE_TILE)
        tl.static_assert(HAS_BIAS)
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % TILES  # max(M_TILES, N_TILES)
    rest = pid // TILES
    h = rest % HEADS
    g = rest // HEADS
    w_start = g * WINDOWS_PER_PROGRAM
    w_end = tl.minimum(w_start + WINDOWS_PER_PROGRAM, B)
    # more query than key tiles, or the other way round (N != N_K): a program past the shorter
    # count skips that phase (its window loop runs empty)
    k_end = tl.where(tile < N_TILES, w_end, w_start)
    q_end = tl.where(tile < M_TILES, w_end, w_start)

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_n = tile * BLOCK + tl.arange(0, BLOCK)
    col_ok = offs_n < N_K
    if FUSED_DBIAS:
        dbias_acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)

    # -- phase 1: dk, dv of key tile `tile` (and dq, dbias when the window is one tile) --
    for b in range(w_start, k_end):
        w = b % NUM_MASKS
        slot, k_rows = _token_rows(b, offs_n, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
        k = _load_rows(k_ptr + slot * stride_kb + h * stride_kh, k_rows, col_ok, stride_kn, offs_d, d_ok, stride_kd,
                       UPCAST)
        v = _load_rows(v_ptr + slot * stride_vb + h * stride_vh, k_rows, col_ok, stride_vn, offs_d, d_ok, stride_vd,
                       UPCAST)
        kT = tl.trans(k)
        vT = tl.trans(v)
        dk = tl.zeros((BLOCK, D_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK, D_PAD), dtype=tl.float32)
        for start_m in range(0, N, BLOCK):
            offs_m = start_m + tl.arange(0, BLOCK)
            row_ok = offs_m < N
            _slot, q_rows = _token_rows(b, offs_m, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
            q, do, lse, delta = _query_side(
                q_ptr + slot * stride_qb + h * stride_qh, do_ptr + slot * stride_dob + h * stride_doh,
                o_ptr + slot * stride_ob + h * stride_oh, lse_ptr + b * stride_lb + h * stride_lh,
                offs_m, q_rows, row_ok, offs_d, d_ok,
                stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_ln, UPCAST)
            p, ds = _softmax_grad(q, kT, vT, do, lse, delta, bias_ptr, mask_ptr, h, w, offs_m, offs_n, row_ok, col_ok,
                                  qk_scale, stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                                  HAS_BIAS, HAS_MASK, INPUT_PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
            ds_op = ds.to(q.dtype)
            dk = tl.dot(tl.trans(ds_op), q, dk, input_precision=INPUT_PRECISION)
            if SINGLE_TILE:
                dq = tl.dot(ds_op, k, input_precision=INPUT_PRECISION) * scale
                tl.store(dq_ptr + slot * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn
                         + offs_d[None, :] * stride_dqd,
                         dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            if FUSED_DBIAS:
                dbias_acc += ds
        # -- store dk, dv of this window --
        key_ok = col_ok[:, None] & d_ok[None, :]
        tl.store(dk_ptr + slot * stride_dkb + h * stride_dkh + k_rows[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_ok)
        tl.store(dv_ptr + slot * stride_dvb + h * stride_dvh + k_rows[:, None] * stride_dvn
                 + offs_d[None, :] * stride_dvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=key_ok)

    if FUSED_DBIAS:
        # -- store this window group's dbias partial (the single tile is rows 0.. and columns offs_n) --
        offs_r = tl.arange(0, BLOCK)
        ws = dbias_ws_ptr + (g * HEADS + h) * N * N_K
        tl.store(ws + offs_r[:, None] * N_K + offs_n[None, :], dbias_acc,
                 mask=(offs_r < N)[:, None] & col_ok[None, :])

    if not SINGLE_TILE:
        # -- phase 2: dq of query tile `tile` (square tiles: query tile t pairs with key tile t) --
        offs_m = tile * BLOCK + tl.arange(0, BLOCK)
        row_ok = offs_m < N
        for b in range(w_start, q_end):
            w = b % NUM_MASKS
            slot, q_rows = _token_rows(b, offs_m, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
            q, do, lse, delta = _query_side(
                q_ptr + slot * stride_qb + h * stride_qh, do_ptr + slot * stride_dob + h * stride_doh,
                o_ptr + slot * stride_ob + h * stride_oh, lse_ptr + b * stride_lb + h * stride_lh,
                offs_m, q_rows, row_ok, offs_d, d_ok,
                stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_ln, UPCAST)
            dq = tl.zeros((BLOCK, D_PAD), dtype=tl.float32)
            for start_n in range(0, N_K, BLOCK):
                offs_kn = start_n + tl.arange(0, BLOCK)
                kn_ok = offs_kn < N_K
                _slot, kn_rows = _token_rows(b, offs_kn, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
                k = _load_rows(k_ptr + slot * stride_kb + h * stride_kh, kn_rows, kn_ok, stride_kn, offs_d, d_ok,
                               stride_kd, UPCAST)
                v = _load_rows(v_ptr + slot * stride_vb + h * stride_vh, kn_rows, kn_ok, stride_vn, offs_d, d_ok,
                               stride_vd, UPCAST)
                _p, ds = _softmax_grad(q, tl.trans(k), tl.trans(v), do, lse, delta, bias_ptr, mask_ptr, h, w,
                                      offs_m, offs_kn, row_ok, kn_ok, qk_scale,
                                      stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                                      HAS_BIAS, HAS_MASK, INPUT_PRECISION)
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
            tl.store(dq_ptr + slot * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqn
                     + offs_d[None, :] * stride_dqd,
                     (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# dbias_partial[g, h, tile_m, tile_n] = sum over the windows b of group g of dS[b, h, tile_m, tile_n]
# (tiled windows only; a window that is one tile gets its dbias from the main backward kernel).
@triton.jit
def _window_attention_bwd_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, o_ptr, lse_ptr, dbias_ws_ptr,
    B, N, N_K, HEAD_DIM, HEADS, NUM_MASKS, M_TILES, N_TILES, WINDOWS_PER_PROGRAM, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_bh, stride_bm, stride_bn,
    stride_mw, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, D_PAD: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SHIFT, IMG_H, IMG_W, SPATIAL: tl.constexpr, WS: tl.constexpr,
):
    tl.static_assert(D_PAD >= 16)
    tl.static_assert(BLOCK >= 16)
    pid = tl.program_id(0).to(tl.int64)
    pair = pid % (M_TILES * N_TILES)
    rest = pid // (M_TILES * N_TILES)
    h = rest % HEADS
    g = rest // HEADS
    w_start = g * WINDOWS_PER_PROGRAM
    w_end = tl.minimum(w_start + WINDOWS_PER_PROGRAM, B)

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_m = (pair // N_TILES) * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs_m < N
    offs_n = (pair % N_TILES) * BLOCK + tl.arange(0, BLOCK)
    col_ok = offs_n < N_K

    # -- sum dS of this tile over the group's windows, in window order --
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for b in range(w_start, w_end):
        w = b % NUM_MASKS
        slot, q_rows = _token_rows(b, offs_m, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
        _slot, k_rows = _token_rows(b, offs_n, SPATIAL, WS, SHIFT, IMG_H, IMG_W)
        q, do, lse, delta = _query_side(
            q_ptr + slot * stride_qb + h * stride_qh, do_ptr + slot * stride_dob + h * stride_doh,
            o_ptr + slot * stride_ob + h * stride_oh, lse_ptr + b * stride_lb + h * stride_lh,
            offs_m, q_rows, row_ok, offs_d, d_ok,
            stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od, stride_ln, UPCAST)
        k = _load_rows(k_ptr + slot * stride_kb + h * stride_kh, k_rows, col_ok, stride_kn, offs_d, d_ok, stride_kd,
                       UPCAST)
        v = _load_rows(v_ptr + slot * stride_vb + h * stride_vh, k_rows, col_ok, stride_vn, offs_d, d_ok, stride_vd,
                       UPCAST)
        _p, ds = _softmax_grad(q, tl.trans(k), tl.trans(v), do, lse, delta, bias_ptr, mask_ptr, h, w,
                              offs_m, offs_n, row_ok, col_ok, qk_scale,
                              stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                              True, HAS_MASK, INPUT_PRECISION)
        acc += ds

    # -- store the partial --
    ws = dbias_ws_ptr + (g * HEADS + h) * N * N_K
    tl.store(ws + offs_m[:, None] * N_K + offs_n[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# single pass: qkv projection inside the attention kernel
# ---------------------------------------------------------------------------------------------


# [q | k | v] = x W_qkv^T + b_qkv (this head's d columns of each third);
# o[:, h*d:(h+1)*d] = softmax(q k^T * scale + bias[h] + mask[b % nW]) v;  lse per row.
@triton.jit
def _qkv_window_attention_fwd_kernel(
    x_ptr, w_ptr, wb_ptr, bias_ptr, mask_ptr, o_ptr, lse_ptr,
    N, C, HEAD_DIM, HEADS, NUM_MASKS, qk_scale,
    stride_xb, stride_xn, stride_xc,
    stride_wo, stride_wc,
    stride_ob, stride_on, stride_oc,
    stride_lb, stride_lh, stride_ln,
    stride_bh, stride_bm, stride_bn,
    stride_mw, stride_mm, stride_mn,
    HAS_QKV_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, D_PAD: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tl.static_assert(D_PAD >= 16)
    tl.static_assert(N_PAD >= 16)
    tl.static_assert(BLOCK_C >= 16)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // HEADS
    h = pid % HEADS
    w = b % NUM_MASKS

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_t = tl.arange(0, N_PAD)
    tok_ok = offs_t < N
    x_base = x_ptr + b * stride_xb
    # rows of W_qkv feeding this head: q at h*d + j, k at C + h*d + j, v at 2C + h*d + j
    q_rows = h * HEAD_DIM + offs_d
    k_rows = C + q_rows
    v_rows = 2 * C + q_rows

    # -- project k and v of the whole window (held in registers for every query tile) --
    k_acc = tl.zeros((N_PAD, D_PAD), dtype=tl.float32)
    v_acc = tl.zeros((N_PAD, D_PAD), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        x_tile = _load_rows(x_base, offs_t, tok_ok, stride_xn, offs_c, c_ok, stride_xc, UPCAST)
        # W^T tiles [BLOCK_C, D_PAD]: element (c, j) = W[row j, c]
        wk = _load_rows(w_ptr, offs_c, c_ok, stride_wc, k_rows, d_ok, stride_wo, UPCAST)
        wv = _load_rows(w_ptr, offs_c, c_ok, stride_wc, v_rows, d_ok, stride_wo, UPCAST)
        k_acc = tl.dot(x_tile, wk, k_acc, input_precision=INPUT_PRECISION)
        v_acc = tl.dot(x_tile, wv, v_acc, input_precision=INPUT_PRECISION)
    if HAS_QKV_BIAS:
        k_acc += tl.load(wb_ptr + k_rows, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        v_acc += tl.load(wb_ptr + v_rows, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    # rounded to the input dtype, as the unfused layer's qkv output would be
    k = k_acc.to(x_ptr.dtype.element_ty)
    v = v_acc.to(x_ptr.dtype.element_ty)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kT = tl.trans(k)

    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        # -- project the q tile --
        q_acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            x_tile = _load_rows(x_base, offs_m, row_ok, stride_xn, offs_c, c_ok, stride_xc, UPCAST)
            wq = _load_rows(w_ptr, offs_c, c_ok, stride_wc, q_rows, d_ok, stride_wo, UPCAST)
            q_acc = tl.dot(x_tile, wq, q_acc, input_precision=INPUT_PRECISION)
        if HAS_QKV_BIAS:
            q_acc += tl.load(wb_ptr + q_rows, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        q = q_acc.to(x_ptr.dtype.element_ty).to(v.dtype)

        # -- softmax over the whole key row (it fits: [BLOCK_M, N_PAD]) --
        s = _logits_log2(q, kT, bias_ptr, mask_ptr, h, w, offs_m, offs_t, row_ok, tok_ok, qk_scale,
                         stride_bh, stride_bm, stride_bn, stride_mw, stride_mm, stride_mn,
                         HAS_BIAS, HAS_MASK, INPUT_PRECISION)
        m_i = tl.max(s, 1)
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) / l_i[:, None]

        # -- store o (heads concatenated) and lse --
        tl.store(o_ptr + b * stride_ob + offs_m[:, None] * stride_on + q_rows[None, :] * stride_oc,
                 o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_ln, (m_i + tl.log2(l_i)) * _LN2,
                 mask=row_ok)


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------


def _check_device(name: str, t: torch.Tensor) -> None:
    if not _INTERPRET and t.device.type != "cuda":
        raise ValueError(
            f"window attention (triton): {name} is on {t.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before adaptsr.kernels is imported, to run them on the CPU)"
        )


def _check_bias_mask(bias, mask, batch_windows: int, heads: int, n: int, device: torch.device,
                     n_keys: int | None = None) -> None:
    n_keys = n if n_keys is None else n_keys
    if bias is not None and (
        bias.shape != (heads, n, n_keys) or bias.dtype != torch.float32 or bias.device != device
    ):
        raise ValueError(
            f"window attention (triton): bias must be float32 [heads, N, N_k] = {(heads, n, n_keys)} on {device}, "
            f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}"
        )
    if mask is not None:
        if mask.dim() != 3 or mask.shape[1:] != (n, n_keys) or mask.dtype != torch.float32 or mask.device != device:
            raise ValueError(
                f"window attention (triton): mask must be float32 [nW, N, N_k] with (N, N_k) = {(n, n_keys)} on "
                f"{device}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
            )
        if mask.shape[0] == 0 or batch_windows % mask.shape[0] != 0:
            raise ValueError(
                f"window attention (triton): the number of windows B_ = {batch_windows} must be a multiple of "
                f"the mask's nW = {mask.shape[0]} (window b uses mask[b % nW])"
            )


def _check_inputs(q, k, v, bias, mask) -> tuple[int, int, int, int]:
    """Shapes (B_, heads, N, d) of q after checking q, k, v (``[B_, heads, N_k, d]``), bias and mask;
    ValueError says what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"window attention (triton): {name} must be a [B_, heads, N, d] tensor, got {got}")
    if not (k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3]):
        raise ValueError(
            f"window attention (triton): q must be [B_, heads, N, d] and k, v one shape [B_, heads, N_k, d], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"window attention (triton): q, k, v must share one of float32/float16/bfloat16, got "
            f"{q.dtype}, {k.dtype}, {v.dtype} (use the torch backend for other dtypes)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"window attention (triton): q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    _check_device("q", q)
    batch_windows, heads, n, d = q.shape
    if min(batch_windows, heads, n, d, k.shape[2]) == 0:
        raise ValueError(f"window attention (triton): empty input of shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if d > _MAX_HEAD_DIM:
        raise ValueError(
            f"window attention (triton): head dim {d} > {_MAX_HEAD_DIM} is not supported (registers would spill); "
            "use the torch backend"
        )
    _check_bias_mask(bias, mask, batch_windows, heads, n, q.device, k.shape[2])
    return batch_windows, heads, n, d


def _head_pad(d: int) -> int:
    return max(_MIN_DOT, triton.next_power_of_2(d))


def _tile(n: int) -> int:
    """Square tile of the backward: the whole window when it fits in one."""
    return min(max(_MIN_DOT, triton.next_power_of_2(n)), _BWD_TILE)


def _fwd_tile(n: int, dtype: torch.dtype) -> int:
    """Query and key tile of the forward."""
    return min(max(_MIN_DOT, triton.next_power_of_2(n)), _FWD_TILE[dtype])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 and not matmul_allows_tf32() else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _bias_mask_args(bias, mask, dummy: torch.Tensor):
    """Pointers and strides of bias and mask (a dummy pointer and zero strides for a missing one)."""
    bias_arg = bias if bias is not None else dummy
    bias_strides = tuple(bias.stride()) if bias is not None else (0, 0, 0)
    mask_arg = mask if mask is not None else dummy
    mask_strides = tuple(mask.stride()) if mask is not None else (0, 0, 0)
    num_masks = mask.shape[0] if mask is not None else 1
    return bias_arg, bias_strides, mask_arg, mask_strides, num_masks


class _TokenMap(NamedTuple):
    """Where the kernels find the token rows of each window (their ``_token_rows``).

    The default: windows stored one after another, ``[B_, heads, N, d]``. ``spatial``: the rows of
    Swin's un-partitioned ``[B, H*W, ...]`` map, windows of ``window`` x ``window`` pixels in the
    frame cyclically shifted by ``-shift`` (adaptsr.kernels.shifted_window_attention).
    """

    spatial: bool = False
    window: int = 1
    shift: int = 0
    height: int = 1
    width: int = 1

    def kernel_args(self) -> dict:
        return {"SHIFT": self.shift, "IMG_H": self.height, "IMG_W": self.width, "SPATIAL": self.spatial,
                "WS": self.window}


_WINDOWED = _TokenMap()


def _keys_per_window(k: torch.Tensor, n: int, token_map: _TokenMap) -> int:
    """N_k: the rows of each window of k, or N on the shifted-window map (whose k holds every pixel)."""
    return n if token_map.spatial else k.shape[-2]


def _windows_per_program(batch_windows: int, heads: int, tiles: int) -> int:
    """Windows each backward program walks (in order): the fewest that still leave ~_TARGET_PROGRAMS programs."""
    if _INTERPRET:
        return _INTERPRET_WINDOWS_PER_PROGRAM
    return max(1, triton.cdiv(batch_windows * heads * tiles, _TARGET_PROGRAMS))


def window_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(q k^T * scale + bias + mask[b % nW]) v and the row logsumexp; no autograd.

    q: ``[B_, heads, N, d]``, k, v: ``[B_, heads, N_k, d]`` (any strides, one of float32/float16/bfloat16);
    bias: float32 ``[heads, N, N_k]`` or None; mask: float32 ``[nW, N, N_k]`` or None.
    Returns o ``[B_, heads, N, d]`` in q's dtype and lse ``[B_, heads, N]`` float32.
    """
    batch_windows, heads, n, d = _check_inputs(q, k, v, bias, mask)
    o = _alloc((batch_windows, heads, n, d), q.dtype, q.device)
    lse = _alloc((batch_windows, heads, n), torch.float32, q.device)
    _window_attention_fwd_into(q, k, v, bias, mask, scale, o, lse)
    return o, lse


def _window_attention_fwd_into(q, k, v, bias, mask, scale, o, lse, token_map: _TokenMap = _WINDOWED) -> None:
    """The forward launch, writing o and lse (``[B_, heads, N]``, which gives the window count)."""
    batch_windows, heads, n = lse.shape
    d, n_keys = q.shape[-1], _keys_per_window(k, n, token_map)
    # square tiles, the shapes ptxas_report.py checks
    block_n = _fwd_tile(max(n, n_keys), q.dtype)
    block_m = block_n
    m_tiles = triton.cdiv(n, block_m)
    bias_arg, bias_strides, mask_arg, mask_strides, num_masks = _bias_mask_args(bias, mask, q)
    _window_attention_fwd_kernel[(batch_windows * heads * m_tiles,)](
        q, k, v, bias_arg, mask_arg, o, lse,
        n, n_keys, d, heads, num_masks, m_tiles, float(scale) * 1.4426950408889634,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(), *bias_strides, *mask_strides,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=_head_pad(d),
        UPCAST=_upcast(q.dtype), INPUT_PRECISION=_precision(q.dtype),
        **token_map.kernel_args(),
        num_warps=_SPATIAL_16BIT_FWD_WARPS if token_map.spatial and q.dtype != torch.float32 else _FWD_WARPS,
    )


def _window_attention_bwd_into(do, q, k, v, o, lse, bias, mask, scale, need_dbias, dq, dk, dv,
                               token_map: _TokenMap = _WINDOWED):
    """The backward launches, writing dq, dk, dv into the given (possibly strided) tensors; lse
    (``[B_, heads, N]``) gives the window count."""
    batch_windows, heads, n = lse.shape
    d, n_keys = q.shape[-1], _keys_per_window(k, n, token_map)
    block = _tile(max(n, n_keys))
    m_tiles, n_tiles = triton.cdiv(n, block), triton.cdiv(n_keys, block)
    tiles = max(m_tiles, n_tiles)
    single_tile = tiles == 1
    wpp = _windows_per_program(batch_windows, heads, tiles)
    groups = triton.cdiv(batch_windows, wpp)
    dbias_ws = _alloc((groups, heads, n, n_keys), torch.float32, q.device) if need_dbias else lse
    bias_arg, bias_strides, mask_arg, mask_strides, num_masks = _bias_mask_args(bias, mask, q)
    d_pad = _head_pad(d)
    upcast, precision = _upcast(q.dtype), _precision(q.dtype)
    fused_dbias = need_dbias and single_tile
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *o.stride(), *lse.stride())
    _window_attention_bwd_kernel[(groups * heads * tiles,)](
        q, k, v, bias_arg, mask_arg, do, o, lse, dq, dk, dv, dbias_ws,
        batch_windows, n, n_keys, d, heads, num_masks, m_tiles, n_tiles, tiles, wpp, float(scale),
        float(scale) * 1.4426950408889634,
        *common_strides, *dq.stride(), *dk.stride(), *dv.stride(), *bias_strides, *mask_strides,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SINGLE_TILE=single_tile, FUSED_DBIAS=fused_dbias,
        BLOCK=block, D_PAD=d_pad, UPCAST=upcast, INPUT_PRECISION=precision,
        **token_map.kernel_args(),
        num_warps=_BWD_WARPS,
    )
    if need_dbias and not single_tile:
        _window_attention_bwd_dbias_kernel[(groups * heads * m_tiles * n_tiles,)](
            q, k, v, bias_arg, mask_arg, do, o, lse, dbias_ws,
            batch_windows, n, n_keys, d, heads, num_masks, m_tiles, n_tiles, wpp, float(scale) * 1.4426950408889634,
            *common_strides, *bias_strides, *mask_strides,
            HAS_MASK=mask is not None, BLOCK=block, D_PAD=d_pad, UPCAST=upcast, INPUT_PRECISION=precision,
            **token_map.kernel_args(),
            # two pipeline stages: with Triton's default three, ptxas gives the float32 kernel on the spatial
            # map 32 registers and 3 KB of spills for sm_80 (benchmarks/gpu/ptxas_report.py); clean with two
            num_warps=_BWD_WARPS, num_stages=2,
        )
    if not need_dbias:
        return None
    # fixed-shape reduction over the window groups: the same order on every run
    return dbias_ws[0].clone() if groups == 1 else dbias_ws.sum(0)


def _check_bwd_extras(do, o, lse, q, bias, need_dbias) -> None:
    batch_windows, heads, n, _ = q.shape
    if do.shape != q.shape or do.dtype != q.dtype or do.device != q.device:
        raise ValueError(
            f"window attention (triton) backward: do must match q ({q.dtype} {tuple(q.shape)}), "
            f"got {do.dtype} {tuple(do.shape)} on {do.device}"
        )
    if o.shape != q.shape or o.dtype != q.dtype or o.device != q.device:
        raise ValueError(
            f"window attention (triton) backward: o must be the forward's output {q.dtype} {tuple(q.shape)}, "
            f"got {o.dtype} {tuple(o.shape)}"
        )
    if lse.shape != (batch_windows, heads, n) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"window attention (triton) backward: lse must be the forward's float32 {(batch_windows, heads, n)}, "
            f"got {lse.dtype} {tuple(lse.shape)}"
        )
    if need_dbias and bias is None:
        raise ValueError("window attention (triton) backward: need_dbias=True but no bias was given")


def window_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dq (``[B_, heads, N, d]``), dk, dv (``[B_, heads, N_k, d]``), in q's dtype, and, when ``need_dbias``,
    dbias (float32 ``[heads, N, N_k]``, summed over all windows, deterministic); no autograd.

    ``o`` and ``lse`` are the outputs of :func:`window_attention_fwd` for the same inputs.
    """
    _check_inputs(q, k, v, bias, mask)
    _check_bwd_extras(do, o, lse, q, bias, need_dbias)
    dq = _alloc(tuple(q.shape), q.dtype, q.device)
    dk = _alloc(tuple(k.shape), q.dtype, q.device)
    dv = _alloc(tuple(k.shape), q.dtype, q.device)
    dbias = _window_attention_bwd_into(do, q, k, v, o, lse, bias, mask, scale, need_dbias, dq, dk, dv)
    return dq, dk, dv, dbias


def _check_qkv_inputs(x, w_qkv, b_qkv, num_heads) -> tuple[int, int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"qkv window attention (triton): x must be [B_, N, C] window tokens, got {got}")
    batch_windows, n, channels = x.shape
    if num_heads < 1 or channels % num_heads != 0:
        raise ValueError(f"qkv window attention (triton): C = {channels} is not divisible by num_heads = {num_heads}")
    if w_qkv.shape != (3 * channels, channels):
        raise ValueError(
            f"qkv window attention (triton): w_qkv must be [3C, C] = {(3 * channels, channels)}, "
            f"got {tuple(w_qkv.shape)}"
        )
    if b_qkv is not None and b_qkv.shape != (3 * channels,):
        raise ValueError(f"qkv window attention (triton): b_qkv must be [3C] = [{3 * channels}], got {tuple(b_qkv.shape)}")
    dtypes = [x.dtype, w_qkv.dtype] + ([b_qkv.dtype] if b_qkv is not None else [])
    if x.dtype not in _DTYPES or len(set(dtypes)) != 1:
        raise ValueError(
            f"qkv window attention (triton): x, w_qkv, b_qkv must share one of float32/float16/bfloat16, got "
            f"{', '.join(str(t) for t in dtypes)}"
        )
    devices = {x.device, w_qkv.device} | ({b_qkv.device} if b_qkv is not None else set())
    if len(devices) != 1:
        raise ValueError(f"qkv window attention (triton): x, w_qkv, b_qkv on different devices: {devices}")
    _check_device("x", x)
    if min(batch_windows, n) == 0:
        raise ValueError(f"qkv window attention (triton): empty input of shape {tuple(x.shape)}")
    return batch_windows, n, channels, channels // num_heads


def qkv_window_attention_fwd(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    num_heads: int,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window attention with the qkv projection fused in: q, k, v never reach device memory (but for float32
    windows of more than ``_QKV_MAX_FP32_TOKENS`` tokens, projected with torch); no autograd.

    x: ``[B_, N, C]`` window tokens; w_qkv: ``[3C, C]`` (LoRA-merged); b_qkv: ``[3C]`` or None;
    q, k, v are ``x w_qkv^T + b_qkv`` reshaped as ``(B_, N, 3, heads, d)`` (Swin's order).
    Returns o ``[B_, N, C]`` (heads concatenated, x's dtype) and lse ``[B_, heads, N]`` float32.
    """
    batch_windows, n, channels, d = _check_qkv_inputs(x, w_qkv, b_qkv, num_heads)
    heads = num_heads
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"qkv window attention (triton): head dim {d} > {_MAX_HEAD_DIM} is not supported")
    _check_bias_mask(bias, mask, batch_windows, heads, n, x.device)
    o = _alloc((batch_windows, n, channels), x.dtype, x.device)
    lse = _alloc((batch_windows, heads, n), torch.float32, x.device)
    n_pad = max(_MIN_DOT, triton.next_power_of_2(n))
    if x.dtype == torch.float32 and n_pad > _QKV_MAX_FP32_TOKENS:
        # q, k, v through memory (see _QKV_MAX_FP32_TOKENS); o written as its [B_, heads, N, d] view
        qkv = torch.nn.functional.linear(x, w_qkv, b_qkv).view(batch_windows, n, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        _window_attention_fwd_into(q, k, v, bias, mask, scale, o.view(batch_windows, n, heads, d).transpose(1, 2), lse)
        return o, lse
    bias_arg, bias_strides, mask_arg, mask_strides, num_masks = _bias_mask_args(bias, mask, x)
    _qkv_window_attention_fwd_kernel[(batch_windows * heads,)](
        x, w_qkv, b_qkv if b_qkv is not None else w_qkv, bias_arg, mask_arg, o, lse,
        n, channels, d, heads, num_masks, float(scale) * 1.4426950408889634,
        *x.stride(), *w_qkv.stride(), *o.stride(), *lse.stride(), *bias_strides, *mask_strides,
        HAS_QKV_BIAS=b_qkv is not None, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        N_PAD=n_pad, BLOCK_M=min(n_pad, _QKV_BLOCK_M), BLOCK_C=_QKV_BLOCK_C, D_PAD=_head_pad(d),
        UPCAST=_upcast(x.dtype), INPUT_PRECISION=_precision(x.dtype),
        # the window's k, v ([N, d] each) and one [BLOCK_M, N] logits tile live in registers
        num_warps=_QKV_WARPS,
    )
    return o, lse


def qkv_window_attention_bwd(
    do: torch.Tensor,
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    num_heads: int,
    o: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dx ``[B_, N, C]``, dw_qkv ``[3C, C]``, db_qkv ``[3C]`` (None without b_qkv) and dbias (or None)
    of :func:`qkv_window_attention_fwd`; no autograd.

    q, k, v are recomputed with one matmul; the attention backward runs the Triton kernels and
    writes dq, dk, dv straight into one ``[B_, N, 3, heads, d]`` buffer, so the projection
    gradients are two plain matmuls over it.
    """
    batch_windows, n, channels, d = _check_qkv_inputs(x, w_qkv, b_qkv, num_heads)
    heads = num_heads
    if do.shape != x.shape or do.dtype != x.dtype or o.shape != x.shape or o.dtype != x.dtype:
        raise ValueError(
            f"qkv window attention (triton) backward: do and o must be {x.dtype} {tuple(x.shape)}, got "
            f"{do.dtype} {tuple(do.shape)} and {o.dtype} {tuple(o.shape)}"
        )
    # -- recompute q, k, v (views of one [B_, N, 3, heads, d] buffer) --
    qkv = torch.nn.functional.linear(x, w_qkv, b_qkv).view(batch_windows, n, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do4 = do.unflatten(-1, (heads, d)).transpose(1, 2)
    o4 = o.unflatten(-1, (heads, d)).transpose(1, 2)
    _check_inputs(q, k, v, bias, mask)
    _check_bwd_extras(do4, o4, lse, q, bias, need_dbias)
    # -- attention backward into one dqkv buffer --
    dqkv = _alloc((batch_windows, n, 3, heads, d), x.dtype, x.device)
    dq, dk, dv = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
    dbias = _window_attention_bwd_into(do4, q, k, v, o4, lse, bias, mask, scale, need_dbias, dq, dk, dv)
    # -- projection gradients --
    dqkv2 = dqkv.view(batch_windows * n, 3 * channels)
    dx = (dqkv2 @ w_qkv).view(batch_windows, n, channels)
    dw_qkv = dqkv2.t() @ x.reshape(batch_windows * n, channels)
    db_qkv = dqkv2.sum(0) if b_qkv is not None else None
    return dx, dw_qkv, db_qkv, dbias
