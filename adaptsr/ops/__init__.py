"""Functional LoRA ops; each dispatches on the backend chosen with ``adaptsr.set_backend``."""

from adaptsr.ops._conv_geometry import ConvGeometry
from adaptsr.ops.lora_conv2d import conv_delta_weight, lora_conv2d, lora_conv2d_ref
from adaptsr.ops.lora_conv_transpose2d import (
    conv_transpose_delta_weight,
    lora_conv_transpose2d,
    lora_conv_transpose2d_ref,
)
from adaptsr.ops.lora_linear import linear_delta_weight, lora_linear, lora_linear_ref
from adaptsr.ops.qkv_window_attention import qkv_window_attention
from adaptsr.ops.shifted_window_attention import shifted_window_attention, shifted_window_attention_ref
from adaptsr.ops.window_attention import window_attention, window_attention_ref

__all__ = [
    "ConvGeometry",
    "conv_delta_weight",
    "conv_transpose_delta_weight",
    "linear_delta_weight",
    "lora_conv2d",
    "lora_conv2d_ref",
    "lora_conv_transpose2d",
    "lora_conv_transpose2d_ref",
    "lora_linear",
    "lora_linear_ref",
    "qkv_window_attention",
    "shifted_window_attention",
    "shifted_window_attention_ref",
    "window_attention",
    "window_attention_ref",
]
