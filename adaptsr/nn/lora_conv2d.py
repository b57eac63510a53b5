"""LoRAConv2d: an nn.Conv2d with a trainable low-rank update, exact for every nn.Conv2d option."""

from __future__ import annotations

import torch
from torch import nn

from adaptsr.nn._lora_layer import LoRALayer
from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import conv_delta_weight, lora_conv2d, lora_conv2d_ref


class LoRAConv2d(LoRALayer):
    """``conv(x, W + s B A) + b`` around a frozen ``nn.Conv2d`` (``base_layer``).

    ``lora_A: [r, in/groups, kh, kw]`` convolves like the base (stride, padding, dilation,
    padding mode); ``lora_B: [out, r, 1, 1]``. With groups the update is block-structured, so
    ``merge()`` and ``to_dense()`` are exact for grouped convolutions too.
    """

    base_type = nn.Conv2d

    def __init__(self, *, base_layer: nn.Conv2d, rank: int, **kwargs) -> None:
        super().__init__(base_layer=base_layer, rank=rank, **kwargs)
        self.geometry = ConvGeometry.of(base_layer)

    @staticmethod
    def _max_rank(base_layer: nn.Conv2d) -> int:
        return min(base_layer.out_channels, base_layer.weight[0].numel())

    @staticmethod
    def _adapter_shapes(base_layer: nn.Conv2d, rank: int):
        return (rank, *base_layer.weight.shape[1:]), (base_layer.out_channels, rank, 1, 1)

    @staticmethod
    def _delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return conv_delta_weight(lora_A, lora_B)

    def _two_path(self, x: torch.Tensor, lora_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = self.base_layer.weight
        return lora_conv2d_ref(x, weight, bias, self.lora_A, self.lora_B, self.scaling, self.geometry, lora_input)

    def _functional(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = self.base_layer.weight
        return lora_conv2d(x, weight, bias, self.lora_A, self.lora_B, self.scaling, geometry=self.geometry)
