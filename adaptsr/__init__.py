"""adaptsr: adapt pretrained super-resolution models to real-world degradations with LoRA."""

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

__version__ = "0.1.0"

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
