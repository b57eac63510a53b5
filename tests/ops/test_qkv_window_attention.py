"""qkv_window_attention (the single pass) against the float64 two-step reference, and
LoRAWindowAttention with ``single_pass`` on against the same module on the reference backend."""

from __future__ import annotations

import pytest
import torch
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention

from adaptsr.backend import is_available, set_backend
from adaptsr.nn import LoRALinear, LoRAWindowAttention
from adaptsr.ops.qkv_window_attention import qkv_window_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not is_available("triton"),
                                                                       reason="triton unavailable"))]
# (window, heads, head dim, windows B_, mask windows nW (0: none), qkv bias)
CASES = [(8, 2, 12, 3, 3, True), (8, 1, 30, 2, 0, False), (7, 2, 8, 2, 1, True)]
_NAMES = ("x", "w_qkv", "b_qkv", "table")


def _relative_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _tensors(case, seed: int = 0) -> dict:
    window, heads, d, batch_windows, num_masks, has_bias = case
    gen = torch.Generator().manual_seed(seed)
    n, c = window * window, heads * d
    t = {
        "x": torch.randn(batch_windows, n, c, generator=gen, dtype=torch.float64),
        "w_qkv": torch.randn(3 * c, c, generator=gen, dtype=torch.float64) / c**0.5,
        "b_qkv": torch.randn(3 * c, generator=gen, dtype=torch.float64) if has_bias else None,
        "table": torch.randn((2 * window - 1) ** 2, heads, generator=gen, dtype=torch.float64),
        "do": torch.randn(batch_windows, n, c, generator=gen, dtype=torch.float64),
        "index": _relative_index(window),
        "mask": None,
    }
    if num_masks:
        t["mask"] = torch.where(torch.rand(num_masks, n, n, generator=gen) < 0.3, -100.0, 0.0).double()
    return t


def _run(backend: str, t: dict, dtype: torch.dtype, heads: int) -> dict:
    leaves = {k: t[k].to(DEVICE, dtype).clone().requires_grad_(True) for k in _NAMES if t[k] is not None}
    mask = None if t["mask"] is None else t["mask"].to(DEVICE, dtype)
    with set_backend(backend):
        o = qkv_window_attention(leaves["x"], leaves["w_qkv"], leaves.get("b_qkv"), heads, leaves["table"],
                                 t["index"].to(DEVICE), mask, (leaves["x"].shape[-1] // heads) ** -0.5)
    o.backward(t["do"].to(DEVICE, dtype))
    return {"o": o.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}h{c[1]}d{c[2]}b{c[3]}m{c[4]}")
def test_matches_float64_two_step(backend, dtype, case, assert_close_to_reference):
    heads = case[1]
    t = _tensors(case)
    ref64 = _run("reference", t, torch.float64, heads)
    plain = _run("reference", t, dtype, heads)
    actual = _run(backend, t, dtype, heads)
    assert set(actual) == set(ref64)
    for key in ref64:
        assert_close_to_reference(actual[key].cpu(), ref64[key].cpu(), plain[key].cpu(), f"{backend} {key}")


def test_triton_backend_runs_the_fused_function():
    if not is_available("triton"):
        pytest.skip("triton unavailable")
    t = _tensors(CASES[0])
    x = t["x"].float().requires_grad_(True)
    with set_backend("triton"):
        o = qkv_window_attention(x, t["w_qkv"].float(), None, 2, t["table"].float(), t["index"], None, 0.3)
    assert type(o.grad_fn).__name__ == "_FusedQKVWindowAttentionBackward"


def test_bad_weight_shape_names_both_shapes():
    t = _tensors(CASES[0])
    with pytest.raises(ValueError, match=r"x \(3, 64, 24\), w_qkv \(24, 24\)"):
        qkv_window_attention(t["x"], t["w_qkv"][:24], None, 2, t["table"], t["index"], None, 0.3)


@pytest.mark.skipif(not is_available("triton"), reason="triton unavailable")
@pytest.mark.parametrize("shifted", [False, True])
def test_module_single_pass_matches_reference(shifted, assert_close):
    """LoRAWindowAttention with single_pass on (triton) == the same module on the reference backend:
    output and the gradients of x, the adapters and the bias table."""
    torch.manual_seed(0)
    window, heads, dim = 8, 2, 24
    attention = WindowAttention(dim, (window, window), heads).to(DEVICE)
    attention.qkv = LoRALinear(base_layer=attention.qkv, rank=4, init_lora_weights=False)
    module = LoRAWindowAttention.from_module(attention)
    n = window * window
    x = torch.randn(4, n, dim, device=DEVICE)
    mask = torch.where(torch.rand(2, n, n) < 0.3, -100.0, 0.0).to(DEVICE) if shifted else None
    do = torch.randn(4, n, dim, device=DEVICE)

    def run(backend: str, single_pass: bool):
        module.single_pass = single_pass
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with set_backend(backend):
            y = module(xi, mask)
        y.backward(do)
        return [y.detach(), xi.grad, module.qkv.lora_A.grad, module.qkv.lora_B.grad, module.relative_position_bias_table.grad]

    expected = run("reference", False)
    actual = run("triton", True)
    for name, a, e in zip(("y", "dx", "dA", "dB", "dtable"), actual, expected):
        assert a is not None, name
        assert_close(a, e, name)
