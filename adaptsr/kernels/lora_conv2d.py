r"""Triton kernels of a LoRA convolution (and of LoRA linear, its 1x1 case): forward and low-rank grads.

For one group g of a convolution with output pixels p (flattened over batch and space), the input
patch X[p, (t, c)] that kernel tap t sees in channel c of the group, the merged weight
W' = W + s B A and the adapter's r channels:

Forward, one pass over x (``lora_conv2d_fwd``)::

    y[p, o] = sum_(t,c) X[p, (t, c)] W'[o, c, t] + bias[o]
    z[p, k] = sum_(t,c) X[p, (t, c)] A[k, c, t]          (conv(x, A): saved for the backward)

    both as one implicit GEMM against the concatenated weight [W'^T | A^T] ((t, c) x (out + r)),
    the columns past ``out`` stored to z instead of y.

Backward, low-rank gradients (``lora_conv2d_lowrank_grads``), two streaming kernels::

    phase 1, reads dy once:  u[p, k]  = sum_o dy[p, o] B[o, k]            (B^T dy, r channels)
                             dB[o, k] = s sum_p dy[p, o] z[p, k]
    phase 2, reads x once:   dA[k, c, t] = s sum_g sum_p u[p, k] X[p, (t, c)]

Each phase is a split-K reduction over pixels: a program owns one column tile (output channels
in phase 1, one (tap, channel block) in phase 2) and a long run of pixels, and accumulates in
registers; the per-program partial sums go to a small workspace that the host sums over programs
in a fixed order, so the result is deterministic (no atomics). The programs of one pixel run are
launched next to each other (the column tile is the fastest grid axis), so the taps' overlapping
reads of x come from L2: device memory sees x once. dx = conv_transpose(dy, W') is the dense
part and stays with cuDNN.

A linear layer is the 1x1 case with H = W = 1 (``adaptsr.kernels.lora_linear``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from adaptsr.ops._conv_geometry import check_lowrank_grad_inputs, memory_format_of
from adaptsr.ops._tf32 import conv_allows_tf32

# The interpreter needs powers of two and is slow per element: keep tiles minimal there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tl.dot needs at least 16 in every dimension on the GPU's matrix units.
_MIN_DOT = 16
# Pixels per step of the streaming loops: 128 rows x 64 channels of bf16 is one 16 KB tile per
# operand, which leaves room for two pipeline stages in shared memory.
_BLOCK_M = 16 if _INTERPRET else 128
# Phase 1 keeps a [pixels, out-channels] dy tile and a [out, r] dB accumulator in registers; up to
# 256 output channels a group's dy row is one tile, so u needs no partial sums across tiles. Its
# pixel step shrinks as the tile widens: 16 KB per dy tile compiled without register spills for
# sm_80/86/90 at 8 warps (benchmarks/gpu/ptxas_report.py); 128 x 256 bf16 spilled 6 KB.
_MAX_BLOCK_O = 16 if _INTERPRET else 256
_PHASE1_TILE_BYTES = 16384
_MAX_BLOCK_C = 16 if _INTERPRET else 64
# Programs per streaming launch, per SM: enough to hide latency, few enough that each program
# accumulates over many pixels (a small workspace). The interpreter gets a handful of programs
# so that tests exercise the cross-program sums.
_PROGRAMS_PER_SM = 4
_INTERPRET_PROGRAMS = 3


# Implicit-GEMM tiles for the forward, (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages), per kind of
# product: each one compiles without register spills for sm_80/86/90 at the benchmark shapes
# (benchmarks/gpu/ptxas_report.py --check). float32 tiles need more warps and fewer stages; in TF32
# a 128 x 128 tile spills 200 bytes on sm_90 (the wgmma accumulator plus the operands), in IEEE
# products (CUDA cores) it does not.
_FWD_TILES = {
    "16-bit": [(128, 64, 32, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 128, 32, 4, 3)],
    "fp32 tf32": [(128, 64, 32, 8, 2), (128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (64, 64, 32, 4, 2)],
    "fp32 ieee": [(128, 64, 32, 8, 2), (128, 128, 32, 8, 2), (128, 64, 16, 8, 2), (64, 128, 16, 8, 2)],
}


def _tile_set(element_size: int, input_precision: str) -> str:
    if element_size == 2:
        return "16-bit"
    return f"fp32 {input_precision}"


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16, "TILE_SET": "any"}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c, "TILE_SET": name}, num_warps=w, num_stages=st)
        for name, tiles in _FWD_TILES.items()
        for m, n, c, w, st in tiles
    ]


def _configs_for_inputs(configs, named_args, **kwargs):
    """Autotune only the tiles made for x's element size and the products' precision (the others
    spill registers)."""
    wanted = _tile_set(named_args["x_ptr"].element_size(), kwargs["INPUT_PRECISION"])
    return [c for c in configs if c.kwargs["TILE_SET"] in ("any", wanted)] or configs


# Phase 2 tiles (BLOCK_M, BLOCK_C, warps) per element size: spill-free for sm_80/86/90 in both
# layouts at the benchmark shapes (ptxas_report.py); 128 x 64 at 4 warps spilled up to 700 bytes.
_PHASE2_TILES = {2: (128, 64, 8), 4: (64, 32, 4)}


# -- shared helpers --


@triton.jit
def _load_tile(row_ptrs, row_ok, cols, col_ok, stride_col, UPCAST: tl.constexpr):
    """A [rows, cols] tile of a channels-strided tensor, zero where masked (padding, ragged edges)."""
    tile = tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _pixel_rows(ptr, rows, HO, WO, stride_n, stride_h, stride_w):
    """Row pointers of output pixels ``rows`` (flattened n, oh, ow) in a [N, C, HO, WO]-strided tensor.

    The division runs in int32 (64-bit division is a slow software routine on the GPU, and it
    spilled registers); only the offsets, which can pass 2**31 elements, are int64.
    """
    n = rows // (HO * WO)
    rem = rows % (HO * WO)
    return ptr + n.to(tl.int64) * stride_n + (rem // WO).to(tl.int64) * stride_h + (rem % WO).to(tl.int64) * stride_w


@triton.jit
def _tap_rows(x_ptr, rows, row_ok, t, H, W, HO, WO, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
              stride_xn, stride_xh, stride_xw):
    """Row pointers into x for kernel tap t of output pixels ``rows``, and which rows fall inside x."""
    n = rows // (HO * WO)
    rem = rows % (HO * WO)
    ih = (rem // WO) * STRIDE_H - PAD_H + (t // KW) * DIL_H
    iw = (rem % WO) * STRIDE_W - PAD_W + (t % KW) * DIL_W
    inside = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return x_ptr + n.to(tl.int64) * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, inside


# -- forward: y = conv(x, W') + bias and z = conv(x, A) in one implicit GEMM --


@triton.autotune(configs=_fwd_configs(), key=["C_IN_G", "N_COLS", "KH", "KW", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _configs_for_inputs})
@triton.jit
def _lora_conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    M, H, W, HO, WO,
    C_IN_G, C_OUT_G, R, N_COLS,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_zn, stride_zc, stride_zh, stride_zw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TILE_SET: tl.constexpr,
):
    # Pixel indices stay int32 (the host checks M < 2**31); pointer offsets go int64 in the helpers.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_COLS
    # w: [groups, (t, c), N_COLS], the group's W'^T then A^T
    w_rows = w_ptr + group * (KH * KW * C_IN_G) * N_COLS

    # -- acc = X [W'^T | A^T] over the taps and the group's input channels --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(KH * KW):
        x_rows, pix_ok = _tap_rows(x_ptr, rows, row_ok, t, H, W, HO, WO, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                   DIL_H, DIL_W, stride_xn, stride_xh, stride_xw)
        for c0 in range(0, C_IN_G, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C_IN_G
            x_tile = _load_tile(x_rows, pix_ok, group * C_IN_G + cc, c_ok, stride_xc, UPCAST)
            w_tile = _load_tile(w_rows + (t * C_IN_G + cc) * N_COLS, c_ok, cols, col_ok, 1, UPCAST)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)

    # -- epilogue: columns below C_OUT_G are y (plus bias), the rest are z --
    is_y = cols < C_OUT_G
    if HAS_BIAS:
        acc += tl.load(bias_ptr + group * C_OUT_G + cols, mask=is_y, other=0.0).to(tl.float32)[None, :]
    y_rows = _pixel_rows(y_ptr, rows, HO, WO, stride_yn, stride_yh, stride_yw)
    tl.store(y_rows[:, None] + (group * C_OUT_G + cols)[None, :] * stride_yc,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & is_y[None, :])
    z_rows = _pixel_rows(z_ptr, rows, HO, WO, stride_zn, stride_zh, stride_zw)
    z_cols = group * R + cols - C_OUT_G
    tl.store(z_rows[:, None] + z_cols[None, :] * stride_zc,
             acc.to(z_ptr.dtype.element_ty), mask=row_ok[:, None] & (~is_y & col_ok)[None, :])


# -- backward phase 1: u = dy B (stored) and dB partials = dy^T z, one pass over dy --


@triton.jit
def _lowrank_u_db_kernel(
    dy_ptr, b_ptr, z_ptr, u_ptr, ws_b_ptr, scaling,
    M, HO, WO, C_OUT_G, R, ROWS_PER_PROGRAM,
    stride_dn, stride_dc, stride_dh, stride_dw,
    stride_zn, stride_zc, stride_zh, stride_zw,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tl.static_assert(R_PAD >= 16)
    o_block = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    num_groups = tl.num_programs(2)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    oc = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = oc < C_OUT_G
    # B itself ([out, R] contiguous), zero past R, so u's padded columns are zero
    b_tile = _load_tile(b_ptr + (group * C_OUT_G + oc) * R, o_ok, ranks, rank_ok, 1, UPCAST)
    # u: [o_blocks, M, groups * R], this program's partial over its output-channel tile
    u_base = u_ptr + o_block.to(tl.int64) * M * num_groups * R + group * R

    acc_b = tl.zeros((BLOCK_O, R_PAD), dtype=tl.float32)
    row_start = split * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        # -- load the dy tile once: it feeds u and dB --
        dy_rows = _pixel_rows(dy_ptr, rows, HO, WO, stride_dn, stride_dh, stride_dw)
        dy_tile = _load_tile(dy_rows, row_ok, group * C_OUT_G + oc, o_ok, stride_dc, UPCAST)
        u = tl.dot(dy_tile, b_tile, input_precision=INPUT_PRECISION)
        tl.store(u_base + rows.to(tl.int64)[:, None] * (num_groups * R) + ranks[None, :],
                 u.to(u_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])
        # -- dB partial += dy^T z --
        z_rows = _pixel_rows(z_ptr, rows, HO, WO, stride_zn, stride_zh, stride_zw)
        z_tile = _load_tile(z_rows, row_ok, group * R + ranks, rank_ok, stride_zc, UPCAST)
        acc_b = tl.dot(tl.trans(dy_tile), z_tile, acc_b, input_precision=INPUT_PRECISION)

    # ws_b: [splits, out, R], scaled here so the host only sums over splits
    tl.store(ws_b_ptr + (split * num_groups * C_OUT_G + group * C_OUT_G + oc)[:, None] * R + ranks[None, :],
             acc_b * scaling, mask=o_ok[:, None] & rank_ok[None, :])


# -- backward phase 2: dA partials = u^T X, one pass over x --


@triton.jit
def _lowrank_da_kernel(
    x_ptr, u_ptr, ws_a_ptr, scaling,
    M, H, W, HO, WO, C_IN_G, R, NUM_O_BLOCKS, ROWS_PER_PROGRAM,
    stride_xn, stride_xc, stride_xh, stride_xw,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tl.static_assert(R_PAD >= 16)
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    num_groups = tl.num_programs(2)
    c_blocks = tl.cdiv(C_IN_G, BLOCK_C)
    t = col_tile // c_blocks
    cc = (col_tile % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C_IN_G
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    u_base = u_ptr + group * R
    o_block_stride = num_groups.to(tl.int64) * M * R  # between phase 1's per-output-tile partials of u

    acc_a = tl.zeros((R_PAD, BLOCK_C), dtype=tl.float32)
    row_start = split * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        # -- u = sum of phase 1's partials over output-channel tiles (one tile up to 256 channels) --
        u_rows = u_base + rows.to(tl.int64) * (num_groups * R)
        # (with several tiles the partials are float32, so the sum rounds once, at the cast below)
        u = _load_tile(u_rows, row_ok, ranks, rank_ok, 1, UPCAST)
        for ob in range(1, NUM_O_BLOCKS):
            u += _load_tile(u_rows + ob * o_block_stride, row_ok, ranks, rank_ok, 1, UPCAST)
        # -- dA partial += u^T X for this tap and channel block --
        x_rows, pix_ok = _tap_rows(x_ptr, rows, row_ok, t, H, W, HO, WO, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                   DIL_H, DIL_W, stride_xn, stride_xh, stride_xw)
        x_tile = _load_tile(x_rows, pix_ok, group * C_IN_G + cc, c_ok, stride_xc, UPCAST)
        acc_a = tl.dot(tl.trans(u.to(x_tile.dtype)), x_tile, acc_a, input_precision=INPUT_PRECISION)

    # ws_a: [splits, groups, R, C_IN_G, KH * KW], A's own layout, scaled: the host only sums over
    # splits and groups (one launch each for dA and dB, where a permute, a scale and a copy were three more)
    ws_rows = ws_a_ptr + ((split * num_groups + group) * R + ranks) * (KH * KW * C_IN_G)
    tl.store(ws_rows[:, None] + (cc * (KH * KW) + t)[None, :], acc_a * scaling,
             mask=rank_ok[:, None] & c_ok[None, :])


# -- host launchers (shapes, workspaces; no autograd) --


def _pow2_block(n: int, cap: int) -> int:
    return max(_MIN_DOT, min(cap, triton.next_power_of_2(max(n, 1))))


def _phase1_block_m(block_o: int, element_size: int) -> int:
    return _BLOCK_M if _INTERPRET else max(_MIN_DOT, min(_BLOCK_M, _PHASE1_TILE_BYTES // element_size // block_o))


def _phase2_tiles(c_in_g: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, warps) of the dA pass."""
    if _INTERPRET:
        return _BLOCK_M, _pow2_block(c_in_g, _MAX_BLOCK_C), 4
    block_m, block_c, warps = _PHASE2_TILES[element_size]
    return block_m, _pow2_block(c_in_g, block_c), warps


