"""LoRAWindowAttention: Swin window attention (SwinIR's, HAT's, DRCT's, ATD's) with the attention core on adaptsr's
backends.

It replaces spandrel's ``WindowAttention`` in place: the same parameters, buffers and state-dict
keys (``qkv``, ``proj``, ``relative_position_bias_table`` and, for SwinIR and DRCT, the
``relative_position_index`` buffer), the same call (SwinIR and DRCT ``forward(x, mask=None)``, HAT
``forward(x, rpi, mask=None)``, ATD ``forward(qkv, rpi, mask=None)``) and the same function. ATD's
block projects qkv itself (its ``wqkv`` feeds the category attention too), so ATD's attention has
no ``qkv`` layer and no dropout. ``qkv`` and ``proj`` stay what they were (``LoRALinear`` after
``inject_lora``, so their merged-weight forward runs through ``adaptsr.ops.lora_linear``, or plain
``nn.Linear``); the softmax core runs through ``adaptsr.ops.window_attention``. ``to_dense()``
gives back spandrel's own module.
"""

from __future__ import annotations

import copy

import torch
from spandrel.architectures.ATD.__arch.atd_arch import WindowAttention as ATDWindowAttention
from spandrel.architectures.DRCT.__arch.drct_arch import WindowAttention as DRCTWindowAttention
from spandrel.architectures.HAT.__arch.HAT import WindowAttention as HATWindowAttention
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention as SwinIRWindowAttention
from torch import nn

from adaptsr.backend import AUTO_ON_CUDA, resolve
from adaptsr.nn._lora_layer import LoRALayer
from adaptsr.ops.qkv_window_attention import qkv_window_attention
from adaptsr.ops.window_attention import window_attention

# spandrel's window-attention classes this module replaces, with the architecture they belong to.
# DRCT's is a copy of SwinIR's (same parameters, buffers, constructor and call).
_ORIGINALS: dict[type[nn.Module], str] = {
    SwinIRWindowAttention: "SwinIR", HATWindowAttention: "HAT", DRCTWindowAttention: "DRCT", ATDWindowAttention: "ATD",
}


