"""Autocast support shared by the custom autograd Functions of the ops."""

from __future__ import annotations

import torch


def apply_in_one_dtype(function: type[torch.autograd.Function], x, weight, bias, lora_A, lora_B, *rest):
    """``function.apply(x, weight, bias, lora_A, lora_B, *rest)``, autocast-aware.

    Under torch.autocast the five tensors are cast the way autocast casts a conv's or matmul's
    inputs (float64 stays), outside the Function, so the casts' backward carries the gradients
    back to float32 parameters; the Function itself then runs in one dtype with autocast off.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return function.apply(x, weight, bias, lora_A, lora_B, *rest)
    dtype = torch.get_autocast_dtype(device_type)
    cast = [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (x, weight, bias, lora_A, lora_B)
    ]
    with torch.autocast(device_type, enabled=False):
        return function.apply(*cast, *rest)
