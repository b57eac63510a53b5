r"""LoRA 2-D transposed convolution: a frozen transposed conv plus a trainable low-rank update.

Shapes: ``W: [in, out/g, kh, kw]`` (nn.ConvTranspose2d's layout), ``b: [out]``, ``A: [in, r, kh, kw]``
(a transposed conv from the input's channels to ``r``, with the base's stride, padding, output
padding, dilation and groups), ``B: [out, r, 1, 1]`` (a 1x1 conv), scaling ``s``. A comes first and
carries the kernel, as LoRAConv2d's does; it is the one a transposed conv's weight layout gives.

Forward (``g`` groups, input channel ``i`` in group ``c(i)``)::

    DeltaW[i, o, :, :] = sum_k A[i, k, :, :] B[c(i) out/g + o, k]          (o < out/g)
    W' = W + s DeltaW
    y  = conv_transpose(x, W') + b

Two-path form (the reference): ``z = conv_transpose(x, A, groups=g)`` has ``g r`` channels, group
``c``'s computed from its own inputs, and ``B`` acts on them as a grouped 1x1 conv; the sum over
``i`` inside a group is the one in DeltaW, so both forms are the same function, exactly.

Backward (``dy = dL/dy``): the merged form's, by autograd::

    dx  = conv(dy, W')                         (what the frozen model computes)
    dW' = weight_grad(x, dy)                   dA, dB from dW' by the chain rule through DeltaW

Backends: "reference" runs the two-path form; every other backend the merged form, whose dense
parts are cuDNN's (oneDNN's on the CPU) transposed conv and its gradients: adaptsr has no kernels of
its own for this op. Real-CUGAN's up-sampling layers are the SR use: two or three per model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptsr.backend import resolve

__all__ = ["conv_transpose_delta_weight", "lora_conv_transpose2d", "lora_conv_transpose2d_ref"]


def conv_transpose_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """DeltaW as a transposed-conv weight ``[in, out/g, kh, kw]`` (unscaled): each input channel's
    update reaches the outputs of its own group only."""
    in_channels, rank, kh, kw = lora_A.shape
    out_channels = lora_B.shape[0]
    a = lora_A.reshape(groups, in_channels // groups, rank, kh * kw)
    b = lora_B.reshape(groups, out_channels // groups, rank)
    return torch.einsum("gikt,gok->giot", a, b).reshape(in_channels, out_channels // groups, kh, kw)


def _check_shapes(x, weight, bias, lora_A, lora_B, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"lora_conv_transpose2d expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    in_channels, out_per_group, kh, kw = weight.shape
    if x.shape[1] != in_channels:
        raise ValueError(
            f"lora_conv_transpose2d: x of shape {tuple(x.shape)} has {x.shape[1]} channels but the weight "
            f"{tuple(weight.shape)} expects {in_channels}"
        )
    if lora_A.dim() != 4 or lora_A.shape[0] != in_channels or lora_A.shape[2:] != weight.shape[2:]:
        raise ValueError(
            f"lora_conv_transpose2d: lora_A must have shape [{in_channels}, r, {kh}, {kw}], got {tuple(lora_A.shape)}"
        )
    rank, out_channels = lora_A.shape[1], out_per_group * groups
    if tuple(lora_B.shape) != (out_channels, rank, 1, 1):
        raise ValueError(
            f"lora_conv_transpose2d: lora_B must have shape [{out_channels}, {rank}, 1, 1], got {tuple(lora_B.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"lora_conv_transpose2d: bias must have shape [{out_channels}], got {tuple(bias.shape)}")


def lora_conv_transpose2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The two-path oracle: ``base(x) + s * B(A(lora_input))`` in plain torch.

    ``lora_input`` defaults to ``x``; pass a dropped-out copy of ``x`` for LoRA dropout.
    """
    lora_input = x if lora_input is None else lora_input
    options = {"stride": stride, "padding": padding, "output_padding": output_padding, "groups": groups,
               "dilation": dilation}
    base = F.conv_transpose2d(x, weight, bias, **options)
    z = F.conv_transpose2d(lora_input, lora_A, **options)
    return base + scaling * F.conv2d(z, lora_B, groups=groups)


def lora_conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
) -> torch.Tensor:
    """``conv_transpose(x, W + s DeltaW) + b`` with nn.ConvTranspose2d's options (``output_padding`` as
    F.conv_transpose2d takes it), on the selected backend."""
    _check_shapes(x, weight, bias, lora_A, lora_B, groups)
    if resolve(x.device, "lora_conv_transpose2d") == "reference":
        return lora_conv_transpose2d_ref(x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding,
                                         groups, dilation)
    merged = weight + scaling * conv_transpose_delta_weight(lora_A, lora_B, groups).to(weight.dtype)
    return F.conv_transpose2d(x, merged, bias, stride, padding, output_padding, groups, dilation)
