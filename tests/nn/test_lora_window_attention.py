"""LoRAWindowAttention: a drop-in for spandrel's SwinIR, HAT, DRCT and ATD WindowAttention.

The referees: spandrel's own module (same function, same keys, same call), PEFT (a whole model
with LoRA on the original modules computes what ours computes, gradients included) and spandrel's
ModelLoader (the merged model loads as the original architecture).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from unittest import mock

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from spandrel.architectures.ATD.__arch.atd_arch import WindowAttention as ATDWindowAttention
from spandrel.architectures.DRCT.__arch.drct_arch import WindowAttention as DRCTWindowAttention
from spandrel.architectures.HAT.__arch.HAT import WindowAttention as HATWindowAttention
from spandrel.architectures.SwinIR.__arch.SwinIR import WindowAttention as SwinIRWindowAttention
from torch import nn

import adaptsr
from adaptsr import LoRALinear, LoRAWindowAttention
from adaptsr.backend import set_backend
from adaptsr.nn.overlapping_cross_attention import can_fuse_overlapping_attention
from adaptsr.presets import PRESETS

warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

attention_op = importlib.import_module("adaptsr.ops.window_attention")

ORIGINALS = {
    "swinir": SwinIRWindowAttention, "hat": HATWindowAttention, "drct": DRCTWindowAttention, "atd": ATDWindowAttention,
}
ARCHITECTURE_IDS = {"swinir": "SwinIR", "hat": "HAT", "drct": "DRCT", "atd": "ATD"}
# ATD's attention takes the projected qkv tokens and the index: no qkv layer, no dropout
QKV_PASSED_IN = {"atd"}
INDEX_PASSED_IN = {"hat", "atd"}
# the attentions that own a dropout (the constructor takes attn_drop)
WITH_DROPOUT = [arch for arch in ORIGINALS if arch not in QKV_PASSED_IN]
# backend name -> (adaptsr backend, torch path forced)
BACKENDS = {"reference": ("reference", None), "torch-matmul": ("torch", "matmul"), "torch-sdpa": ("torch", "sdpa")}


@contextlib.contextmanager
def backend(name: str):
    """Select the backend; for the torch backend force its matmul or scaled_dot_product_attention path."""
    chosen, path = BACKENDS[name]
    with set_backend(chosen):
        if path is None:
            yield
        else:
            with mock.patch.object(attention_op, "_sdpa_wins", lambda device: path == "sdpa"):
                yield


@pytest.fixture
def build(tiny_sr):
    """``build(arch)``: conftest's tiny SwinIR, HAT, DRCT or ATD (window 4, alternately unshifted and shifted
    blocks) in float64."""

    def _build(arch: str) -> nn.Module:
        model = getattr(tiny_sr, arch)()
        with torch.no_grad():  # a bias table far from its 0.02 init, so that it matters
            for name, p in model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.normal_(0.0, 1.0)
        return model.double()

    return _build


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRAWindowAttention, *ORIGINALS.values()))}


def lr_batch(height: int = 16, width: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- a whole model against PEFT on the original modules --


def _peft_twin(arch: str, ours: nn.Module, base: nn.Module) -> nn.Module:
    """``base`` with PEFT LoRA on the same layers as ``ours`` and our A, B (non-zero) copied in."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PRESETS[arch], init_lora_weights=False)
    twin = inject_adapter_in_model(config, base).double()
    peft_layers = {n: m for n, m in twin.named_modules() if isinstance(m, PeftLoraLayer)}
    ours_layers = dict(adaptsr.lora_layers(ours))
    assert set(peft_layers) == set(ours_layers)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    return twin


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters (under our names: ``<layer>.lora_A``) and the relative position bias tables."""
    params = {}
    for name, p in model.named_parameters():
        key = name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
        wanted = key.endswith((".lora_A", ".lora_B", "relative_position_bias_table"))
        p.requires_grad_(wanted)
        if wanted:
            params[key] = p
    return params


def _step(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients of the input, the adapters and the bias tables."""
    params = _trainable(model)
    x = x.clone().requires_grad_(True)
    model.train()
    y = model(x)
    grads = torch.autograd.grad((y * weight).sum(), [x, *params.values()])
    return {"y": y.detach(), "dx": grads[0], **dict(zip(params, grads[1:]))}


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["img_size", "other-size"])
@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("arch", list(ORIGINALS))
def test_model_matches_peft_on_spandrel_modules(arch, name, size, assert_close, build):
    """Output and every gradient (input, A, B, bias tables) equal PEFT's on the original modules, float64.

    The second input size makes spandrel build the shift mask per call (15 windows per image).
    """
    ours = build(arch)
    torch.manual_seed(1)
    summary = adaptsr.inject_lora(ours, preset=arch, rank=4, alpha=8, init_lora_weights=False)
    found = attentions(ours)
    assert found and all(type(m) is LoRAWindowAttention for m in found.values())
    overlapping = [n for n, m in ours.named_modules() if can_fuse_overlapping_attention(m)]  # HAT's OCABs
    assert summary.window_attention == list(found) + overlapping
    assert {m.architecture for m in found.values()} == {ARCHITECTURE_IDS[arch]}
    assert all(isinstance(m.proj, LoRALinear) for m in found.values())
    if arch in QKV_PASSED_IN:
        assert all(m.qkv is None for m in found.values())
    else:
        assert all(isinstance(m.qkv, LoRALinear) for m in found.values())
    twin = _peft_twin(arch, ours, build(arch))
    assert all(type(m) is ORIGINALS[arch] for m in attentions(twin).values())

    x = lr_batch(*size)
    weight = torch.randn(_step(twin, x, 1.0)["y"].shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    expected = _step(twin, x, weight)
    with backend(name):
        got = _step(ours, x, weight)
    assert got.keys() == expected.keys()
    tables = {f"{attention}.relative_position_bias_table" for attention in found}
    assert len(tables) >= 2 and tables <= got.keys()  # an unshifted and a shifted block's
    for key, value in got.items():
        assert value.abs().max() > 0, f"{key}: zero, the comparison would be vacuous"
        assert_close(value, expected[key], f"{arch} {name} {key}")
    assert (got["y"] - _step(build(arch), x, weight)["y"]).abs().max() > 1e-3  # the adapters do something


# -- merge, unmerge, unload; spandrel loads the result --


@pytest.mark.parametrize("arch", list(ORIGINALS))
def test_unmerged_merged_unloaded_agree_and_spandrel_loads_it(arch, tmp_path, assert_close, build):
    base = build(arch).eval()
    base_keys = list(base.state_dict())
    x = lr_batch(seed=4)
    with torch.no_grad():
        base_out = base(x)
    model = build(arch)
    torch.manual_seed(5)
    adaptsr.inject_lora(model, preset=arch, rank=4, init_lora_weights=False)
    model.eval()
    # the swap changes no key: the same as LoRA on spandrel's modules (qkv.base_layer.weight, qkv.lora_A, ...)
    plain_lora = build(arch)
    adaptsr.inject_lora(plain_lora, preset=arch, rank=4, window_attention=False)
    assert list(model.state_dict()) == list(plain_lora.state_dict())
    assert any(key.endswith(("attn.qkv.lora_A", "attn_win.proj.lora_A")) for key in model.state_dict())

    with torch.no_grad():
        unmerged = model(x)
        adaptsr.merge_lora(model, unload=False)
        assert all(type(m) is LoRAWindowAttention and m.merged for m in attentions(model).values())
        merged = model(x)
        adaptsr.unmerge_lora(model)
        assert not any(m.merged for m in attentions(model).values())
        again = model(x)
        adaptsr.merge_lora(model)
        unloaded = model(x)
    assert all(type(m) is ORIGINALS[arch] for m in attentions(model).values())
    assert not list(adaptsr.lora_layers(model))
    assert list(model.state_dict()) == base_keys
    for label, out in (("merged", merged), ("unmerged again", again), ("unloaded", unloaded)):
        assert_close(out, unmerged, label)
    assert (unloaded - base_out).abs().max() > 1e-3

    path = tmp_path / f"{arch}.safetensors"
    adaptsr.save_model(model.float(), path)
    loaded = adaptsr.load_model(path)
    assert loaded.architecture.id == ARCHITECTURE_IDS[arch]
    assert all(type(m) is ORIGINALS[arch] for m in attentions(loaded.model).values())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x.float()), unloaded.float(), rtol=1e-4, atol=1e-5)


