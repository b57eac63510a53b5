"""Adapter files: round trips through adaptsr, PEFT as the referee for the layout, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from spandrel import ModelLoader
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR
from torch import nn

from adaptsr import inject_lora, load_adapter, load_model, lora_layers, merge_lora, save_adapter, save_model
from adaptsr.inject import unwrap_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
SWINIR_TARGETS = ["qkv", "proj", "fc1", "fc2", "conv_after_body"]


def _swinir(seed: int = 0, depths=(2,)) -> nn.Module:
    torch.manual_seed(seed)
    return SwinIR(
        img_size=16,
        embed_dim=16,
        depths=list(depths),
        num_heads=[2] * len(depths),
        window_size=4,
        upscale=2,
        upsampler="pixelshuffledirect",
        drop_path_rate=0.0,
    ).eval()


def _esrgan(seed: int = 0, num_filters: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return ESRGAN(num_filters=num_filters, num_blocks=1, scale=2).eval()


class _OddConvs(nn.Module):
    """Convs PEFT's adapter does not reproduce: grouped, dilated, reflect-padded, strided."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.strided = nn.Conv2d(8, 6, 3, stride=2, padding=1, padding_mode="circular")
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = self.strided(torch.relu(self.dilated(torch.relu(self.grouped(x)))))
        return self.head(y.permute(0, 2, 3, 1))


class _Nested(nn.Module):
    """Layer names that are dotted suffixes of each other: 'proj' and 'inner.proj'."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)
        self.other = nn.Linear(6, 6)

    def forward(self, x):
        return self.other(self.proj(self.inner.proj(x)))


def _image(channels: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(123))


@torch.no_grad()
def _out(model, x: torch.Tensor) -> torch.Tensor:
    return unwrap_model(model)(x.clone())


def _lora_state(model) -> dict[str, tuple]:
    return {
        name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.rank, layer.alpha, layer.use_rslora)
        for name, layer in lora_layers(model)
    }


def _assert_same_adapters(a, b) -> None:
    sa, sb = _lora_state(a), _lora_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        A1, B1, *rest1 = sa[name]
        A2, B2, *rest2 = sb[name]
        assert torch.equal(A1, A2) and torch.equal(B1, B2), name
        assert rest1 == rest2, name


def _adapted_swinir(directory: Path, **inject_kwargs) -> tuple[nn.Module, nn.Module]:
    """(base, adapted) with the adapter saved to ``directory``; B non-zero, so adapters change outputs."""
    base = _swinir()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, preset="swinir", init_lora_weights=False, **{"rank": 4, "alpha": 8, **inject_kwargs})
    save_adapter(adapted, directory)
    return base, adapted


def _metadata(directory: Path) -> dict:
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        return json.loads(f.metadata()["adaptsr"])


# -- round trips through adaptsr --


@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_gives_identical_outputs(tmp_path, use_rslora):
    base, adapted = _adapted_swinir(
        tmp_path, rank_pattern={"qkv": 2}, alpha_pattern={"fc1": 3.5, "conv_after_body": 1}, use_rslora=use_rslora
    )
    fresh = copy.deepcopy(base)
    summary = load_adapter(fresh, tmp_path)

    assert summary.layers == {name: layer.rank for name, layer in lora_layers(adapted)}
    assert {summary.layers[n] for n in summary.layers if n.endswith("qkv")} == {2}
    _assert_same_adapters(adapted, fresh)
    for name, layer in lora_layers(fresh):
        assert layer.scaling == dict(lora_layers(adapted))[name].scaling
        assert layer.lora_A.requires_grad and not layer.base_layer.weight.requires_grad
    x = _image()
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    assert not torch.allclose(_out(fresh, x), _out(base, x), atol=1e-3)  # the adapter matters


def test_round_trip_grouped_dilated_and_padded_convs(tmp_path):
    torch.manual_seed(0)
    base = _OddConvs().eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=["grouped", "dilated", "strided", "head"], rank=2, alpha=3, init_lora_weights=False)
    save_adapter(adapted, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)

    _assert_same_adapters(adapted, fresh)
    x = _image(channels=4, size=9)
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    info = _metadata(tmp_path)
    assert info["peft_compatible"] is False  # PEFT's conv adapter ignores groups, dilation, padding mode
    assert info["layers"]["grouped"]["groups"] == 2
    assert info["layers"]["dilated"]["padding_mode"] == "reflect"


class _UpSampler(nn.Module):
    """Transposed convs, which PEFT has no adapter for: a grouped up-sampling one and one with output padding."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.out = nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.out(torch.relu(self.up(x)))