def _swinir_call(mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """SwinIR's and DRCT's ``forward(x, mask=None)`` after x: the relative position index is a buffer."""
    return mask


def _hat_call(rpi: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HAT's ``forward(x, rpi, mask=None)`` (and ATD's ``forward(qkv, rpi, mask=None)``) after the first
    argument: the model passes the relative position index in."""
    return rpi, mask


class LoRAWindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, drop-in for spandrel's.

    Build it with ``LoRAWindowAttention.from_module(attn)`` (or ``LoRAWindowAttention(attention=attn)``)
    from a SwinIR, HAT, DRCT or ATD ``WindowAttention``; it shares that module's parameters, buffers and
    ``qkv`` / ``proj`` layers rather than copying them.
    """

    def __init__(self, *, attention: nn.Module) -> None:
        super().__init__()
        if not self.can_wrap(attention):
            supported = ", ".join(f"{arch} {cls.__name__}" for cls, arch in _ORIGINALS.items())
            raise TypeError(f"LoRAWindowAttention replaces spandrel's {supported}; got {type(attention).__name__}")
        self.original_type = type(attention)
        self.dim = attention.dim
        self.window_size = tuple(attention.window_size)
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        # Registered in the original's order, so state_dict() lists the same keys in the same order.
        self.relative_position_bias_table = attention.relative_position_bias_table
        self.index_passed_in = "relative_position_index" not in attention._buffers
        if not self.index_passed_in:
            persistent = "relative_position_index" not in attention._non_persistent_buffers_set
            self.register_buffer("relative_position_index", attention.relative_position_index, persistent=persistent)
        # ATD: the caller hands in the projected qkv tokens; there is no qkv layer and no dropout.
        self.qkv_passed_in = "qkv" not in attention._modules
        self.qkv_bias = attention.qkv_bias if self.qkv_passed_in else None  # for ATD's constructor (to_dense)
        self.qkv = None if self.qkv_passed_in else attention.qkv
        self.attn_drop = getattr(attention, "attn_drop", None)
        self.proj = attention.proj
        self.proj_drop = getattr(attention, "proj_drop", None)
        # On the triton backend: the qkv projection inside the attention kernel (q, k, v never in
        # memory) instead of a separate matmul. True / False force it on / off; None follows
        # adaptsr.backend.AUTO_ON_CUDA["qkv_window_attention"], which the GPU benchmark is to set
        # (benchmarks/test_bench_window_attention.py, provider triton_single_pass; "torch" until measured).
        self.single_pass: bool | None = None
        self.train(attention.training)

    @staticmethod
    def can_wrap(module: nn.Module) -> bool:
        """Whether ``module`` is a spandrel window attention this class replaces (SwinIR's, HAT's, DRCT's or ATD's)."""
        return type(module) in _ORIGINALS

    @classmethod
    def from_module(cls, attention: nn.Module) -> LoRAWindowAttention:
        """Replace ``attention`` (spandrel's SwinIR, HAT, DRCT or ATD ``WindowAttention``); it is left as it is."""
        return cls(attention=attention)

    @property
    def architecture(self) -> str:
        return _ORIGINALS[self.original_type]

    # -- forward --

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x: [B_, N, C]`` windows of tokens (ATD: their qkv projection, ``[B_, N, 3C]``); then ``mask=None``
        (SwinIR, DRCT) or ``rpi, mask=None`` (HAT, ATD)."""
        if self.index_passed_in:
            index, mask = _hat_call(*args, **kwargs)
        else:
            index, mask = self.relative_position_index, _swinir_call(*args, **kwargs)
        dropout = self.training and self.attn_drop is not None and self.attn_drop.p > 0
        if self.qkv_passed_in:
            qkv = x
        else:
            qkv_weight = self._single_pass_weight()
            if qkv_weight is not None and not dropout:
                out = qkv_window_attention(x, *qkv_weight, self.num_heads, self.relative_position_bias_table, index,
                                           mask, self.scale)
                return self._project(out)
            qkv = self.qkv(x)
        batch_windows, n, qkv_channels = qkv.shape
        channels = qkv_channels // 3
        qkv = qkv.reshape(batch_windows, n, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if dropout:
            out = self._attention_with_dropout(q, k, v, index, mask)
        else:
            out = window_attention(q, k, v, self.relative_position_bias_table, index, mask, self.scale)
        return self._project(out.transpose(1, 2).reshape(batch_windows, n, channels))

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        out = self.proj(out)
        return out if self.proj_drop is None else self.proj_drop(out)

    def _single_pass_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(w_qkv, b_qkv) for the single pass, W + s B A formed differentiably so autograd carries
        its gradient to the adapters; None where the single pass does not apply (switched off, not
        on the triton backend, or LoRA dropout active, which needs the two-path form)."""
        wanted = self.single_pass
        if wanted is None:
            wanted = AUTO_ON_CUDA.get("qkv_window_attention") == "triton"
        if not wanted or resolve(self.relative_position_bias_table.device, "window_attention") != "triton":
            return None
        qkv = self.qkv
        if qkv is None:
            return None
        if isinstance(qkv, nn.Linear):
            return qkv.weight, qkv.bias
        if isinstance(qkv, LoRALayer) and (qkv.merged or not (self.training and qkv.lora_dropout > 0)):
            base = qkv.base_layer
            if qkv.merged:
                return base.weight, base.bias
            return base.weight + qkv.get_delta_weight(), base.bias
        return None

    def _attention_with_dropout(self, q, k, v, index, mask) -> torch.Tensor:
        """The eager form with dropout on the attention weights (no backend fuses that dropout)."""
        batch_windows, heads, n, _ = q.shape
        bias = self.relative_position_bias_table[index.reshape(-1)].view(n, n, heads).permute(2, 0, 1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:
            num_masks = mask.shape[0]
            attn = attn.view(batch_windows // num_masks, num_masks, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(batch_windows, heads, n, n)
        return self.attn_drop(torch.softmax(attn, dim=-1)) @ v

    # -- merge, unmerge, dense copy --

    def _lora_layers(self) -> list[LoRALayer]:
        return [m for m in (self.qkv, self.proj) if isinstance(m, LoRALayer)]

    @property
    def merged(self) -> bool:
        """Whether the adapters of qkv / proj are folded into their weights (False when there are none)."""
        layers = self._lora_layers()
        return bool(layers) and all(layer.merged for layer in layers)

    def merge(self) -> None:
        """Fold the adapters of qkv and proj into their base weights."""
        for layer in self._lora_layers():
            layer.merge()

    def unmerge(self) -> None:
        """Take the adapters of qkv and proj back out of their base weights."""
        for layer in self._lora_layers():
            layer.unmerge()

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """spandrel's own ``WindowAttention`` with the adapters merged into dense qkv / proj.

        This module is left unchanged.
        """
        qkv, proj = (m.to_dense() if isinstance(m, LoRALayer) else copy.deepcopy(m) for m in (self.qkv, self.proj))
        # The constructor initialises the table with trunc_normal_: keep the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            if self.qkv_passed_in:  # ATD's: no qkv layer, no dropout, the scale from the head dim
                dense = self.original_type(self.dim, self.window_size, self.num_heads, qkv_bias=self.qkv_bias)
            else:
                dense = self.original_type(
                    self.dim,
                    self.window_size,
                    self.num_heads,
                    qkv_bias=qkv.bias is not None,
                    qk_scale=self.scale,
                    attn_drop=self.attn_drop.p,
                    proj_drop=self.proj_drop.p,
                )
                dense.qkv = qkv
        table = self.relative_position_bias_table
        dense.relative_position_bias_table = nn.Parameter(table.detach().clone(), requires_grad=table.requires_grad)
        if not self.index_passed_in:
            dense.relative_position_index = self.relative_position_index.clone()
        dense.proj = proj
        return dense.train(self.training)

    def flops(self, n: int) -> int:
        """Multiply-adds for one window of ``n`` tokens, as spandrel's SwinIR ``WindowAttention.flops`` counts them."""
        head_dim = self.dim // self.num_heads
        return 4 * n * self.dim * self.dim + 2 * self.num_heads * n * head_dim * n

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
            f"architecture={self.architecture}"
        )
