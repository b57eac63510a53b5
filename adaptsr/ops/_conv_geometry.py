"""Normalised nn.Conv2d geometry shared by every LoRA conv backend (and the launchers' input checks).

nn.Conv2d accepts padding as an int, a pair, 'same' or 'valid', and four padding modes. Every
backend wants the same thing: explicit (left, right, top, bottom) amounts, and whether the
input must be padded before the convolution (non-zero modes, or 'same' with an even
effective kernel, which pads one side more than the other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    # explicit amounts in F.pad order: (left, right, top, bottom)
    pads: tuple[int, int, int, int]

    @classmethod
    def from_args(cls, kernel_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
        kh, kw = _pair(kernel_size, "kernel_size")
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                if stride != (1, 1):
                    raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
                # torch puts the smaller half on the left/top when the total is odd.
                total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
                pads = (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
            else:
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        else:
            ph, pw = _pair(padding, "padding")
            pads = (pw, pw, ph, ph)
        return cls(stride, dilation, int(groups), padding_mode, pads)

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> ConvGeometry:
        return cls.from_args(conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)

    @property
    def prepad(self) -> bool:
        """True when the input must be padded explicitly before a padding-free convolution."""
        left, right, top, bottom = self.pads
        return self.padding_mode != "zeros" and any(self.pads) or left != right or top != bottom

    @property
    def conv_padding(self) -> tuple[int, int]:
        """The symmetric padding to hand the convolution itself (zero when pre-padded)."""
        if self.prepad:
            return (0, 0)
        return (self.pads[2], self.pads[0])

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """x padded the way nn.Conv2d pads it when the convolution cannot do it alone."""
        if not self.prepad:
            return x
        return F.pad(x, self.pads, mode=_F_PAD_MODE[self.padding_mode])

    def unpad_grad(self, grad_padded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``pad_input``: the gradient of x from that of the padded input (border gradients
        folded back onto the pixels they were copied from).

        Written out rather than through autograd.grad of the pad, which torch.compile cannot trace inside
        a backward: the aten backward kernels of reflect and replicate padding (those F.pad's own
        backward runs), slicing for zeros, and the wrapped sums for circular padding.
        """
        if not self.prepad:
            return grad_padded
        left, right, top, bottom = self.pads
        mode = self.padding_mode
        if mode == "reflect":
            return torch.ops.aten.reflection_pad2d_backward(grad_padded, x, list(self.pads))
        if mode == "replicate":
            return torch.ops.aten.replication_pad2d_backward(grad_padded, x, list(self.pads))
        height, width = x.shape[-2:]
        if mode == "circular":
            # padded row i holds row (i - top) mod H: sum the rows onto their source, then the columns
            rows = torch.arange(-top, height + bottom, device=x.device) % height
            cols = torch.arange(-left, width + right, device=x.device) % width
            folded = grad_padded.new_zeros(*grad_padded.shape[:-2], height, grad_padded.shape[-1])
            folded.index_add_(-2, rows, grad_padded)
            out = grad_padded.new_zeros(x.shape)
            return out.index_add_(-1, cols, folded)
        return grad_padded[..., top:top + height, left:left + width]  # zeros: asymmetric 'same'

    def conv(self, x_padded: torch.Tensor, weight: torch.Tensor, bias=None, groups: int | None = None) -> torch.Tensor:
        """F.conv2d of an already pre-padded input (see ``pad_input``) with this geometry."""
        return F.conv2d(
            x_padded, weight, bias, self.stride, self.conv_padding, self.dilation, self.groups if groups is None else groups
        )


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and is not also plain contiguous), else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def check_lowrank_grad_inputs(label: str, x, dy, lora_A, lora_B, groups: int) -> None:
    """The shape, device and dtype contract of every fused low-rank gradient launcher (triton, cuda)."""
    n, c_in = x.shape[:2]
    c_in_g = lora_A.shape[1]
    if dy.shape[0] != n or c_in != c_in_g * groups or lora_B.shape[0] != dy.shape[1]:
        raise ValueError(
            f"lora_conv2d {label} grads: inconsistent shapes x {tuple(x.shape)}, dy {tuple(dy.shape)}, "
            f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}, groups {groups}"
        )
    if x.device != dy.device or x.dtype != dy.dtype:
        raise ValueError(f"x and dy must share device and dtype, got {x.device}/{x.dtype} and {dy.device}/{dy.dtype}")