def test_round_trip_transposed_convs(tmp_path):
    torch.manual_seed(0)
    base = _UpSampler().eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=["up", "out"], rank=2, alpha=3, init_lora_weights=False)
    save_adapter(adapted, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)

    _assert_same_adapters(adapted, fresh)
    assert {name: layer.rank for name, layer in lora_layers(fresh)} == {"up": 2, "out": 2}
    x = _image(channels=4, size=5)
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    assert not torch.allclose(_out(fresh, x), _out(base, x), atol=1e-3)  # the adapter matters
    info = _metadata(tmp_path)
    assert info["peft_compatible"] is False
    assert info["layers"]["up"]["groups"] == 2 and info["layers"]["out"]["output_padding"] == [1, 1]
    # an adapter for another width names the shapes it needs, A's rank in its second dimension
    narrower = _UpSampler()
    narrower.out = nn.ConvTranspose2d(6, 2, 3, stride=2, padding=1, output_padding=1)
    needs = r"needs lora_A \[6, 2, 3, 3\] and lora_B \[2, 2, 1, 1\]"
    with pytest.raises(ValueError, match=rf"'out'.*lora_B \[3, 2, 1, 1\].*{needs}"):
        load_adapter(narrower, tmp_path, strict_base=False)


def test_round_trip_through_a_spandrel_descriptor(tmp_path):
    base = _esrgan()
    descriptor = ModelLoader().load_from_state_dict(base.state_dict())
    inject_lora(descriptor, preset="esrgan", rank=2, init_lora_weights=False)
    save_adapter(descriptor, tmp_path)

    info = _metadata(tmp_path)
    assert (info["architecture"], info["model_class"]) == ("ESRGAN", type(base).__name__)
    fresh = copy.deepcopy(base)  # a plain module of the same architecture is accepted
    load_adapter(fresh, tmp_path)
    x = _image()
    assert torch.equal(_out(fresh, x), _out(descriptor, x))
    fresh_descriptor = ModelLoader().load_from_state_dict(base.state_dict())
    load_adapter(fresh_descriptor, tmp_path)
    _assert_same_adapters(descriptor, fresh_descriptor)


def test_save_writes_two_files_atomically_into_a_new_directory(tmp_path):
    target = tmp_path / "a" / "b"
    _adapted_swinir(target)
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS]  # no temporary files left
    _adapted_swinir(target, rank=2)  # overwriting works
    assert load_file(str(target / WEIGHTS))[f"{PREFIX}conv_after_body.lora_A.weight"].shape[0] == 2


# -- the layout PEFT writes and reads --


def test_file_layout_matches_peft(tmp_path):
    base, adapted = _adapted_swinir(tmp_path, rank_pattern={"qkv": 2}, alpha_pattern={"fc1": 3.5})
    layers = dict(lora_layers(adapted))
    tensors = load_file(str(tmp_path / WEIGHTS))
    assert set(tensors) == {f"{PREFIX}{n}.lora_{p}.weight" for n in layers for p in "AB"}
    for name, layer in layers.items():
        A, B = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        w = layer.base_layer.weight
        if isinstance(layer.base_layer, nn.Conv2d):
            assert A.shape == (layer.rank, w.shape[1], *w.shape[2:]) and B.shape == (w.shape[0], layer.rank, 1, 1)
        else:
            assert A.shape == (layer.rank, w.shape[1]) and B.shape == (w.shape[0], layer.rank)

    written = json.loads((tmp_path / CONFIG).read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}  # nothing PEFT warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.peft_type == peft.PeftType.LORA and config.bias == "none"
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, False)
    # PEFT's own matching picks exactly our layers, with our ranks and alphas.
    names = [n for n, _ in base.named_modules() if n]
    assert [n for n in names if check_target_module_exists(config, n)] == list(layers)
    for name, layer in layers.items():
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        assert (rank, alpha) == (layer.rank, layer.alpha), name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_adapter_with_the_same_outputs(tmp_path, use_rslora):
    base, adapted = _adapted_swinir(
        tmp_path, rank_pattern={"proj": 2}, alpha_pattern={"fc2": 5, "layers.0.conv": 3}, use_rslora=use_rslora
    )
    assert _metadata(tmp_path)["peft_compatible"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    x = _image()
    torch.testing.assert_close(_out(peft_model, x), _out(adapted, x), rtol=1e-4, atol=1e-5)


def test_patterns_match_one_layer_each_when_names_nest(tmp_path):
    torch.manual_seed(0)
    base = _Nested().eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=["inner.proj", "other"], rank=4, alpha=8, init_lora_weights=False)
    extra = copy.deepcopy(base)  # 'proj' gets rank 2, alpha 3: its keys must not catch 'inner.proj'
    inject_lora(extra, targets=r"proj", rank=2, alpha=3, init_lora_weights=False)
    adapted.proj = extra.proj
    save_adapter(adapted, tmp_path)

    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    for name, layer in lora_layers(adapted):
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        assert (rank, alpha) == (layer.rank, layer.alpha), name
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(5))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(_out(peft_model, x), _out(adapted, x), rtol=1e-5, atol=1e-6)


