"""LoRA+'s optimizer: lora_B learning faster than lora_A (Hayou et al., 2024), for ``adaptsr adapt`` and for
training loops of your own (``create_loraplus_optimizer``, PEFT's function of the same name)."""

from __future__ import annotations

import math

import torch
from torch import nn

from adaptsr.inject import unwrap_model

__all__ = ["create_loraplus_optimizer"]


def _check_lora_plus_ratio(ratio: float) -> None:
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"lora_plus_ratio must be a positive number (1: plain LoRA), got {ratio}")


def create_loraplus_optimizer(
    model, lr: float = 1e-3, lora_plus_ratio: float = 16.0, optimizer_cls=torch.optim.AdamW, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer over the model's trainable parameters with LoRA+'s two rates, for a training loop of your
    own: every lora_B (and every one-dimensional parameter) at ``lr * lora_plus_ratio``, the rest at ``lr``;
    the groups PEFT's ``create_loraplus_optimizer`` makes (the tests hold the two to each other). The defaults
    are ``adaptsr adapt``'s: lr 1e-3, ratio 16 and, for AdamW, no weight decay (AdamW's own default is 0.01).
    ``kwargs`` go to ``optimizer_cls`` (``weight_decay``, ``betas``, ...)."""
    _check_lora_plus_ratio(lora_plus_ratio)
    if optimizer_cls is torch.optim.AdamW:
        kwargs.setdefault("weight_decay", 0.0)  # TrainConfig's, which adapt trains with
    return optimizer_cls(_optimizer_groups(_trainable(unwrap_model(model)), lr, lora_plus_ratio), lr=lr, **kwargs)


def _optimizer_groups(params: dict[str, nn.Parameter], lr: float, lora_plus_ratio: float) -> list[dict]:
    """AdamW's parameter groups: one at ``lr``, or with LoRA+ A at ``lr`` and B at ``lr * lora_plus_ratio``.

    LoRA+ sorts as PEFT's ``create_loraplus_optimizer`` does (the tests hold the two to each other): the fast
    group is every ``lora_B`` and every one-dimensional parameter (a linear layer's DoRA magnitude; a conv's,
    ``[1, out, 1, 1]`` in PEFT's layout, stays with A).
    """
    if lora_plus_ratio == 1.0:
        return [{"params": list(params.values())}]
    fast = {name for name, p in params.items() if "lora_B" in name or p.ndim == 1}
    if not fast:
        raise ValueError("lora_plus_ratio: the model has no lora_B to speed up (LoRA+ is for LoRA adapters)")
    return [
        {"params": [p for name, p in params.items() if name not in fast]},
        {"params": [p for name, p in params.items() if name in fast], "lr": lr * lora_plus_ratio},
    ]


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters: call inject_lora first, or unfreeze it")
    return params