def test_save_model_of_a_lora_model_restores_spandrel_modules(tmp_path, build):
    model = build("swinir")
    adaptsr.inject_lora(model, preset="swinir", rank=2, init_lora_weights=False)
    adaptsr.save_model(model.float(), tmp_path / "m.pth")  # merges a copy
    assert all(type(m) is LoRAWindowAttention for m in attentions(model).values())  # the model keeps its modules
    loaded = adaptsr.load_model(tmp_path / "m.pth")
    assert all(type(m) is SwinIRWindowAttention for m in attentions(loaded.model).values())


# -- adapter files are unchanged --


def test_adapter_files_keep_their_keys_and_reload(tmp_path, build):
    model = build("swinir").float()
    adaptsr.inject_lora(model, preset="swinir", rank=2, init_lora_weights=False)
    directory = adaptsr.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = set(load_file(str(directory / "adapter_model.safetensors")))
    assert "base_model.model.layers.0.residual_group.blocks.1.attn.qkv.lora_A.weight" in keys
    assert "base_model.model.layers.0.residual_group.blocks.0.attn.proj.lora_B.weight" in keys

    fresh = build("swinir").float()
    adaptsr.load_adapter(fresh, directory)
    assert all(type(m) is LoRAWindowAttention for m in attentions(fresh).values())
    x = lr_batch(seed=6).float()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


