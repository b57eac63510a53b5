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

__all__ = ["linear_delta_weight", "lora_linear", "lora_linear_ref"]

# Thin matmuls (r columns) run below peak; the low-rank pass must win by this factor.
_THIN_MATMUL_PENALTY = 1.5
# On a GPU the torch backend's thin pass reads x and dy twice (z = x A^T, then dA = (dy B)^T x;
# u = dy B, then dB = dy^T z), where the full weight gradient dy^T x reads each once and, for
# SR-sized layers, is bound by those bytes rather than its FLOPs. So the full gradient is faster
# until its FLOPs per byte read, in*out / ((in + out) * element size), pass the GPU's FLOPs per
# byte of bandwidth: about 256 for 16-bit tensor-core matmuls on an H100/H200, 22 for fp32
# (no TF32). Measured on an H100 (benchmarks/results/gpu-h100-2026-11-25*.md), 180->360 and
# 180->540 on 65,536 tokens, ranks 4-16: bf16 full 0.077-0.118 ms vs thin 0.103-0.142 ms (full
# wins, in*out/(in+out) = 120-135 < 2 * 256); fp32 full 0.35-0.46 ms vs thin 0.21-0.29 ms
# (thin wins, > 4 * 22).
_CUDA_MATMUL_FLOPS_PER_BYTE = {torch.float16: 256.0, torch.bfloat16: 256.0, torch.float32: 22.0}
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
    for inputs of ``dtype`` on a ``device_type`` device."""
    out_features, in_features = weight.shape
    flops_per_byte = _CUDA_MATMUL_FLOPS_PER_BYTE.get(dtype)
    if impl == "torch" and device_type == "cuda" and flops_per_byte is not None:
        intensity = in_features * out_features / (in_features + out_features) / dtype.itemsize
        return intensity > flops_per_byte
    return 2 * rank * (in_features + out_features) * _THIN_MATMUL_PENALTY < out_features * in_features


class _LoRALinearFunction(torch.autograd.Function):
    """Merged-weight forward (one matmul); backward computes dx, dA, dB exactly, saving x (and z).

    The low-rank gradient pass runs where ``impl`` says: "torch" (torch matmuls), "triton" (the
    Triton kernels, whose forward also emits z = x A^T, saved for the backward) or "cuda" (the
    CUDA C++ kernel); the other dense parts run in torch (cuBLAS on a GPU).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, impl):
        # W' = W + s B A in one launch (see lora_conv2d's _merged_weight)
        w_merged = torch.addmm(weight, lora_B, lora_A, alpha=scaling)
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
        # W' is weight-sized (no activation memory) and saves re-forming it in the backward.
        ctx.save_for_backward(x, w_merged, lora_A, lora_B, z)
        ctx.scaling, ctx.impl, ctx.low_rank = scaling, impl, low_rank
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_merged, lora_A, lora_B, z = ctx.saved_tensors
        s = ctx.scaling
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
                grad_a = s * ((dy2 @ lora_B).t() @ x2)
                grad_b = s * (dy2.t() @ (x2 @ lora_A.t()))
            else:
                grad_a = s * (lora_B.t() @ grad_w)
                grad_b = s * (grad_w @ lora_A.t())
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
    backend = resolve(x.device, "lora_linear")
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
