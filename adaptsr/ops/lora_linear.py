r"""LoRA linear layer: a frozen matmul plus a trainable low-rank update.

Shapes (PEFT): ``W: [out, in]``, ``b: [out]``, ``A: [r, in]``, ``B: [out, r]``, scaling ``s``;
``x: [..., in]`` with ``M`` rows in all.

Forward::

    W' = W + s B A
    y  = x W'^T + b

Backward (``dy = dL/dy``, rows flattened to ``[M, out]``)::

    dx = dy W'
    db = sum_rows dy
    low-rank pass:   u = dy B  [M, r]     z = x A^T  [M, r]
                     dA = s u^T x         dB = s dy^T z
    full-wgrad pass: dW' = dy^T x
                     dA = s B^T dW'       dB = s dW' A^T
    dW = dW'                              (only when the base weight is trainable)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptsr.backend import resolve
from adaptsr.ops._autocast import apply_in_one_dtype
from adaptsr.ops._scaled_mm import scaled_mm
from adaptsr.ops.lora_conv2d import _merged_weight, saves_merged_weight

__all__ = ["linear_delta_weight", "lora_linear", "lora_linear_ref"]

# The backward's choice of pass. The low-rank pass has the fewer FLOPs, 4 M r (in + out) against the
# full weight gradient's 2 M in out; the thin matmuls run below peak, so it must win by this factor:
_THIN_MATMUL_PENALTY = 1.5
# But the torch backend's low-rank pass reads x and dy twice (z = x A^T and dA = u^T x; u^T = B^T dy^T
# and dB = (z^T dy)^T), where the full gradient dy^T x reads each once and, for SR-sized layers, is
# bound by those bytes rather than its FLOPs. So the full gradient is also faster until its FLOPs per
# element read, in*out / (in + out), pass a bound set by the device's FLOPs per byte:
#   - CPU (2-core EPYC, torch 2.14, 16,384 tokens, r = 8; fp32, bf16 and fp64 alike): the full
#     gradient faster up to 36 (48->144 fp32: 1.7 vs 3.2 ms), the low-rank pass from 90 on
#     (180->180: 9.3 vs 12.7 ms; 180->540: 19.6 vs 22.3 ms; 256->256 bf16: 3.1 vs 7.4 ms);
#   - H100 (benchmarks/results/gpu-h100-2026-11-25*.md: 180->360 and 180->540 on 65,536 tokens,
#     r = 4-16): bf16 full 0.077-0.118 ms vs low-rank 0.103-0.142 ms at 120-135 (16-bit tensor-core
#     matmuls do ~256 FLOPs per byte of bandwidth: bound 2 x 256), fp32 low-rank 0.21-0.29 ms vs
#     full 0.35-0.46 ms (~22 FLOPs per byte without TF32: bound 4 x 22).
_LOW_RANK_MIN_INTENSITY_CPU = 64.0
_LOW_RANK_MIN_INTENSITY_CUDA = {torch.float16: 512.0, torch.bfloat16: 512.0, torch.float32: 88.0}
# The triton backend's forward: True runs y = x W'^T + b and z = x A^T as one Triton GEMM (one pass
# over x); False leaves y to cuBLAS and z to a thin cuBLAS matmul. Which is faster is the GPU
# benchmark's call (benchmarks/gpu/kernel_roofline.py); not measured yet.
_DENSE_FORWARD_IN_TRITON = True


def linear_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """DeltaW = B A, ``[out, in]`` (unscaled)."""
    return lora_B @ lora_A


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The two-path oracle: ``x W^T + b + s (lora_input A^T) B^T`` (``lora_input`` defaults to x)."""
    lora_input = x if lora_input is None else lora_input
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(lora_input, lora_A), lora_B)


# -- host helpers --


def _check_shapes(x, weight, bias, lora_A, lora_B) -> None:
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"lora_linear: x of shape {tuple(x.shape)} has {x.shape[-1]} features, "
            f"the weight {tuple(weight.shape)} expects {in_features}"
        )
    rank = lora_A.shape[0]
    if tuple(lora_A.shape) != (rank, in_features):
        raise ValueError(f"lora_linear: lora_A must have shape [r, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_linear: lora_B must have shape [{out_features}, {rank}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: bias must have shape [{out_features}], got {tuple(bias.shape)}")