def _rewrite_keys(directory: Path, variant: str) -> None:
    path = directory / WEIGHTS
    tensors = load_file(str(path))
    if variant == "default_segment":
        tensors = {re.sub(r"\.lora_([AB])\.", r".lora_\1.default.", k): v for k, v in tensors.items()}
    elif variant == "no_prefix":
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    save_file(tensors, str(path))


@pytest.mark.parametrize("variant", ["peft", "default_segment", "no_prefix", "bin"])
def test_load_adapter_peft_saved(tmp_path, variant):
    base = _swinir()
    config = peft.LoraConfig(
        target_modules=SWINIR_TARGETS,
        init_lora_weights=False,
        r=4,
        lora_alpha=8,
        rank_pattern={"qkv": 2},
        alpha_pattern={"fc1": 3},
        use_rslora=variant == "peft",
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(str(tmp_path), safe_serialization=variant != "bin")
    if variant in ("default_segment", "no_prefix"):
        _rewrite_keys(tmp_path, variant)

    fresh = copy.deepcopy(base)
    summary = load_adapter(fresh, tmp_path)
    peft_layers = {
        n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert summary.layers == {n: m.r["default"] for n, m in peft_layers.items()}
    for name, layer in lora_layers(fresh):
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"])
    x = _image()
    expected = _out(peft_model, x)
    torch.testing.assert_close(_out(fresh, x), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, _out(base, x), atol=1e-3)


# -- errors a user can hit --


def test_adapter_for_other_base_weights_is_refused(tmp_path):
    _adapted_swinir(tmp_path)
    other = _swinir(seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"trained for another base model.*strict_base=False") as err:
        load_adapter(other, tmp_path)
    assert WEIGHTS in str(err.value)
    assert not list(lora_layers(other))

    nudged = _swinir()
    with torch.no_grad():
        nudged.conv_first.weight[0, 0, 0, 0] += 1e-3  # one weight of a layer without adapter
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(nudged, tmp_path)
    nudged = _swinir()
    with torch.no_grad():
        nudged.conv_after_body.bias[0] += 1e-3  # the base of an adapted layer
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(nudged, tmp_path)

    summary = load_adapter(other, tmp_path, strict_base=False)
    assert len(summary.layers) == 10 and len(list(lora_layers(other))) == 10


def test_adapter_for_other_width_names_layer_and_shapes(tmp_path):
    adapted = _esrgan(num_filters=8)
    inject_lora(adapted, preset="esrgan", rank=2)
    save_adapter(adapted, tmp_path)
    wider = _esrgan(num_filters=16)
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError) as err:
        load_adapter(wider, tmp_path)
    message = str(err.value)
    assert "model.1.sub.0.RDB1.conv1.0" in message
    assert "[2, 8, 3, 3]" in message and "[2, 16, 3, 3]" in message  # file's and model's lora_A
    assert "[32, 8, 3, 3]" in message and "[32, 16, 3, 3]" in message  # recorded and actual weight
    assert "width" in message
    # nothing was changed
    assert not list(lora_layers(wider))
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    with pytest.raises(ValueError, match=r"model\.1\.sub\.0\.RDB1\.conv1\.0"):
        load_adapter(wider, tmp_path, strict_base=False)  # shapes are checked regardless


def test_adapter_for_missing_layer(tmp_path):
    deeper = _swinir(depths=(2, 2))
    inject_lora(deeper, preset="swinir", rank=2)
    save_adapter(deeper, tmp_path)
    shallow = _swinir(depths=(2,))
    with pytest.raises(ValueError, match=r"layer .layers\.1\..*which this SwinIR does not have") as err:
        load_adapter(shallow, tmp_path)
    assert WEIGHTS in str(err.value)
    assert not list(lora_layers(shallow))


def test_adapter_for_another_architecture(tmp_path):
    _adapted_swinir(tmp_path)
    with pytest.raises(ValueError, match=r"trained for a SwinIR model.*not for this RRDBNet.*strict_base=False"):
        load_adapter(_esrgan(), tmp_path)
    with pytest.raises(ValueError, match="does not have"):  # without the check, the layer names do not fit
        load_adapter(_esrgan(), tmp_path, strict_base=False)


def test_adapter_on_a_layer_that_is_not_conv_or_linear(tmp_path):
    base, _ = _adapted_swinir(tmp_path)
    path = tmp_path / WEIGHTS
    tensors = load_file(str(path))
    name = "layers.0.residual_group.blocks.0.attn.qkv"
    norm = "layers.0.residual_group.blocks.0.norm1"
    tensors = {k.replace(name + ".", norm + "."): v for k, v in tensors.items()}
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"{norm}.*LayerNorm.*nn\.Conv2d, nn\.Linear and nn\.ConvTranspose2d"):
        load_adapter(copy.deepcopy(base), tmp_path, strict_base=False)