# -- inject_lora's window_attention keyword --


def test_window_attention_keyword(build):
    model = build("swinir")
    summary = adaptsr.inject_lora(model, preset="swinir", rank=2, window_attention=False)
    assert summary.window_attention == []
    assert all(type(m) is SwinIRWindowAttention for m in attentions(model).values())
    assert isinstance(model.layers[0].residual_group.blocks[0].attn.qkv, LoRALinear)

    model = build("swinir")  # default: only attentions whose qkv / proj is adapted
    summary = adaptsr.inject_lora(model, targets=["blocks.1.attn.proj", "mlp.fc1"], rank=2)
    assert summary.window_attention == ["layers.0.residual_group.blocks.1.attn"]
    assert [type(m) for m in attentions(model).values()] == [SwinIRWindowAttention, LoRAWindowAttention]

    model = build("swinir")
    summary = adaptsr.inject_lora(model, targets=["mlp.fc1"], rank=2, window_attention=True)
    assert all(type(m) is LoRAWindowAttention for m in attentions(model).values())
    assert all(type(m.qkv) is nn.Linear for m in attentions(model).values())  # swapped, not adapted
    adaptsr.merge_lora(model)
    assert all(type(m) is SwinIRWindowAttention for m in attentions(model).values())


def test_failed_injection_leaves_the_attentions_alone(build):
    model = build("swinir")
    with pytest.raises(ValueError, match=r"rank 99 is larger"):
        adaptsr.inject_lora(model, preset="swinir", rank=4, rank_pattern={"fc2": 99})
    assert all(type(m) is SwinIRWindowAttention for m in attentions(model).values())
    assert not list(adaptsr.lora_layers(model))


# -- the module itself against spandrel's --


def _spandrel_attention(arch: str, *, attn_drop: float = 0.0, qkv_bias: bool = True) -> nn.Module:
    torch.manual_seed(7)
    dropout = {} if arch in QKV_PASSED_IN else {"attn_drop": attn_drop}
    attn = ORIGINALS[arch](12, (4, 4), 3, qkv_bias=qkv_bias, **dropout).double()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    return attn


def _index(window: int = 4) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def _mask(num_masks: int = 3) -> torch.Tensor:
    region = torch.randint(0, 3, (num_masks, 16), generator=torch.Generator().manual_seed(8))
    return torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).double()


