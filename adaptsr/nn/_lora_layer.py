"""What LoRAConv2d and LoRALinear share: adapter parameters, scaling, init, merge and unmerge.

A LoRA module wraps its frozen base layer (``self.base_layer``) rather than subclassing it, so
the base's state-dict keys stay ``<name>.base_layer.weight`` while wrapped and return to
``<name>.weight`` after ``to_dense()``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALayer(nn.Module):
    """Base for LoRA wrappers; subclasses define the adapter shapes, the delta and the forward."""

    base_type: type[nn.Module]

    def __init__(
        self,
        *,
        base_layer: nn.Module,
        rank: int,
        alpha: float | None = None,
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        if type(base_layer) is not self.base_type:
            raise TypeError(f"{type(self).__name__} wraps an {self.base_type.__name__}, got {type(base_layer).__name__}")
        max_rank = self._max_rank(base_layer)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if rank > max_rank:
            raise ValueError(
                f"LoRA rank {rank} is larger than this layer allows ({max_rank}) for "
                f"{base_layer} with weight {tuple(base_layer.weight.shape)}: lower the rank or skip the layer"
            )
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.lora_dropout = lora_dropout
        # a multiplier of the update (PEFT's scale_layer): set it through adaptsr.set_adapter_strength
        self.strength = 1.0
        self.merged = False
        weight = base_layer.weight
        a_shape, b_shape = self._adapter_shapes(base_layer, rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=weight.dtype, device=weight.device))
        self.reset_lora_parameters(init_lora_weights)

    # Model code that reads a layer's weight instead of calling it (spandrel's Swin2SR applies its qkv
    # as F.linear(x, self.qkv.weight, ...); SPAN folds its training branches' weights into one conv
    # for evaluation) gets the effective weight, so the adapter takes part there too, gradients
    # included. PEFT hands out the base weight, which silently leaves the adapter out.
    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + s B A, differentiable in A and B (the frozen W once merged, which
        already holds the adapter). Read-only: a copy computed on each access, so writing into it changes
        nothing; the frozen weight itself is ``base_layer.weight``."""
        if self.merged:
            return self.base_layer.weight
        return self.base_layer.weight + self.get_delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (LoRA leaves it as it is)."""
        return self.base_layer.bias

    # -- what subclasses provide --

    @staticmethod
    def _max_rank(base_layer: nn.Module) -> int:
        raise NotImplementedError

    @staticmethod
    def _adapter_shapes(base_layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def _delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """B A in the base weight's shape (unscaled)."""
        raise NotImplementedError

    @staticmethod
    def _rank_of(lora_A: torch.Tensor) -> int:
        """The rank an adapter's A has (its first dimension, as PEFT lays A out)."""
        return lora_A.shape[0] if lora_A.dim() > 0 else 0

    def _two_path(self, x: torch.Tensor, lora_input: torch.Tensor) -> torch.Tensor:
        """The reference form ``base(x) + s B(A(lora_input))`` (the only one that supports dropout)."""
        raise NotImplementedError

    def _functional(self, x: torch.Tensor) -> torch.Tensor:
        """The functional op on the selected backend."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``args``, ``kwargs``: what the base layer's forward takes after x (nn.ConvTranspose2d's output_size),
        handed on."""
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.training and self.lora_dropout > 0.0:
            return self._two_path(x, F.dropout(x, self.lora_dropout, training=True), *args, **kwargs)
        return self._functional(x, *args, **kwargs)

    # -- shared behaviour --

    @property
    def scaling(self) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA), times the adapter's strength."""
        return self.strength * self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> LoRALayer:
        """Wrap ``module`` (keyword arguments as in the constructor)."""
        return cls(base_layer=module, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisation: A Kaiming-uniform, B zero (so the wrapped layer starts as the base).

        ``"gaussian"``: A ~ N(0, 1/r), B zero. ``False``: B Kaiming-uniform too, a non-zero
        update from the start (what tests need to be able to fail).
        """
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        elif init_lora_weights in (True, False):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's shape and dtype (computed in at least float32)."""
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = self._delta(self.lora_A.to(compute), self.lora_B.to(compute)) * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; the forward is then the base layer alone."""
        if self.merged:
            return
        self.base_layer.weight.add_(self.get_delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight."""
        if not self.merged:
            return
        self.base_layer.weight.sub_(self.get_delta_weight())
        self.merged = False

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """A plain copy of the base layer with the adapter merged in (this module is unchanged)."""
        dense = copy.deepcopy(self.base_layer)
        if not self.merged:
            dense.weight.add_(self.get_delta_weight())
        return dense

    def extra_repr(self) -> str:
        extra = f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
        if self.use_rslora:
            extra += ", use_rslora=True"
        if self.strength != 1.0:
            extra += f", strength={self.strength:g}"
        if self.lora_dropout:
            extra += f", lora_dropout={self.lora_dropout:g}"
        if self.merged:
            extra += ", merged=True"
        return extra