def _prefer_low_rank(weight: torch.Tensor, rank: int, impl: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether the backward takes the low-rank pass (u = dy B, z = x A^T) over the full weight gradient,
    for inputs of ``dtype`` on a ``device_type`` device (the triton and cuda backends' own low-rank kernels
    read x and dy once: for them the FLOPs decide)."""
    out_features, in_features = weight.shape
    if 2 * rank * (in_features + out_features) * _THIN_MATMUL_PENALTY >= out_features * in_features:
        return False
    if impl != "torch":
        return True
    if device_type == "cuda":
        bound = _LOW_RANK_MIN_INTENSITY_CUDA.get(dtype, 0.0)
    else:
        bound = _LOW_RANK_MIN_INTENSITY_CPU
    return in_features * out_features / (in_features + out_features) > bound


class _LoRALinearFunction(torch.autograd.Function):
    """Merged-weight forward (one matmul); backward computes dx, dA, dB exactly, saving x (and z) besides the
    weights (``lora_conv2d.saves_merged_weight``).

    The low-rank gradient pass runs where ``impl`` says: "torch" (torch matmuls), "triton" (the
    Triton kernels, whose forward also emits z = x A^T, saved for the backward) or "cuda" (the
    CUDA C++ kernel); the other dense parts run in torch (cuBLAS on a GPU).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, impl):
        w_merged = _merged_weight(weight, lora_A, lora_B, scaling)
        # The backward's pass is chosen here, once: the triton forward needs to know whether to emit z.
        low_rank = (
            _prefer_low_rank(weight, lora_A.shape[0], impl, x.device.type, x.dtype) and not ctx.needs_input_grad[1]
        )
        z = None
        if impl == "triton" and x.dtype != torch.float64:
            from adaptsr.kernels.lora_linear import lora_linear_fwd

            # z = x A^T (r columns) is worth saving only when the backward takes the low-rank pass.
            want_z = low_rank and any(ctx.needs_input_grad[3:5])
            if _DENSE_FORWARD_IN_TRITON:
                x2 = x.reshape(-1, x.shape[-1])
                y2, z = lora_linear_fwd(x2, w_merged, bias, lora_A.to(x.dtype) if want_z else None)
                y = y2.reshape(*x.shape[:-1], w_merged.shape[0])
            else:
                y = F.linear(x, w_merged, bias)
                z = x.reshape(-1, x.shape[-1]) @ lora_A.to(x.dtype).t() if want_z else None
        else:
            y = F.linear(x, w_merged, bias)
        ctx.merged_saved = saves_merged_weight(weight)
        ctx.save_for_backward(x, w_merged if ctx.merged_saved else weight, lora_A, lora_B, z)
        ctx.scaling, ctx.impl, ctx.low_rank = scaling, impl, low_rank
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, z = ctx.saved_tensors
        s = ctx.scaling
        w_merged = weight if ctx.merged_saved else _merged_weight(weight, lora_A, lora_B, s)  # the forward's W
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])

        grad_x = (dy @ w_merged) if need_x else None
        grad_bias = dy2.sum(0) if need_b else None
        grad_w = grad_a = grad_b = None
        low_rank = ctx.low_rank
        if need_w or ((need_a or need_bb) and not low_rank):
            grad_w = dy2.t() @ x2
        if need_a or need_bb:
            # The CUDA kernels take float32, float16 and bfloat16; float64 runs the torch matmuls.
            if low_rank and ctx.impl == "cuda" and x2.dtype != torch.float64:
                from adaptsr import _cuda

                grad_a, grad_b = _cuda.lora_linear_lowrank_grads(x2, dy2, lora_A, lora_B, s)
            elif low_rank and ctx.impl == "triton" and x2.dtype != torch.float64:
                from adaptsr.kernels.lora_linear import lora_linear_lowrank_grads

                grad_a, grad_b = lora_linear_lowrank_grads(x2, dy2, lora_A, lora_B, s, z)
            elif low_rank:
                # Each product with r on the outside of the result (u^T = B^T dy^T, then u^T x; z^T dy): on
                # the CPU the same products as dy B, u^T x, dy^T z are up to 2x faster this way round.
                u_t = lora_B.t() @ dy2.t()
                grad_a = scaled_mm(u_t, x2, s, like=lora_A)
                grad_b = scaled_mm((x2 @ lora_A.t()).t(), dy2, s, like=lora_B.t()).t()
            else:
                grad_a = scaled_mm(lora_B.t(), grad_w, s, like=lora_A)
                grad_b = scaled_mm(grad_w, lora_A.t(), s, like=lora_B)
            grad_a, grad_b = grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype)
        return (
            grad_x,
            grad_w if need_w else None,
            grad_bias,
            grad_a if need_a else None,
            grad_b if need_bb else None,
            None,
            None,
        )


# -- functional entry point --


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x (W + s B A)^T + b`` on the selected backend."""
    _check_shapes(x, weight, bias, lora_A, lora_B)
    backend = resolve(x.device, "lora_linear", call=(lora_linear, (x, weight, bias, lora_A, lora_B, scaling)))
    if backend == "reference":
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling)
    if backend == "cuda" and not x.is_cuda:
        raise RuntimeError(
            f"lora_linear: the 'cuda' backend runs on CUDA tensors, got x on {x.device}; move the model and its "
            "inputs to the GPU, or select another backend (adaptsr.set_backend('torch'))"
        )
    if backend in ("torch", "triton", "cuda"):
        return apply_in_one_dtype(_LoRALinearFunction, x, weight, bias, lora_A, lora_B, float(scaling), backend)
    raise NotImplementedError(f"lora_linear has no {backend!r} backend")
