"""Backend selection: explicit settings, and "auto" following the measured per-op table on CUDA."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention

import adaptsr.backend as backend
from adaptsr import LoRAWindowAttention, set_backend
from adaptsr.backend import AUTO_ON_CUDA, get_backend, is_available, resolve

CUDA = torch.device("cuda")  # a device object needs no GPU; resolve only reads its type


def test_explicit_setting_applies_to_every_op():
    with set_backend("reference"):
        assert get_backend() == "reference"
        for op in (*AUTO_ON_CUDA, "anything", None):
            assert resolve(torch.device("cpu"), op) == "reference"
            assert resolve(CUDA, op) == "reference"


def test_auto_off_cuda_is_torch_whatever_the_table_says(monkeypatch):
    monkeypatch.setitem(AUTO_ON_CUDA, "lora_conv2d", "triton")
    with set_backend("auto"):
        assert resolve(torch.device("cpu"), "lora_conv2d") == "torch"


def test_auto_on_cuda_follows_the_table_where_the_backend_is_available(monkeypatch):
    monkeypatch.setitem(AUTO_ON_CUDA, "lora_conv2d", "triton")
    monkeypatch.setitem(AUTO_ON_CUDA, "lora_linear", "cuda")
    with set_backend("auto"), mock.patch.object(backend, "is_available", lambda name: name == "triton"):
        assert resolve(CUDA, "lora_conv2d") == "triton"
        assert resolve(CUDA, "lora_linear") == "torch"  # cuda not available here: the safe default
        assert resolve(CUDA, "an_op_not_measured") == "torch"
        assert resolve(CUDA) == "torch"


def test_auto_falls_back_to_torch_where_the_kernels_do_not_take_the_inputs(monkeypatch):
    monkeypatch.setitem(AUTO_ON_CUDA, "window_attention", "triton")
    asked = []

    def takes(name):
        asked.append(name)
        return False

    with mock.patch.object(backend, "is_available", lambda name: True):
        with set_backend("auto"):
            assert resolve(CUDA, "window_attention", takes) == "torch"
            assert resolve(CUDA, "window_attention", lambda name: True) == "triton"
        with set_backend("triton"):  # an explicit setting is not second-guessed
            assert resolve(CUDA, "window_attention", takes) == "triton"
    assert asked == ["triton"]


@pytest.mark.parametrize("op_name", ["window_attention", "shifted_window_attention", "qkv_window_attention"])
@pytest.mark.parametrize("dtype, heads, head_dim, triton_takes", [
    (torch.float32, 2, 8, True), (torch.float16, 3, 30, True), (torch.float32, 1, 60, True), (torch.float64, 2, 8, False),
    (torch.float32, 1, 136, False),
])
def test_window_attention_ops_ask_whether_the_kernels_take_their_inputs(op_name, dtype, heads, head_dim, triton_takes):
    """Each op hands resolve the dtype, window length and head dim of its call (checked through the Triton
    kernels' limits: float32/16 and bf16, head dim up to 128)."""
    from adaptsr import ops

    op_module = importlib.import_module(f"adaptsr.ops.{op_name}")
    seen = []

    def spy(device, op, takes=None, call=None):
        seen.append(takes("triton"))
        return "torch"

    window, windows = 2, 2
    n, channels = window * window, heads * head_dim
    table = torch.zeros((2 * window - 1) ** 2, heads, dtype=dtype)
    index = torch.zeros(n, n, dtype=torch.long)
    with mock.patch.object(op_module, "resolve", spy):
        if op_name == "window_attention":
            q = torch.randn(windows, heads, n, head_dim, dtype=dtype)
            ops.window_attention(q, q, q, table, index, None, 0.5)
        elif op_name == "shifted_window_attention":
            qkv = torch.randn(1, window, 2 * window, 3 * channels, dtype=dtype)
            ops.shifted_window_attention(qkv, table, index, None, 0.5, window, 0, heads)
        else:
            x = torch.randn(windows, n, channels, dtype=dtype)
            ops.qkv_window_attention(x, torch.randn(3 * channels, channels, dtype=dtype), None, heads, table, index,
                                     None, 0.5)
    assert seen == [triton_takes]


def test_env_var_and_bad_names(monkeypatch):
    monkeypatch.setenv("ADAPTSR_BACKEND", "reference")
    assert get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown adaptsr backend 'fast'"):
        set_backend("fast")


@pytest.mark.skipif(not is_available("triton"), reason="triton unavailable")
@pytest.mark.parametrize("table_choice, forced, expect_single_pass", [
    ("torch", None, False), ("triton", None, True), ("torch", True, True), ("triton", False, False),
])
def test_window_attention_single_pass_follows_the_table_unless_forced(monkeypatch, table_choice, forced,
                                                                       expect_single_pass):
    monkeypatch.setitem(AUTO_ON_CUDA, "qkv_window_attention", table_choice)
    module = LoRAWindowAttention.from_module(WindowAttention(16, (4, 4), 2))
    module.single_pass = forced
    calls = []
    import adaptsr.nn.lora_window_attention as wrapper

    real = wrapper.qkv_window_attention
    monkeypatch.setattr(wrapper, "qkv_window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with set_backend("triton"):
        module(torch.randn(2, 16, 16))
    assert bool(calls) == expect_single_pass
