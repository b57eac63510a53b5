r"""Triton kernel: the fused low-rank gradient pass of a LoRA convolution (and of LoRA linear).

For one group g of a convolution with output pixels p (flattened over batch and space) and the
input patch X[p, (t, c)] that the kernel tap t sees in channel c of the group::

    u[p, k] = sum_o dy[p, o] B[o, k]                  (B^T dy, r channels)
    z[p, k] = sum_(t,c) X[p, (t, c)] A[k, c, t]       (conv(x, A), r channels)
    dA[k, c, t] = s sum_g sum_p u[p, k] X[p, (t, c)]
    dB[o, k]    = s sum_p dy[p, o] z[p, k]

One program owns BLOCK_M output pixels of one group: it reads its rows of dy and its patches of
x, forms u and z in registers, and writes its partial dA and dB to a workspace; the host sums
the workspace over programs in a fixed order, so the result is deterministic (no atomics).
Every pass over dy or x inside a program reads the same rows, so the second read of each tile
is served from L2: device memory sees x and dy once.

A linear layer is the 1x1 case with H = W = 1 (``lora_linear`` reuses this kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter needs powers of two and is slow per element: keep tiles minimal there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# 256 pixels per program: the u and z accumulators (256 x 16 fp32 each) fit in registers at
# 8 warps, and the per-program workspace (r x (K + O) fp32) stays under a third of the bytes
# of x and dy on the SR-training shapes.
_BLOCK_M = 16 if _INTERPRET else 256
# tl.dot needs at least 16 in every dimension on the GPU's matrix units.
_MIN_DOT = 16


@triton.jit
def _load_tile(row_ptrs, row_ok, cols, col_ok, stride_col, UPCAST: tl.constexpr):
    """A [rows, cols] tile of a channels-strided tensor, zero where masked (padding, ragged edges)."""
    tile = tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _tap_rows(x_ptr, n, oh, ow, row_ok, t, H, W, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
              stride_xn, stride_xh, stride_xw):
    """Row pointers into x for kernel tap t of each output pixel, and which rows fall inside x."""
    ih = oh * STRIDE_H - PAD_H + (t // KW) * DIL_H
    iw = ow * STRIDE_W - PAD_W + (t % KW) * DIL_W
    inside = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return x_ptr + n * stride_xn + ih * stride_xh + iw * stride_xw, inside


@triton.jit
def _lora_conv2d_lowrank_grad_kernel(
    x_ptr, dy_ptr, a_ptr, b_ptr, ws_a_ptr, ws_b_ptr,
    M, H, W, HO, WO,
    C_IN_G, C_OUT_G, R,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dn, stride_dc, stride_dh, stride_dw,
    # conv geometry as run-time values: one compiled kernel serves every layer of a model
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tl.static_assert(R_PAD >= 16)
    pid_m = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    num_groups = tl.num_programs(1)
    K = KH * KW * C_IN_G

    # -- output pixel coordinates of this block --
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = rows // (HO * WO)
    rem = rows % (HO * WO)
    oh = rem // WO
    ow = rem % WO
    ranks = tl.arange(0, R_PAD)
    dy_rows = dy_ptr + n * stride_dn + oh * stride_dh + ow * stride_dw
    o_base = group * C_OUT_G
    c_base = group * C_IN_G

    # -- u = dy B over the group's output channels --
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for o0 in range(0, C_OUT_G, BLOCK_O):
        oc = o0 + tl.arange(0, BLOCK_O)
        o_ok = oc < C_OUT_G
        dy_tile = _load_tile(dy_rows, row_ok, o_base + oc, o_ok, stride_dc, UPCAST)
        b_tile = tl.load(b_ptr + (o_base + oc)[:, None] * R_PAD + ranks[None, :], mask=o_ok[:, None], other=0.0)
        if UPCAST:
            b_tile = b_tile.to(tl.float32)
        u = tl.dot(dy_tile, b_tile, u, input_precision=INPUT_PRECISION)

    # -- z = X A over the taps and the group's input channels --
    z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for t in range(KH * KW):
        x_rows, pix_ok = _tap_rows(x_ptr, n, oh, ow, row_ok, t, H, W, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                   DIL_H, DIL_W, stride_xn, stride_xh, stride_xw)
        for c0 in range(0, C_IN_G, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C_IN_G
            x_tile = _load_tile(x_rows, pix_ok, c_base + cc, c_ok, stride_xc, UPCAST)
            a_tile = tl.load(a_ptr + (t * C_IN_G + cc)[:, None] * R_PAD + ranks[None, :], mask=c_ok[:, None], other=0.0)
            if UPCAST:
                a_tile = a_tile.to(tl.float32)
            z = tl.dot(x_tile, a_tile, z, input_precision=INPUT_PRECISION)

    # -- partial dB[o, k] = sum_p dy[p, o] z[p, k] for this block (rows of this group only) --
    z_op = z
    if not UPCAST:
        z_op = z.to(dy_ptr.dtype.element_ty)
    ws_b_rows = ws_b_ptr + pid_m * (num_groups * C_OUT_G) * R
    for o0 in range(0, C_OUT_G, BLOCK_O):
        oc = o0 + tl.arange(0, BLOCK_O)
        o_ok = oc < C_OUT_G
        dy_tile = _load_tile(dy_rows, row_ok, o_base + oc, o_ok, stride_dc, UPCAST)
        part_b = tl.dot(tl.trans(dy_tile), z_op, input_precision=INPUT_PRECISION)
        tl.store(ws_b_rows + (o_base + oc)[:, None] * R + ranks[None, :], part_b,
                 mask=o_ok[:, None] & (ranks[None, :] < R))

    # -- partial dA[k, (t, c)] = sum_p u[p, k] X[p, (t, c)] for this block and group --
    u_op = u
    if not UPCAST:
        u_op = u.to(x_ptr.dtype.element_ty)
    u_op = tl.trans(u_op)
    ws_a_rows = ws_a_ptr + (pid_m * num_groups + group) * R * K
    for t in range(KH * KW):
        x_rows, pix_ok = _tap_rows(x_ptr, n, oh, ow, row_ok, t, H, W, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                   DIL_H, DIL_W, stride_xn, stride_xh, stride_xw)
        for c0 in range(0, C_IN_G, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C_IN_G
            x_tile = _load_tile(x_rows, pix_ok, c_base + cc, c_ok, stride_xc, UPCAST)
            part_a = tl.dot(u_op, x_tile, input_precision=INPUT_PRECISION)
            tl.store(ws_a_rows + ranks[:, None] * K + (t * C_IN_G + cc)[None, :], part_a,
                     mask=(ranks[:, None] < R) & c_ok[None, :])


def _pow2_block(n: int, cap: int) -> int:
    return max(_MIN_DOT, min(cap, triton.next_power_of_2(n)))


def lora_conv2d_lowrank_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA, dB of a LoRA conv from x (already padded where the mode needs it) and dy; no autograd.

    ``padding`` is the symmetric zero padding the kernel applies itself.
    """
    n, c_in, h, w = x.shape
    _, c_out, ho, wo = dy.shape
    rank, c_in_g, kh, kw = lora_A.shape
    if dy.shape[0] != n or c_in != c_in_g * groups or lora_B.shape[0] != c_out:
        raise ValueError(
            f"lora_conv2d triton grads: inconsistent shapes x {tuple(x.shape)}, dy {tuple(dy.shape)}, "
            f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}, groups {groups}"
        )
    if x.device != dy.device or x.dtype != dy.dtype:
        raise ValueError(f"x and dy must share device and dtype, got {x.device}/{x.dtype} and {dy.device}/{dy.dtype}")
    r_pad = _pow2_block(rank, 1 << 30)
    # Adapter matrices, padded to r_pad columns, in the (tap, channel) order the kernel walks.
    a_mat = torch.zeros(kh * kw * c_in_g, r_pad, device=x.device, dtype=x.dtype)
    a_mat[:, :rank] = lora_A.permute(2, 3, 1, 0).reshape(-1, rank)
    b_mat = torch.zeros(c_out, r_pad, device=x.device, dtype=x.dtype)
    b_mat[:, :rank] = lora_B.reshape(c_out, rank)

    m = n * ho * wo
    num_blocks = triton.cdiv(m, _BLOCK_M)
    k = kh * kw * c_in_g
    ws_a = torch.empty(num_blocks, groups, rank, k, device=x.device, dtype=torch.float32)
    ws_b = torch.empty(num_blocks, c_out, rank, device=x.device, dtype=torch.float32)
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    block_o = _pow2_block(c_out // groups, 16 if _INTERPRET else 64)
    block_c = _pow2_block(c_in_g, 16 if _INTERPRET else 64)
    _lora_conv2d_lowrank_grad_kernel[(num_blocks, groups)](
        x, dy, a_mat, b_mat, ws_a, ws_b,
        m, h, w, ho, wo, c_in_g, c_out // groups, rank,
        *x.stride(), *dy.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw,
        R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_O=block_o, BLOCK_C=block_c,
        INPUT_PRECISION=precision, UPCAST=_INTERPRET,
        num_warps=8,
    )
    grad_a = ws_a.sum((0, 1)).reshape(rank, kh, kw, c_in_g).permute(0, 3, 1, 2)
    grad_b = ws_b.sum(0).reshape(c_out, rank, 1, 1)
    return (scaling * grad_a).to(lora_A.dtype).contiguous(), (scaling * grad_b).to(lora_B.dtype)
