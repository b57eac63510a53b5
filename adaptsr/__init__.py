"""adaptsr: adapt pretrained super-resolution models to real-world degradations with LoRA.

The public names below load their modules (and torch, spandrel) on first use, not at ``import adaptsr``: the
command line imports this package to start, and ``adaptsr --help`` or a usage error should not wait seconds for
torch. Submodules are reachable as attributes too (``adaptsr.nn``, ``adaptsr.train``, ...), as they were when this
file imported them all.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads them
    from adaptsr.adapter import load_adapter, save_adapter
    from adaptsr.backend import get_backend, set_backend
    from adaptsr.combine import combine_adapters
    from adaptsr.evaluate import evaluate_pairs
    from adaptsr.infer import upscale
    from adaptsr.inject import (
        LoRASummary,
        inject_lora,
        lora_layers,
        merge_lora,
        set_adapter_strength,
        unload_lora,
        unmerge_lora,
    )
    from adaptsr.io import load_model, save_model
    from adaptsr.nn import LoRAConv2d, LoRAConvTranspose2d, LoRALinear, LoRAWindowAttention
    from adaptsr.optim import create_loraplus_optimizer
    from adaptsr.presets import PRESETS

# public name -> the module that defines it
_EXPORTS = {
    "load_adapter": "adaptsr.adapter",
    "save_adapter": "adaptsr.adapter",
    "get_backend": "adaptsr.backend",
    "set_backend": "adaptsr.backend",
    "combine_adapters": "adaptsr.combine",
    "evaluate_pairs": "adaptsr.evaluate",
    "upscale": "adaptsr.infer",
    "LoRASummary": "adaptsr.inject",
    "inject_lora": "adaptsr.inject",
    "lora_layers": "adaptsr.inject",
    "merge_lora": "adaptsr.inject",
    "set_adapter_strength": "adaptsr.inject",
    "unload_lora": "adaptsr.inject",
    "unmerge_lora": "adaptsr.inject",
    "load_model": "adaptsr.io",
    "save_model": "adaptsr.io",
    "LoRAConv2d": "adaptsr.nn",
    "LoRAConvTranspose2d": "adaptsr.nn",
    "LoRALinear": "adaptsr.nn",
    "LoRAWindowAttention": "adaptsr.nn",
    "create_loraplus_optimizer": "adaptsr.optim",
    "PRESETS": "adaptsr.presets",
}

__all__ = [
    "PRESETS",
    "LoRAConv2d",
    "LoRAConvTranspose2d",
    "LoRALinear",
    "LoRASummary",
    "LoRAWindowAttention",
    "combine_adapters",
    "create_loraplus_optimizer",
    "evaluate_pairs",
    "get_backend",
    "inject_lora",
    "load_adapter",
    "load_model",
    "lora_layers",
    "merge_lora",
    "save_adapter",
    "save_model",
    "set_adapter_strength",
    "set_backend",
    "unload_lora",
    "unmerge_lora",
    "upscale",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
