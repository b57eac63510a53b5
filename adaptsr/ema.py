"""An exponential moving average of the trained parameters, the model a run validates and saves.

BasicSR and Real-ESRGAN keep one of their generators (decay 0.999). Adapter runs are short, often a few
hundred steps, so the decay warms up as in TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``:
after update t (from 1) it is min(decay, (1 + t) / (10 + t)), and the average follows the early steps
instead of staying near the initial adapter (B = 0: the base model) for a thousand steps.

    shadow <- d_t shadow + (1 - d_t) param      after every optimizer step that was taken

Written here rather than taken from torch.optim.swa_utils.AveragedModel, which copies the whole model
(the frozen base too) where the adapters alone change.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["ParameterEMA"]


class ParameterEMA:
    """A float32 shadow of ``params`` (name -> parameter), updated after each optimizer step."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Write the averages into the parameters (the end of a run: the model it saves)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def averaged(self):
        """The parameters hold the averages inside the block, their trained values again after it."""
        trained = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(trained[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict, source: str) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"checkpoint {source} has no EMA of {sorted(missing)[:3]}")
        for name, t in self.shadow.items():
            t.copy_(state["shadow"][name])
        self.updates = int(state["updates"])
