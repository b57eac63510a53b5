"""Swapping a module's forward on the instance, its class and keys left as they are.

``adaptsr.nn.swin_block``, ``rectangle_window_attention``, ``overlapping_cross_attention`` and
``cosine_window_attention`` run spandrel modules through adaptsr's ops this way: the forward is a
``functools.partial`` bound to the module (it pickles and deep-copies with it), and deleting the
instance attribute gives the class's forward back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

from torch import nn


def set_forward(module: nn.Module, forward: Callable) -> None:
    """Make ``module(...)`` call ``forward(module, ...)``."""
    module.forward = functools.partial(forward, module)


def set_forwards(
    model: nn.Module, can_switch: Callable[[nn.Module], bool], forward: Callable, names: Collection[str] | None = None
) -> list[str]:
    """``set_forward(module, forward)`` for every module of ``model`` that ``can_switch`` accepts (and that
    ``names`` holds, when given); the names switched."""
    switched = []
    for name, module in model.named_modules():
        if can_switch(module) and (names is None or name in names):
            set_forward(module, forward)
            switched.append(name)
    return switched


def restore_forwards(model: nn.Module, forwards: Collection[Callable]) -> list[str]:
    """Give every module of ``model`` whose forward was set to one of ``forwards`` its class's forward
    back; the names restored."""
    names = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func in forwards:
            del module.forward
            names.append(name)
    return names
