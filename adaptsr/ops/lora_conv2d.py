r"""LoRA 2-D convolution: a frozen conv plus a trainable low-rank update.

Shapes (PEFT-compatible): ``W: [out, in/g, kh, kw]``, ``b: [out]``, ``A: [r, in/g, kh, kw]``
(same stride, padding, dilation and padding mode as the base), ``B: [out, r, 1, 1]``, scaling ``s``.

Forward::

    DeltaW[o, i, :, :] = sum_k B[o, k] A[k, i, :, :]          (block-structured for groups g > 1)
    W' = W + s DeltaW
    y  = conv(x, W') + b

With groups, ``A`` is shared by every group: ``z = conv(x, A repeated g times, groups=g)`` has
``g r`` channels and ``B`` acts as a grouped 1x1 conv on them, so the two-path form and the
merged form are the same function, exactly.

Backward (``dy = dL/dy``)::

    dx = conv_transpose(dy, W')                                 (what the frozen model computes)
    db = sum_{n,p} dy
    low-rank pass:   u  = B^T dy  (g r channels)      z = conv(x, A)
                     dA = s sum_groups weight_grad(x, u)
                     dB = s sum_{n,p} dy z^T
    full-wgrad pass: dW' = weight_grad(x, dy)
                     dA = s B^T dW'                    dB = s dW' A^T
    dW = dW'                                           (only when the base weight is trainable)

The two passes give the same numbers; which is cheaper depends on the shapes (see
``_prefer_low_rank``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptsr.backend import resolve
from adaptsr.ops._autocast import apply_in_one_dtype
from adaptsr.ops._conv_geometry import ConvGeometry, memory_format_of
from adaptsr.ops._scaled_mm import scaled_mm

__all__ = ["conv_delta_weight", "lora_conv2d", "lora_conv2d_ref"]

# Thin convolutions (r output channels) run well below the machine's peak rate, so the low-rank
# pass must win on FLOPs by this factor to be chosen. On CUDA, and for the triton and cuda
# backends' own kernels: 1.5 (the GPU runs behind it are in benchmarks/gpu/NOTES.md).
_THIN_CONV_PENALTY = 1.5
# The torch backend on the CPU (oneDNN): on the 2-core CPU, 3x3 convs at batch 8-16 of 32x32, r = 8,
# the low-rank pass cost 1.8-5.8x its FLOP share of the full weight gradient (measured beside a
# convolution_backward that returns dx and dW' together). The full gradient won or tied at 24-152 -> 24-48
# channels (RRDB's dense blocks, a light SwinIR's 48; any penalty >= 2.7 picks it there), the low-rank
# pass won or tied from 64 -> 64 (any penalty < 3.6 keeps it there).
_THIN_CONV_PENALTY_CPU = 3.0
# The triton backend's forward: True runs y = conv(x, W') and z = conv(x, A) as one Triton implicit
# GEMM (one pass over x); False leaves y to cuDNN and runs only z's r channels in Triton. Which
# is faster is the GPU benchmark's call (benchmarks/gpu/run.sh); not measured yet.
_DENSE_FORWARD_IN_TRITON = True


def conv_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """DeltaW = B A as a conv weight ``[out, in/g, kh, kw]`` (unscaled)."""
    rank = lora_A.shape[0]
    out_channels = lora_B.shape[0]
    delta = lora_B.reshape(out_channels, rank) @ lora_A.reshape(rank, -1)
    return delta.reshape(out_channels, *lora_A.shape[1:])


def _merged_weight(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """W' = W + s B A in one addmm (one launch where add, scale and matmul were three: on a GPU the
    per-layer launches, not the math, bound these small ops)."""
    out_channels, rank = lora_B.shape[:2]
    merged = torch.addmm(weight.reshape(out_channels, -1), lora_B.reshape(out_channels, rank),
                         lora_A.reshape(rank, -1), alpha=scaling)
    return merged.view(weight.shape)


def saves_merged_weight(weight: torch.Tensor) -> bool:
    """Whether a Function saves W' for its backward rather than forming it again there from ``weight``.

    A parameter is kept alive by its module anyway: saving it and forming W' again in the backward (one
    weight-sized addmm) leaves x (and z) as the only tensors saved, as in full fine-tuning. Any other weight
    (autocast's cast copy, above all) would cost as much memory as W' itself, so W' is saved instead and the
    backward spares the launch, which bounds these small ops on a GPU.
    """
    return not isinstance(weight, torch.nn.Parameter)


def _repeat_for_groups(lora_A: torch.Tensor, groups: int) -> torch.Tensor:
    return lora_A if groups == 1 else lora_A.repeat(groups, 1, 1, 1)


def lora_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    geometry: ConvGeometry,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The two-path oracle: ``base(x) + s * B(A(lora_input))`` in plain torch.

    ``lora_input`` defaults to ``x``; pass a dropped-out copy of ``x`` for LoRA dropout.
    """
    lora_input = x if lora_input is None else lora_input
    g = geometry.groups
    base = geometry.conv(geometry.pad_input(x), weight, bias)
    z = geometry.conv(geometry.pad_input(lora_input), _repeat_for_groups(lora_A, g))
    update = F.conv2d(z, lora_B, groups=g)
    return base + scaling * update


# -- host helpers (shapes, costs, gradient pieces; no autograd) --


def _check_shapes(x, weight, bias, lora_A, lora_B, geometry: ConvGeometry) -> None:
    if x.dim() != 4:
        raise ValueError(f"lora_conv2d expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    out_channels, in_per_group = weight.shape[:2]
    g = geometry.groups
    if x.shape[1] != in_per_group * g:
        raise ValueError(
            f"lora_conv2d: x of shape {tuple(x.shape)} has {x.shape[1]} channels but the weight "
            f"{tuple(weight.shape)} with groups={g} expects {in_per_group * g}"
        )
    rank = lora_A.shape[0]
    if lora_A.shape[1:] != weight.shape[1:]:
        raise ValueError(
            f"lora_conv2d: lora_A must have shape [r, {in_per_group}, {weight.shape[2]}, {weight.shape[3]}], "
            f"got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (out_channels, rank, 1, 1):
        raise ValueError(
            f"lora_conv2d: lora_B must have shape [{out_channels}, {rank}, 1, 1], got {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"lora_conv2d: bias must have shape [{out_channels}], got {tuple(bias.shape)}")


def _prefer_low_rank(weight: torch.Tensor, rank: int, groups: int, impl: str, device_type: str) -> bool:
    """Whether the low-rank pass costs fewer (penalised) FLOPs per output pixel than the full wgrad,
    for backend ``impl`` on a ``device_type`` device."""
    out_channels, in_per_group, kh, kw = weight.shape
    in_channels, taps = in_per_group * groups, kh * kw
    full = out_channels * in_per_group * taps
    # z = conv(x, A) and the weight-grad into A: r*in*taps each; u = B^T dy and dB: out*r each.
    low_rank = 2 * rank * in_channels * taps + 2 * out_channels * rank
    penalty = _THIN_CONV_PENALTY_CPU if impl == "torch" and device_type != "cuda" else _THIN_CONV_PENALTY
    return low_rank * penalty < full


def _weight_grad(x_padded, dy, weight_like, geometry: ConvGeometry, groups: int):
    return torch.ops.aten.convolution_backward(
        dy, x_padded, weight_like, None, geometry.stride, geometry.conv_padding, geometry.dilation,
        False, [0, 0], groups, [False, True, False],
    )[1]


def _low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry: ConvGeometry):
    """dA, dB through the rank-r channels u = B^T dy and z = conv(x, A)."""
    g = geometry.groups
    rank = lora_A.shape[0]
    out_channels = lora_B.shape[0]
    out_per_group = out_channels // g
    # u_g[k] = sum over the group's outputs o of B[o, k] dy_o: a grouped 1x1 conv.
    b_t = lora_B.reshape(g, out_per_group, rank).transpose(1, 2).reshape(g * rank, out_per_group, 1, 1)
    u = F.conv2d(dy, b_t, groups=g)
    a_rep = _repeat_for_groups(lora_A, g)
    grad_a = _weight_grad(x_padded, u, a_rep, geometry, g)
    grad_a = grad_a.reshape(g, rank, *lora_A.shape[1:]).sum(0) if g > 1 else grad_a
    z = geometry.conv(x_padded, a_rep)
    return scaling * grad_a, scaling * _pixel_sum_outer(dy, z, g).reshape(out_channels, rank, 1, 1)


def _pixel_sum_outer(dy: torch.Tensor, z: torch.Tensor, groups: int) -> torch.Tensor:
    """``[out, r]``: sum over batch and pixels of dy_o z_{group(o), k}, one (batched) matmul.

    Pixels-by-channels views are free for channels-last tensors and channels-by-pixels views for
    contiguous ones; the matmul is arranged so neither tensor is copied.
    """
    n, out_channels = dy.shape[:2]
    rank = z.shape[1] // groups
    if dy.is_contiguous() or not dy.is_contiguous(memory_format=torch.channels_last):
        # (z dy^T)^T here too: 0.27 vs 0.41 ms at 4 x 64 x 64 x 64, 4.1 vs 6.5 ms at 16 x 180 x 64 x 64
        dy_cols = dy.reshape(n, groups, out_channels // groups, -1).transpose(2, 3)
        z_rows = z.reshape(n, groups, rank, -1)
        return torch.matmul(z_rows, dy_cols).sum(0).transpose(1, 2).reshape(out_channels, rank)
    dy_pix = dy.permute(0, 2, 3, 1).reshape(-1, out_channels)
    z_pix = z.permute(0, 2, 3, 1).reshape(-1, groups * rank)
    # (z^T dy)^T, not dy^T z: BLAS runs the long pixel reduction 4x faster in this orientation
    # (0.22 ms vs 0.88 ms for 64 x 16384 x 8 on the 2-core CPU).
    out_per_group = out_channels // groups
    per_group = [
        (z_pix[:, i * rank:(i + 1) * rank].t() @ dy_pix[:, i * out_per_group:(i + 1) * out_per_group]).t()
        for i in range(groups)
    ]
    return per_group[0] if groups == 1 else torch.cat(per_group)


def _full_wgrad_to_lora(grad_w_merged, lora_A, lora_B, scaling):
    """dA = s B^T dW', dB = s dW' A^T."""
    rank, out_channels = lora_A.shape[0], lora_B.shape[0]
    flat = grad_w_merged.reshape(out_channels, -1)
    a_rows, b_cols = lora_A.reshape(rank, -1), lora_B.reshape(out_channels, rank)
    grad_a = scaled_mm(b_cols.t(), flat, scaling, like=a_rows)
    grad_b = scaled_mm(flat, a_rows.t(), scaling, like=b_cols)
    return grad_a.view(lora_A.shape), grad_b.view(lora_B.shape)


def _triton_forward(x_padded, w_merged, bias, lora_A, geometry: ConvGeometry, want_z: bool):
    """(y, z or None) through the Triton forward: y = conv(x, W') + b, and z = conv(x, A) for the backward.

    With ``_DENSE_FORWARD_IN_TRITON`` the kernel computes both in one pass over x; otherwise y
    comes from torch (cuDNN) and the kernel computes only the r channels of z.
    """
    from adaptsr.kernels.lora_conv2d import lora_conv2d_fwd

    args = (geometry.stride, geometry.conv_padding, geometry.dilation, geometry.groups)
    lora_A = lora_A.to(x_padded.dtype) if want_z else None
    if _DENSE_FORWARD_IN_TRITON:
        return lora_conv2d_fwd(x_padded, w_merged, bias, lora_A, *args)
    y = geometry.conv(x_padded, w_merged, bias)
    return y, (lora_conv2d_fwd(x_padded, None, None, lora_A, *args)[1] if want_z else None)


def _fused_low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry: ConvGeometry, z=None):
    """The Triton kernels' passes over dy and x (z = conv(x, A) from the forward, or recomputed).

    The kernels take float32, float16 and bfloat16; float64 runs the torch pass.
    """
    if x_padded.dtype == torch.float64:
        return _low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry)
    from adaptsr.kernels.lora_conv2d import lora_conv2d_lowrank_grads

    return lora_conv2d_lowrank_grads(
        x_padded, dy, lora_A, lora_B, scaling, geometry.stride, geometry.conv_padding, geometry.dilation,
        geometry.groups, z=z,
    )


def _cuda_low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry: ConvGeometry):
    """The CUDA C++ kernel's pass over x and dy (adaptsr._C, loaded or built on first use).

    The kernels take float32, float16 and bfloat16; float64 (tests, the odd careful user) runs the
    torch pass, which keeps float64 all the way.
    """
    if x_padded.dtype == torch.float64:
        return _low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry)
    from adaptsr import _cuda

    return _cuda.lora_conv2d_lowrank_grads(
        x_padded, dy, lora_A, lora_B, scaling, geometry.stride, geometry.conv_padding, geometry.dilation,
        geometry.groups,
    )


