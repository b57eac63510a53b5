"""Autocast support shared by the custom autograd Functions of the ops."""

from __future__ import annotations

import torch


def autocast_inputs(device_type: str, *tensors):
    """The tensors cast the way torch.autocast casts a conv's or matmul's inputs (float64 stays).

    The casts happen outside the autograd Function, so their backward carries the gradients
    back to float32 parameters; the Function itself then runs in one dtype with autocast off.
    """
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )
