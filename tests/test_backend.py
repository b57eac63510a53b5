"""Backend selection: explicit settings, and "auto" following the measured per-op table on CUDA."""

from __future__ import annotations

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
