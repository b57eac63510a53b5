"""LoRALinear: an nn.Linear with a trainable low-rank update."""

from __future__ import annotations

import torch
from torch import nn

from adaptsr.nn._lora_layer import LoRALayer
from adaptsr.ops.lora_linear import linear_delta_weight, lora_linear, lora_linear_ref


class LoRALinear(LoRALayer):
    """``x (W + s B A)^T + b`` around a frozen ``nn.Linear`` (``base_layer``).

    ``lora_A: [r, in]``, ``lora_B: [out, r]``, as PEFT names and shapes them.
    """

    base_type = nn.Linear

    @staticmethod
    def _max_rank(base_layer: nn.Linear) -> int:
        return min(base_layer.in_features, base_layer.out_features)

    @staticmethod
    def _adapter_shapes(base_layer: nn.Linear, rank: int):
        return (rank, base_layer.in_features), (base_layer.out_features, rank)

    @staticmethod
    def _delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return linear_delta_weight(lora_A, lora_B)

    @staticmethod
    def _magnitude_shape(out_channels: int) -> tuple[int, ...]:
        return (out_channels,)

    @staticmethod
    def _per_output_channel(values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return values  # features are the last dimension

    def _two_path(self, x: torch.Tensor, lora_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lora_linear_ref(x, self.base_layer.weight, bias, self.lora_A, self.lora_B, self.scaling, lora_input)

    def _functional(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return lora_linear(x, self.base_layer.weight, bias, self.lora_A, self.lora_B, self.scaling)