def _tokens(arch: str, windows: int, seed: int = 0) -> torch.Tensor:
    """The module's first argument for ``windows`` windows of 16 tokens of 12 channels: x, or for ATD
    their qkv projection (36 channels)."""
    channels = 36 if arch in QKV_PASSED_IN else 12
    return torch.randn(windows, 16, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _calls(arch: str, x: torch.Tensor, mask):
    """The ways spandrel's blocks (and users) call the module: positional and keyword arguments."""
    if arch not in INDEX_PASSED_IN:
        return [((x,), {}), ((x, mask), {}), ((x,), {"mask": mask})] if mask is not None else [((x,), {})]
    rpi = _index()
    return [((x, rpi), {"mask": mask}), ((x, rpi, mask), {}), ((x,), {"rpi": rpi, "mask": mask})]


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("arch", list(ORIGINALS))
def test_module_computes_what_spandrel_computes(arch, shifted, name, assert_close):
    original = _spandrel_attention(arch).eval()
    ours = LoRAWindowAttention.from_module(original)
    x = _tokens(arch, 6)
    mask = _mask() if shifted else None
    with backend(name):
        for args, kwargs in _calls(arch, x, mask):
            assert_close(ours(*args, **kwargs), original(*args, **kwargs), f"{args[1:]} {sorted(kwargs)}")


@pytest.mark.parametrize("arch", list(ORIGINALS))
def test_module_keeps_keys_parameters_and_calls(arch):
    original = _spandrel_attention(arch, qkv_bias=False)
    ours = LoRAWindowAttention(attention=original)
    assert list(ours.state_dict()) == list(original.state_dict())
    assert ours.relative_position_bias_table is original.relative_position_bias_table
    assert ours.proj is original.proj
    if arch in QKV_PASSED_IN:
        assert ours.qkv is None and not hasattr(original, "qkv")
    else:
        assert ours.qkv is original.qkv
    assert (ours.dim, ours.window_size, ours.num_heads, ours.scale) == (12, (4, 4), 3, original.scale)
    assert ours.index_passed_in == (arch in INDEX_PASSED_IN)
    assert "dim=12, window_size=(4, 4), num_heads=3" in repr(ours)
    assert f"architecture={ARCHITECTURE_IDS[arch]}" in repr(ours)
    x = _tokens(arch, 3)
    with pytest.raises(TypeError):
        ours(x, _index(), _mask(), "one too many")
    if arch in INDEX_PASSED_IN:
        with pytest.raises(TypeError, match="rpi"):
            ours(x)  # HAT and ATD pass the index in


def test_flops_match_spandrel():
    original = _spandrel_attention("swinir")
    assert LoRAWindowAttention.from_module(original).flops(16) == original.flops(16)


@pytest.mark.parametrize("arch", list(ORIGINALS))
def test_to_dense_gives_spandrel_module_back(arch, assert_close):
    original = _spandrel_attention(arch)
    lora = LoRAWindowAttention.from_module(copy.deepcopy(original))
    torch.manual_seed(9)
    adapted = "proj" if arch in QKV_PASSED_IN else "qkv"
    setattr(lora, adapted, LoRALinear(base_layer=getattr(lora, adapted), rank=2, init_lora_weights=False))
    x = _tokens(arch, 6)
    call = (x, _index(), _mask()) if arch in INDEX_PASSED_IN else (x, _mask())
    with torch.no_grad():
        expected = lora.eval()(*call)
    rng = torch.get_rng_state()
    dense = lora.to_dense()
    assert torch.equal(torch.get_rng_state(), rng)  # the constructor's random init did not touch the caller's stream
    assert type(dense) is ORIGINALS[arch] and type(getattr(dense, adapted)) is nn.Linear
    assert list(dense.state_dict()) == list(original.state_dict())
    assert dense.relative_position_bias_table is not lora.relative_position_bias_table
    assert torch.equal(dense.relative_position_bias_table, lora.relative_position_bias_table)
    assert isinstance(getattr(lora, adapted), LoRALinear) and not lora.merged  # to_dense leaves the module as it was
    with torch.no_grad():
        assert_close(dense.eval()(*call), expected, "to_dense")
        assert (dense(*call) - original.eval()(*call)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", WITH_DROPOUT)
def test_attention_dropout_matches_spandrel_in_training(arch, assert_close):
    original = _spandrel_attention(arch, attn_drop=0.3).train()
    ours = LoRAWindowAttention.from_module(original)
    assert ours.training
    x = torch.randn(6, 16, 12, dtype=torch.float64)
    call = (x, _index(), _mask()) if arch in INDEX_PASSED_IN else (x, _mask())
    torch.manual_seed(10)
    expected = original(*call)
    torch.manual_seed(10)
    assert_close(ours(*call), expected, "dropout")
    assert not torch.allclose(ours.eval()(*call), expected)  # the dropout was on


def test_only_spandrel_window_attention_is_accepted():
    assert not LoRAWindowAttention.can_wrap(nn.Linear(4, 4))
    supported = "SwinIR WindowAttention, HAT WindowAttention, DRCT WindowAttention, ATD WindowAttention"
    with pytest.raises(TypeError, match=rf"replaces spandrel's {supported}; got Linear"):
        LoRAWindowAttention.from_module(nn.Linear(4, 4))