def _precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """tl.dot's input precision: float32 products in TF32 where torch would run this op in TF32.

    ``allow_tf32`` None means a convolution's setting (``adaptsr.ops._tf32``); the linear layers pass
    the matmul setting. 16-bit inputs are unaffected.
    """
    return "tf32" if dtype != torch.float32 or conv_allows_tf32(allow_tf32) else "ieee"


def _splits(rows: int, programs_per_split: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per program) for a split-K pass over ``rows`` pixels."""
    if _INTERPRET or device.type != "cuda":
        target = _INTERPRET_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(rows, _BLOCK_M), triton.cdiv(target, programs_per_split)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, splits), _BLOCK_M) * _BLOCK_M
    return triton.cdiv(rows, rows_per_program), rows_per_program


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_pixels(m: int) -> None:
    # The kernels index pixels in int32 (64-bit division is a slow software routine on the GPU).
    if m >= 2**31:
        raise ValueError(f"lora_conv2d triton kernels: {m} output pixels; at most 2**31 - 1 per call (split the batch)")


def _like(x: torch.Tensor, shape) -> torch.Tensor:
    """An empty [N, C, H, W] tensor in x's memory format (channels-last when x is)."""
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))


def lora_conv2d_fwd(
    x: torch.Tensor,
    w_merged: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(y, z): ``conv(x, W') + bias`` and ``conv(x, A)`` (``g r`` channels) from one pass over x.

    ``w_merged`` None gives z only; ``lora_A`` None gives y only. x is already padded where the
    mode needs it; ``padding`` is the symmetric zero padding the kernel applies itself. y and z
    come back in x's memory format. ``allow_tf32``: see ``_precision`` (None: as torch's convs).
    """
    n, c_in, h, w = x.shape
    ref = w_merged if w_merged is not None else lora_A
    c_in_g, kh, kw = ref.shape[1:]
    if c_in != c_in_g * groups:
        raise ValueError(f"lora_conv2d triton forward: x {tuple(x.shape)} does not match weight "
                         f"{tuple(ref.shape)} with groups {groups}")
    c_out = 0 if w_merged is None else w_merged.shape[0]
    rank = 0 if lora_A is None else lora_A.shape[0]
    c_out_g, k = c_out // groups, kh * kw * c_in_g
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
    # The concatenated weight [W'^T | A^T] per group: [groups, (t, c), out/g + r] (A shared by the groups).
    # One cat of permuted views: a single copy kernel (per-layer launches bound these small ops).
    parts = []
    if w_merged is not None:
        parts.append(w_merged.reshape(groups, c_out_g, c_in_g, kh, kw).permute(0, 3, 4, 2, 1))
    if lora_A is not None:
        parts.append(lora_A.permute(2, 3, 1, 0).unsqueeze(0).expand(groups, kh, kw, c_in_g, rank))
    w_cat = torch.cat([p.to(x.dtype) for p in parts], dim=4).view(groups, k, c_out_g + rank)
    n_cols = c_out_g + rank
    y = _like(x, (n, c_out, ho, wo)) if w_merged is not None else None
    z = _like(x, (n, groups * rank, ho, wo)) if lora_A is not None else None
    y_arg, z_arg = (y if y is not None else z), (z if z is not None else y)  # unused outputs: never stored to
    m = n * ho * wo
    _check_pixels(m)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]), groups)

    _lora_conv2d_fwd_kernel[grid](
        x, w_cat, bias if bias is not None else w_cat, y_arg, z_arg,
        m, h, w, ho, wo, c_in_g, c_out_g, rank, n_cols,
        *x.stride(), *y_arg.stride(), *z_arg.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw,
        HAS_BIAS=bias is not None, INPUT_PRECISION=_precision(x.dtype, allow_tf32), UPCAST=_INTERPRET,
    )
    return y, z


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
    z: torch.Tensor | None = None,
    *,
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA, dB of a LoRA conv from x (already padded where the mode needs it) and dy; no autograd.

    ``padding`` is the symmetric zero padding the kernel applies itself. ``z`` = conv(x, A)
    (``g r`` channels) when the forward saved it; otherwise it is computed here (one more pass over x).
    ``allow_tf32``: see ``_precision`` (None: as torch's convs).
    """
    check_lowrank_grad_inputs("triton", x, dy, lora_A, lora_B, groups)
    n, _, h, w = x.shape
    _, c_out, ho, wo = dy.shape
    rank, c_in_g, kh, kw = lora_A.shape
    if z is None:
        _, z = lora_conv2d_fwd(x, None, None, lora_A, stride, padding, dilation, groups, allow_tf32=allow_tf32)
    elif tuple(z.shape) != (n, groups * rank, ho, wo):
        raise ValueError(
            f"lora_conv2d triton grads: z must have shape {(n, groups * rank, ho, wo)}, got {tuple(z.shape)}"
        )
    c_out_g = c_out // groups
    r_pad = _pow2_block(rank, 1 << 30)
    b_mat = lora_B.reshape(c_out, rank).to(x.dtype).contiguous()  # a view of B, as a rule
    m = n * ho * wo
    _check_pixels(m)
    precision = _precision(x.dtype, allow_tf32)

    # -- phase 1: u (x's dtype; partials per output tile in float32 when there are several) and dB --
    block_o = _pow2_block(c_out_g, _MAX_BLOCK_O)
    block_m = _phase1_block_m(block_o, x.element_size())
    o_blocks = triton.cdiv(c_out_g, block_o)
    splits, rows_per_program = _splits(m, o_blocks * groups, x.device)
    u = torch.empty(o_blocks, m, groups * rank, device=x.device, dtype=x.dtype if o_blocks == 1 else torch.float32)
    ws_b = torch.empty(splits, c_out, rank, device=x.device, dtype=torch.float32)
    _lowrank_u_db_kernel[(o_blocks, splits, groups)](
        dy, b_mat, z, u, ws_b, float(scaling),
        m, ho, wo, c_out_g, rank, rows_per_program,
        *dy.stride(), *z.stride(),
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_O=block_o, INPUT_PRECISION=precision, UPCAST=_INTERPRET,
        num_warps=8,
    )

    # -- phase 2: dA --
    block_m, block_c, warps = _phase2_tiles(c_in_g, x.element_size())
    col_tiles = kh * kw * triton.cdiv(c_in_g, block_c)
    splits, rows_per_program = _splits(m, col_tiles * groups, x.device)
    ws_a = torch.empty(splits, groups, rank, kh * kw * c_in_g, device=x.device, dtype=torch.float32)
    _lowrank_da_kernel[(col_tiles, splits, groups)](
        x, u, ws_a, float(scaling),
        m, h, w, ho, wo, c_in_g, rank, o_blocks, rows_per_program,
        *x.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw,
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_C=block_c, INPUT_PRECISION=precision, UPCAST=_INTERPRET,
        num_warps=warps,
    )
    grad_a = ws_a.sum((0, 1)).view(rank, c_in_g, kh, kw)
    grad_b = ws_b.sum(0).view(c_out, rank, 1, 1)
    return grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype)
