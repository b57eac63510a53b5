"""LoRAConvTranspose2d: an nn.ConvTranspose2d with a trainable low-rank update, exact for every option."""

from __future__ import annotations

import torch
from torch import nn

from adaptsr.nn._lora_layer import LoRALayer
from adaptsr.ops.lora_conv_transpose2d import (
    conv_transpose_delta_weight,
    lora_conv_transpose2d,
    lora_conv_transpose2d_ref,
)


class LoRAConvTranspose2d(LoRALayer):
    """``conv_transpose(x, W + s DeltaW) + b`` around a frozen ``nn.ConvTranspose2d`` (``base_layer``).

    ``lora_A: [in, r, kh, kw]`` is a transposed conv like the base (stride, padding, output padding,
    dilation, groups), ``lora_B: [out, r, 1, 1]`` a 1x1 conv; with groups the update is
    block-structured, so ``merge()`` and ``to_dense()`` are exact (``adaptsr.ops.lora_conv_transpose2d``
    has the math). ``forward(x, output_size=None)`` as nn.ConvTranspose2d's. PEFT has no LoRA for
    transposed convs, so adapter files holding one are adaptsr's own.
    """

    base_type = nn.ConvTranspose2d

    @staticmethod
    def _max_rank(base_layer: nn.ConvTranspose2d) -> int:
        in_channels, out_per_group, kh, kw = base_layer.weight.shape
        return min(out_per_group, in_channels // base_layer.groups * kh * kw)

    @staticmethod
    def _adapter_shapes(base_layer: nn.ConvTranspose2d, rank: int):
        in_channels, _, kh, kw = base_layer.weight.shape
        return (in_channels, rank, kh, kw), (base_layer.out_channels, rank, 1, 1)

    @staticmethod
    def _rank_of(lora_A: torch.Tensor) -> int:
        return lora_A.shape[1] if lora_A.dim() > 1 else 0

    # an instance method, not static as in the other layers: the update's block structure follows the base's groups
    def _delta(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return conv_transpose_delta_weight(lora_A, lora_B, self.base_layer.groups)

    def _options(self, x: torch.Tensor, output_size) -> dict:
        base = self.base_layer
        # nn.ConvTranspose2d's own rule for the output padding that gives output_size
        output_padding = base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size, 2,
                                              base.dilation)
        return {"stride": base.stride, "padding": base.padding, "output_padding": output_padding,
                "groups": base.groups, "dilation": base.dilation}

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """``[in, out/groups, kh, kw]`` as ``[groups, in/groups, out/groups, kh, kw]``: output channel
        o = gi * out/groups + j is fed by ``[gi, :, j]``."""
        groups = self.base_layer.groups
        return weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])

    # instance methods, as _delta: which weights feed an output channel follows the base's groups
    def _column_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self._grouped(weight), dim=(1, 3, 4)).reshape(-1)

    def _scale_columns(self, weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        grouped = self._grouped(weight)
        return (grouped * factors.view(grouped.shape[0], 1, -1, 1, 1)).view(weight.shape)

    def _two_path(self, x: torch.Tensor, lora_input: torch.Tensor, bias: torch.Tensor | None,
                  output_size=None) -> torch.Tensor:
        return lora_conv_transpose2d_ref(x, self.base_layer.weight, bias, self.lora_A, self.lora_B, self.scaling,
                                         **self._options(x, output_size), lora_input=lora_input)

    def _functional(self, x: torch.Tensor, bias: torch.Tensor | None, output_size=None) -> torch.Tensor:
        return lora_conv_transpose2d(x, self.base_layer.weight, bias, self.lora_A, self.lora_B, self.scaling,
                                     **self._options(x, output_size))
