"""What the LoRA layers (LoRAConv2d, LoRAConvTranspose2d, LoRALinear) share: adapter parameters, scaling, init,
merge and unmerge.

A LoRA module wraps its frozen base layer (``self.base_layer``) rather than subclassing it, so
the base's state-dict keys stay ``<name>.base_layer.weight`` while wrapped and return to
``<name>.weight`` after ``to_dense()``.

DoRA (``use_dora=True``, PEFT's weight-decomposed LoRA): each output channel's row of W + s B A is
rescaled to a trained magnitude m (``lora_magnitude_vector``, PEFT's name and layout):

    W_dora = g (W + s B A),  g_o = m_o / ||(W + s B A)_o||,  y = conv(x, W_dora) + b

with the norm detached from the graph (DoRA paper, section 4.3, as PEFT does), so the forward is the
LoRA op without its bias times g per output channel, then the bias: the backends' fused kernels serve
DoRA unchanged, at the cost of one elementwise pass over the output. m starts at ||W + s B A||, so an
adapter starts as the LoRA one. A strength S blends in weight space, W + S (W_dora - W), as it does
for LoRA (where it is W + S s B A), so S = 0 is the base model and the merged weight is linear in S.
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
        use_dora: bool = False,
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
        self.use_dora = bool(use_dora)
        if self.use_dora:
            out_channels = self._column_norms(weight).numel()
            self.lora_magnitude_vector = nn.Parameter(
                torch.empty(self._magnitude_shape(out_channels), dtype=weight.dtype, device=weight.device)
            )
        # The base weight as it was before merge(), so that unmerge() gives it back bit for bit: subtracting the
        # update again is off by rounding (the base's hash, which load_adapter checks, would change), and DoRA's
        # W_dora rescales rows, so W cannot always be solved back from it (a row scaled to zero). SR weights are
        # small enough to keep. A buffer so that .to() moves it, left out of the state dict.
        self.register_buffer("_weight_before_merge", None, persistent=False)
        self.reset_lora_parameters(init_lora_weights)

    # Model code that reads a layer's weight instead of calling it (spandrel's Swin2SR applies its qkv
    # as F.linear(x, self.qkv.weight, ...); SPAN folds its training branches' weights into one conv
    # for evaluation) gets the effective weight, so the adapter takes part there too, gradients
    # included. PEFT hands out the base weight, which silently leaves the adapter out.
    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + get_delta_weight() (W + S s B A for LoRA at strength S, W + S (W_dora - W) for
        DoRA), differentiable in the adapter's parameters (the frozen W once merged, which
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

    def _two_path(self, x: torch.Tensor, lora_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The reference form ``base(x) + s B(A(lora_input))`` (the only one that supports dropout)."""
        raise NotImplementedError

    def _functional(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The functional op on the selected backend."""
        raise NotImplementedError

    @staticmethod
    def _column_norms(weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ||W_o||: the norm of the weights feeding each output channel o, as ``[out]``."""
        return weight.flatten(1).norm(dim=1)

    @staticmethod
    def _scale_columns(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The weight with the weights feeding output channel o multiplied by ``factors[o]``."""
        return weight * factors.view(-1, *([1] * (weight.dim() - 1)))

    @staticmethod
    def _magnitude_shape(out_channels: int) -> tuple[int, ...]:
        """PEFT's layout of DoRA's magnitude: ``[1, out, 1, 1]`` for convolutions (``[out]`` for linear layers)."""
        return (1, out_channels, 1, 1)

    @staticmethod
    def _per_output_channel(values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``values [out]`` shaped to broadcast over the layer's output (channels at dim -3 for convolutions)."""
        return values.view(-1, 1, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``args``, ``kwargs``: what the base layer's forward takes after x (nn.ConvTranspose2d's output_size),
        handed on."""
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        dropout = self.training and self.lora_dropout > 0.0
        bias = None if self.use_dora else self.base_layer.bias
        if dropout:
            out = self._two_path(x, F.dropout(x, self.lora_dropout, training=True), bias, *args, **kwargs)
        else:
            out = self._functional(x, bias, *args, **kwargs)
        return self._dora_output(x, out, *args, **kwargs) if self.use_dora else out

    def _dora_output(self, x: torch.Tensor, adapted: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """From ``adapted = conv(x, W + s B A)`` (no bias): ``g adapted + b``, at strength S
        ``S g adapted + (1 - S) conv(x, W) + b``, i.e. the layer with weight W + S (W_dora - W)."""
        out = adapted * self._per_output_channel(self._dora_factors().to(adapted.dtype), adapted)
        if self.strength != 1.0:
            base = torch.func.functional_call(self.base_layer, {"bias": None}, (x, *args), kwargs)
            out = self.strength * out + (1.0 - self.strength) * base
        bias = self.base_layer.bias
        return out if bias is None else out + self._per_output_channel(bias.to(out.dtype), out)

    # -- shared behaviour --

    @property
    def scaling(self) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA), times the adapter's strength (DoRA applies the
        strength to its whole update instead: see the module's docstring)."""
        scaling = self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        return scaling if self.use_dora else self.strength * scaling

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> LoRALayer:
        """Wrap ``module`` (keyword arguments as in the constructor)."""
        return cls(base_layer=module, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisation: A Kaiming-uniform, B zero (so the wrapped layer starts as the base).

        ``"gaussian"``: A normal with standard deviation 1/r (PEFT's), B zero. ``False``: B Kaiming-uniform
        too, a non-zero update from the start (what tests need to be able to fail).
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
        if self.use_dora:  # m = ||W + s B A||: the DoRA layer starts as the LoRA one
            norms = self._column_norms(self.base_layer.weight.to(self._compute_dtype()) + self._low_rank_update())
            self.lora_magnitude_vector.copy_(norms.view(self.lora_magnitude_vector.shape))

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    def _low_rank_update(self) -> torch.Tensor:
        """s B A in the base weight's shape, in at least float32."""
        compute = self._compute_dtype()
        return self._delta(self.lora_A.to(compute), self.lora_B.to(compute)) * self.scaling

    def _dora_factors(self, norms: torch.Tensor | None = None) -> torch.Tensor:
        """g = m / ||W + s B A|| per output channel, in at least float32; the norms detached (constants of
        the graph, as DoRA prescribes). The norms are kept off zero, so a channel whose weights are all zero,
        and whose magnitude therefore starts (and stays) at zero, gets g = 0 rather than 0 / 0."""
        if norms is None:
            weight = self.base_layer.weight.to(self._compute_dtype())
            norms = self._column_norms(weight + self._low_rank_update().detach())
        norms = norms.detach().clamp_min(torch.finfo(norms.dtype).tiny)
        return self.lora_magnitude_vector.to(norms.dtype).reshape(-1) / norms

    def get_delta_weight(self) -> torch.Tensor:
        """The update the adapter makes to the base weight, in its shape and dtype (computed in at least
        float32): s B A for LoRA, W_dora - W for DoRA, each times the strength (s holds it for LoRA)."""
        update = self._low_rank_update()
        if self.use_dora:
            weight = self.base_layer.weight.to(update.dtype)
            adapted = weight + update
            factors = self._dora_factors(self._column_norms(adapted))  # its norms, not B A formed again
            update = self.strength * (self._scale_columns(adapted, factors) - weight)
        return update.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; the forward is then the base layer alone."""
        if self.merged:
            return
        self._weight_before_merge = self.base_layer.weight.clone()
        self.base_layer.weight.add_(self.get_delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight: the weight as it was before ``merge()``, bit for bit."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
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
        if self.use_dora:
            extra += ", use_dora=True"
        if self.strength != 1.0:
            extra += f", strength={self.strength:g}"
        if self.lora_dropout:
            extra += f", lora_dropout={self.lora_dropout:g}"
        if self.merged:
            extra += ", merged=True"
        return extra