class _LoRAConv2dFunction(torch.autograd.Function):
    """Merged-weight forward (one conv); backward computes dx, dA, dB exactly, saving x (and z) besides the
    weights (``saves_merged_weight``).

    The dense parts (dx, full wgrad, and the forward except under "triton") run in torch (cuDNN on
    a GPU); the low-rank gradient pass runs where ``impl`` says: "torch" (torch ops), "triton" (the
    Triton kernels, whose forward also emits z = conv(x, A), r channels, saved for the backward
    instead of a second pass over x) or "cuda" (the CUDA C++ kernel).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, geometry, impl):
        w_merged = _merged_weight(weight, lora_A, lora_B, scaling)
        x_padded = geometry.pad_input(x)
        # The backward's pass is chosen here, once: the triton forward needs to know whether to emit z.
        low_rank = (_prefer_low_rank(weight, lora_A.shape[0], geometry.groups, impl, x.device.type)
                    and not ctx.needs_input_grad[1])
        z = None
        if impl == "triton" and x.dtype != torch.float64:
            # z (r channels per pixel) is worth saving only when the backward takes the low-rank pass.
            want_z = low_rank and any(ctx.needs_input_grad[3:5])
            y, z = _triton_forward(x_padded, w_merged, bias, lora_A, geometry, want_z)
        else:
            y = geometry.conv(x_padded, w_merged, bias)
        ctx.merged_saved = saves_merged_weight(weight)
        ctx.save_for_backward(x, w_merged if ctx.merged_saved else weight, lora_A, lora_B, z)
        ctx.scaling, ctx.geometry, ctx.has_bias, ctx.impl = scaling, geometry, bias is not None, impl
        ctx.low_rank = low_rank
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, z = ctx.saved_tensors
        geometry, scaling = ctx.geometry, ctx.scaling
        # the forward's W', bit for bit
        w_merged = weight if ctx.merged_saved else _merged_weight(weight, lora_A, lora_B, scaling)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy = dy.contiguous(memory_format=memory_format_of(x))

        # Non-zero padding modes: the padded input again (the pad's adjoint, unpad_grad, folds the border
        # gradients back into dx).
        x_padded = geometry.pad_input(x)

        low_rank = ctx.low_rank
        want_full_wgrad = need_w or ((need_a or need_bb) and not low_rank)
        grad_xp, grad_w_merged, grad_bias = torch.ops.aten.convolution_backward(
            dy, x_padded, w_merged, [w_merged.shape[0]] if ctx.has_bias else None,
            geometry.stride, geometry.conv_padding, geometry.dilation, False, [0, 0], geometry.groups,
            [need_x, want_full_wgrad, need_b and ctx.has_bias],
        )

        grad_x = None
        if need_x:
            grad_x = geometry.unpad_grad(grad_xp, x)

        grad_a = grad_b = None
        if need_a or need_bb:
            if low_rank:
                # Looked up at call time (module globals), so tests can wrap each pass.
                if ctx.impl == "cuda":
                    grad_a, grad_b = _cuda_low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry)
                elif ctx.impl == "triton":
                    grad_a, grad_b = _fused_low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry, z)
                else:
                    grad_a, grad_b = _low_rank_grads(x_padded, dy, lora_A, lora_B, scaling, geometry)
            else:
                grad_a, grad_b = _full_wgrad_to_lora(grad_w_merged, lora_A, lora_B, scaling)
            grad_a, grad_b = grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype)
        return (
            grad_x,
            grad_w_merged if need_w else None,
            grad_bias if need_b else None,
            grad_a if need_a else None,
            grad_b if need_bb else None,
            None,
            None,
            None,
        )


def _require_cuda_tensor(op: str, x: torch.Tensor) -> None:
    if not x.is_cuda:
        raise RuntimeError(
            f"{op}: the 'cuda' backend runs on CUDA tensors, got x on {x.device}; move the model and its inputs "
            "to the GPU, or select another backend (adaptsr.set_backend('torch'))"
        )


# -- functional entry point --


def _with_geometry(x, weight, bias, lora_A, lora_B, scaling, geometry):
    """lora_conv2d with the geometry positional: the call autotune's trials repeat."""
    return lora_conv2d(x, weight, bias, lora_A, lora_B, scaling, geometry=geometry)


def lora_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    geometry: ConvGeometry | None = None,
) -> torch.Tensor:
    """``conv(x, W + s B A) + b`` with the nn.Conv2d options, on the selected backend.

    ``geometry`` (from ``ConvGeometry.of(conv)``) replaces the five conv options when given.
    """
    if geometry is None:
        geometry = ConvGeometry.from_args(weight.shape[2:], stride, padding, dilation, groups, padding_mode)
    _check_shapes(x, weight, bias, lora_A, lora_B, geometry)
    call = (_with_geometry, (x, weight, bias, lora_A, lora_B, scaling, geometry))
    backend = resolve(x.device, "lora_conv2d", call=call)
    if backend == "reference":
        return lora_conv2d_ref(x, weight, bias, lora_A, lora_B, scaling, geometry)
    if backend == "cuda":
        _require_cuda_tensor("lora_conv2d", x)
    if backend in ("torch", "triton", "cuda"):
        return apply_in_one_dtype(_LoRAConv2dFunction, x, weight, bias, lora_A, lora_B, float(scaling), geometry, backend)
    raise NotImplementedError(f"lora_conv2d has no {backend!r} backend")
