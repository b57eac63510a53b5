"""Layers that keep an inference form folded from their training branches.

SPAN's ``Conv3XC`` trains three branches (a 1x1 skip, and 1x1 -> 3x3 -> 1x1) and evaluates one
3x3 conv, ``eval_conv``, which it refolds from the branches' weights at every eval-mode forward.
Two consequences for adaptsr:

- after merging adapters into the branches, the fold must be redone (:func:`refold`), or a
  checkpoint written right away carries the fold of whatever weights the last evaluation saw;
- the folded weights are derived, not base weights: they change whenever the model evaluates, so
  the base-weight hash an adapter file records leaves them out (:func:`derived_parameter_names`).
"""

from __future__ import annotations

import torch
from spandrel.architectures.SPAN.__arch.span import Conv3XC
from torch import nn

__all__ = ["derived_parameter_names", "refold"]

# re-parameterised class -> (the submodule holding the folded form, the method that refolds it)
_FOLDED: dict[type[nn.Module], tuple[str, str]] = {Conv3XC: ("eval_conv", "update_params")}


def _folded_modules(model: nn.Module):
    for name, module in model.named_modules():
        if type(module) in _FOLDED:
            yield name, module, *_FOLDED[type(module)]


@torch.no_grad()
def refold(model: nn.Module) -> None:
    """Refold every re-parameterised layer's inference form from its current branch weights."""
    for _, module, _, method in _folded_modules(model):
        getattr(module, method)()


def derived_parameter_names(model: nn.Module) -> set[str]:
    """State-dict keys of the parameters the model derives from others (the folded inference forms)."""
    names = set()
    for name, module, folded, _ in _folded_modules(model):
        prefix = f"{name}.{folded}." if name else f"{folded}."
        names.update(prefix + key for key, _ in module.get_submodule(folded).named_parameters())
    return names
