"""torch.compile traces the LoRA layers' ops (conv, transposed conv, linear, window attention) whole: no graph
break, and eager's outputs and gradients.

A graph break splits a compiled training step where our ops sit, so the compiler cannot fuse across
them; one in the window-attention op (an ``out=`` into a strided view) went unnoticed until this test.
Compiled with ``backend="aot_eager"``: Dynamo's tracing and AOT autograd (where breaks and tracing
errors come from) without the C++ code generation, which would take minutes on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaptsr

dynamo = pytest.importorskip("torch._dynamo")


def _conv_and_linear_model() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
            self.grouped = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=2)
            self.up = nn.ConvTranspose2d(6, 6, 2, stride=2, groups=2)
            self.down = nn.Conv2d(6, 6, 2, stride=2)
            self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))

        def forward(self, x):
            x = self.grouped(torch.relu(self.conv(x)))
            x = self.down(torch.relu(self.up(x)))
            return self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return Block()


def _adapted(name: str, tiny_sr) -> tuple[nn.Module, torch.Tensor]:
    """The model with LoRA, and an input."""
    if name == "conv+linear":
        model = _conv_and_linear_model()
        adaptsr.inject_lora(model, targets=r"conv|grouped|up|mlp\.\d", rank=2, init_lora_weights=False)
        return model, torch.randn(2, 6, 8, 8)
    arch = name.removesuffix("-shifted")
    model = getattr(tiny_sr, arch)()
    adaptsr.inject_lora(model, preset=arch, rank=2, init_lora_weights=False)
    if name.endswith("-shifted"):  # the block-level op on the un-partitioned map
        from adaptsr.nn.swin_block import enable_shifted_window_attention

        enable_shifted_window_attention(model)
    return model, torch.rand(1, 3, 16, 16)


# Dynamo's warnings about our code (it skipped an lru_cache in the shifted-window op) are failures.
@pytest.mark.filterwarnings("error:Dynamo detected")
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", ["conv+linear", "swinir", "swinir-shifted", "hat"])
def test_compiles_without_graph_breaks(tiny_sr, name, backend):
    torch.manual_seed(0)
    model, x = _adapted(name, tiny_sr)
    x.requires_grad_(True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step(fn):
        out = fn(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *trainable.values()])
        return out, grads

    with adaptsr.set_backend(backend):
        expected = step(model)
        dynamo.reset()
        assert dynamo.explain(model)(x).graph_break_count == 0
        compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], expected[0], rtol=1e-4, atol=1e-5)
    for got, want, label in zip(compiled[1], expected[1], ["x", *trainable]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}")
