"""Drop-in LoRA modules."""

from adaptsr.nn._lora_layer import LoRALayer
from adaptsr.nn.lora_conv2d import LoRAConv2d
from adaptsr.nn.lora_conv_transpose2d import LoRAConvTranspose2d
from adaptsr.nn.lora_linear import LoRALinear
from adaptsr.nn.lora_window_attention import LoRAWindowAttention

__all__ = ["LoRAConv2d", "LoRAConvTranspose2d", "LoRALayer", "LoRALinear", "LoRAWindowAttention"]