def test_unsupported_tensor_and_half_pairs(tmp_path):
    base, _ = _adapted_swinir(tmp_path)
    path = tmp_path / WEIGHTS
    tensors = load_file(str(path))
    with_bias = {**tensors, f"{PREFIX}conv_after_body.lora_B.bias": torch.zeros(16)}
    save_file(with_bias, str(path))
    with pytest.raises(ValueError, match=r"conv_after_body\.lora_B\.bias.*bias terms are not supported"):
        load_adapter(copy.deepcopy(base), tmp_path)
    del tensors[f"{PREFIX}conv_after_body.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"'conv_after_body' has lora_A but no lora_B"):
        load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    base, _ = _adapted_swinir(tmp_path)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(b"this is not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS} could not be read"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_corrupt_or_foreign_config_names_the_file(tmp_path):
    base, _ = _adapted_swinir(tmp_path)
    path = tmp_path / CONFIG
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=rf"{CONFIG} is not valid JSON"):
        load_adapter(copy.deepcopy(base), tmp_path)
    path.write_text(json.dumps({**json.loads(good), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match=rf"{CONFIG}: peft_type is 'IA3'"):
        load_adapter(copy.deepcopy(base), tmp_path)
    path.write_text(json.dumps({**json.loads(good), "use_dora": True}))  # DoRA, but no magnitudes in the weights
    with pytest.raises(ValueError, match="no lora_magnitude_vector, which a DoRA adapter"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_missing_directory_or_files(tmp_path):
    base = _swinir()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(base, tmp_path / "nowhere")
    _adapted_swinir(tmp_path / "adapter")
    with pytest.raises(ValueError, match="is a file"):
        load_adapter(base, tmp_path / "adapter" / WEIGHTS)
    (tmp_path / "adapter" / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_adapter(base, tmp_path / "adapter")
    _adapted_swinir(tmp_path / "adapter")
    (tmp_path / "adapter" / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_adapter(base, tmp_path / "adapter")
    assert not list(lora_layers(base))


def test_load_into_a_model_that_already_has_adapters(tmp_path):
    base, adapted = _adapted_swinir(tmp_path)
    with pytest.raises(ValueError, match=r"already has LoRA adapters .*adaptsr\.unload_lora"):
        load_adapter(adapted, tmp_path)


def test_save_refuses_plain_and_merged_models(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_swinir(), tmp_path / "plain")
    model = _swinir()
    inject_lora(model, preset="swinir", rank=2, init_lora_weights=False)
    merge_lora(model, unload=False)
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_adapter(model, tmp_path / "merged")
    assert not (tmp_path / "plain").exists() and not (tmp_path / "merged").exists()


def test_adapter_of_a_span_model_fits_its_base_after_evaluating(tiny_sr, tmp_path):
    """SPAN rewrites its folded inference convs (eval_conv) at every evaluation, so they are not base weights:
    an adapter saved after the model evaluated still fits the checkpoint it was trained on."""
    save_model(tiny_sr.span(), tmp_path / "span.safetensors")
    model = load_model(tmp_path / "span.safetensors")
    inject_lora(model, preset="span", rank=2, init_lora_weights=False)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = model.model.eval()(x)  # rewrites every eval_conv from the adapted branches
    save_adapter(model, tmp_path / "adapter")
    fresh = load_model(tmp_path / "span.safetensors")
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval()(x), expected)
