"""DoRA adapters on whole models: files in PEFT's DoRA layout (PEFT the referee both ways), merging into a
checkpoint spandrel opens, strength, the refusals (combining, mixed files, missing or misshapen magnitudes)
and the command line. The layer math against the float64 oracle is tests/nn/test_dora.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR
from torch import nn

import adaptsr
from adaptsr import (
    combine_adapters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    set_adapter_strength,
)
from adaptsr.cli import main
from adaptsr.inject import unwrap_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
SWINIR_TARGETS = ["qkv", "proj", "fc1", "fc2", "conv_after_body"]


def _swinir(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SwinIR(img_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4, upscale=2,
                  upsampler="pixelshuffledirect", drop_path_rate=0.0).eval()


def _image(channels: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(123))


@torch.no_grad()
def _out(model, x: torch.Tensor) -> torch.Tensor:
    return unwrap_model(model)(x.clone())


@torch.no_grad()
def _perturb_magnitudes(model, seed: int = 1) -> None:
    """Magnitudes away from ||W + s B A||, so every DoRA term shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        m = layer.lora_magnitude_vector
        m.mul_(0.5 + torch.rand(m.shape, generator=generator))


def _dora_swinir(directory, **inject_kwargs):
    """(base, adapted) with a DoRA adapter (B non-zero, magnitudes perturbed) saved to ``directory``."""
    base = _swinir()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, preset="swinir", init_lora_weights=False, use_dora=True,
                **{"rank": 4, "alpha": 8, **inject_kwargs})
    _perturb_magnitudes(adapted)
    save_adapter(adapted, directory)
    return base, adapted


# -- files --


def test_round_trip_and_peft_layout(tmp_path):
    base, adapted = _dora_swinir(tmp_path, rank_pattern={"qkv": 2}, alpha_pattern={"fc1": 3.5})
    layers = dict(lora_layers(adapted))
    tensors = load_file(str(tmp_path / WEIGHTS))
    assert set(tensors) == {f"{PREFIX}{n}.lora_{p}" for n in layers for p in ("A.weight", "B.weight",
                                                                                "magnitude_vector")}
    for name, layer in layers.items():
        out = layer.base_layer.weight.shape[0]
        want = (1, out, 1, 1) if isinstance(layer.base_layer, nn.Conv2d) else (out,)  # PEFT's shapes
        assert tuple(tensors[f"{PREFIX}{name}.lora_magnitude_vector"].shape) == want, name
    assert json.loads((tmp_path / CONFIG).read_text())["use_dora"] is True

    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    for name, layer in lora_layers(fresh):
        assert layer.use_dora and layer.lora_magnitude_vector.requires_grad
        assert torch.equal(layer.lora_magnitude_vector, layers[name].lora_magnitude_vector), name
    x = _image()
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    assert not torch.allclose(_out(fresh, x), _out(base, x), atol=1e-3)


def test_peft_loads_our_dora_adapter_with_the_same_outputs(tmp_path):
    base, adapted = _dora_swinir(tmp_path, rank_pattern={"proj": 2}, alpha_pattern={"fc2": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert any(len(m.lora_magnitude_vector) for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    x = _image()
    torch.testing.assert_close(_out(peft_model, x), _out(adapted, x), rtol=1e-4, atol=1e-5)


def _rename_magnitudes(directory, suffix: str) -> None:
    path = directory / WEIGHTS
    tensors = load_file(str(path))
    save_file({k + suffix if k.endswith("lora_magnitude_vector") else k: v for k, v in tensors.items()}, str(path))


@pytest.mark.parametrize("suffix", ["", ".weight", ".default.weight"])
def test_load_a_dora_adapter_peft_saved(tmp_path, suffix):
    """PEFT's file, and the key forms of its in-memory state dicts."""
    base = _swinir()
    config = peft.LoraConfig(target_modules=SWINIR_TARGETS, init_lora_weights=False, r=4, lora_alpha=8,
                             rank_pattern={"qkv": 2}, use_dora=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    _perturb_magnitudes_peft(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    _rename_magnitudes(tmp_path, suffix)

    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    assert all(layer.use_dora for _, layer in lora_layers(fresh))
    x = _image()
    expected = _out(peft_model, x)
    torch.testing.assert_close(_out(fresh, x), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, _out(base, x), atol=1e-3)


@torch.no_grad()
def _perturb_magnitudes_peft(peft_model) -> None:
    generator = torch.Generator().manual_seed(2)
    for module in peft_model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_magnitude_vector:
            m = module.lora_magnitude_vector["default"].weight
            m.mul_(0.5 + torch.rand(m.shape, generator=generator))


def test_transposed_and_odd_convs_round_trip(tmp_path):
    """Layers PEFT has no DoRA for (transposed convs) or computes otherwise (groups, dilation, reflect padding)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), nn.ReLU(),
                         nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)).eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, targets=["0", "2"], rank=2, alpha=3, init_lora_weights=False, use_dora=True)
    _perturb_magnitudes(adapted)
    save_adapter(adapted, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    x = _image(channels=4, size=7)
    assert torch.equal(_out(fresh, x), _out(adapted, x))
    # merged into plain layers, the same function
    merge_lora(fresh)
    assert [type(m) for m in fresh] == [nn.Conv2d, nn.ReLU, nn.ConvTranspose2d]
    torch.testing.assert_close(_out(fresh, x), _out(adapted, x), rtol=1e-5, atol=1e-6)


# -- refusals --


def test_a_config_and_weights_that_disagree_are_refused(tmp_path):
    base, _ = _dora_swinir(tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / CONFIG).read_text())
    (tmp_path / "dora" / CONFIG).write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match=r"has a DoRA lora_magnitude_vector, but .*adapter_config.json does not set"):
        load_adapter(copy.deepcopy(base), tmp_path / "dora")

    plain = copy.deepcopy(base)
    inject_lora(plain, preset="swinir", rank=4, init_lora_weights=False)
    save_adapter(plain, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / CONFIG).read_text())
    (tmp_path / "lora" / CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"layer '.*' has no lora_magnitude_vector, which a DoRA adapter"):
        load_adapter(copy.deepcopy(base), tmp_path / "lora")

    path = tmp_path / "dora" / WEIGHTS
    (tmp_path / "dora" / CONFIG).write_text(json.dumps(config | {"use_dora": True}))
    tensors = load_file(str(path))
    key = f"{PREFIX}conv_after_body.lora_magnitude_vector"
    tensors[key] = tensors[key][:, :-1]
    save_file(tensors, str(path))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'conv_after_body' has a lora_magnitude_vector of shape \[1, 15, 1, 1\], "
                                         r"but its 16 output channels need 16"):
        load_adapter(fresh, tmp_path / "dora")
    assert not list(lora_layers(fresh))  # a refused load leaves the model as it was


def test_save_refuses_a_mix_of_dora_and_lora_layers(tmp_path):
    base = _swinir()
    mixed = copy.deepcopy(base)
    inject_lora(mixed, targets=r".*qkv", rank=2, use_dora=True)
    other = copy.deepcopy(base)
    inject_lora(other, targets="conv_after_body", rank=2)
    mixed.conv_after_body = other.conv_after_body
    with pytest.raises(ValueError, match="mixes DoRA and plain LoRA layers"):
        save_adapter(mixed, tmp_path)


def test_combining_refuses_dora_adapters(tmp_path):
    base, _ = _dora_swinir(tmp_path / "dora")
    plain = copy.deepcopy(base)
    inject_lora(plain, preset="swinir", rank=4, init_lora_weights=False)
    save_adapter(plain, tmp_path / "lora")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"dora is a DoRA adapter.*not low-rank"):
        combine_adapters(fresh, [tmp_path / "lora", tmp_path / "dora"], [0.5, 0.5])
    assert not list(lora_layers(fresh))


# -- merging and strength on a whole model --


def test_merge_gives_a_checkpoint_spandrel_opens(tmp_path):
    _, adapted = _dora_swinir(tmp_path / "adapter")
    x = _image()
    expected = _out(adapted, x)
    merged = merge_lora(copy.deepcopy(adapted))
    assert not list(lora_layers(merged))
    adaptsr.save_model(merged, tmp_path / "merged.safetensors")
    reopened = adaptsr.load_model(tmp_path / "merged.safetensors")
    assert reopened.architecture.id == "SwinIR"
    torch.testing.assert_close(_out(reopened, x), expected, rtol=1e-5, atol=1e-6)


def test_strength_blends_in_weight_space(tmp_path):
    """Strength S: W + S (W_dora - W), so 0 is the base model and the merged weights are linear in S."""
    base, adapted = _dora_swinir(tmp_path)
    x = _image()
    set_adapter_strength(adapted, 0.0)
    torch.testing.assert_close(_out(adapted, x), _out(base, x), rtol=1e-5, atol=1e-6)

    weights = {}
    for strength in (0.0, 0.5, 1.0):
        set_adapter_strength(adapted, strength)
        unmerged = _out(adapted, x)
        merged = merge_lora(copy.deepcopy(adapted))
        torch.testing.assert_close(_out(merged, x), unmerged, rtol=1e-5, atol=1e-6)
        weights[strength] = merged.conv_after_body.weight.detach()
    torch.testing.assert_close(weights[0.5], (weights[0.0] + weights[1.0]) / 2, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weights[0.5], weights[1.0])


def test_training_moves_the_magnitudes(tmp_path):
    """The magnitudes are trained with the factors, saved in the checkpoint and the adapter, and resumed."""
    from adaptsr.train import TrainConfig, adapt

    torch.manual_seed(0)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    inject_lora(model, preset="esrgan", rank=2, use_dora=True)
    before = {name: layer.lora_magnitude_vector.detach().clone() for name, layer in lora_layers(model)}
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(3, 8, 8, generator=generator), torch.rand(3, 16, 16, generator=generator))
             for _ in range(4)]
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=1, seed=0)
    adapt(model, pairs, tmp_path / "run", config, device="cpu")
    moved = [name for name, layer in lora_layers(model)
             if not torch.equal(layer.lora_magnitude_vector.detach(), before[name])]
    assert moved == list(before)
    saved = load_file(str(tmp_path / "run" / "adapter" / WEIGHTS))
    for name, layer in lora_layers(model):
        torch.testing.assert_close(saved[f"{PREFIX}{name}.lora_magnitude_vector"], layer.lora_magnitude_vector.detach())

    # resuming it as a LoRA run would drop the magnitudes: refused, naming them
    torch.manual_seed(0)
    plain = ESRGAN(num_filters=8, num_blocks=1, scale=2)
    inject_lora(plain, preset="esrgan", rank=2)
    with pytest.raises(ValueError, match=r"it trained \[.*lora_magnitude_vector.*use_dora"):
        adapt(plain, pairs, tmp_path / "run", dataclasses.replace(config, steps=4), device="cpu", resume=True)


# -- the command line --


@pytest.fixture
def cli_setup(tmp_path, photo_run_inputs):
    return tmp_path, *photo_run_inputs()


def test_adapt_use_dora_then_merge_eval_and_combine(cli_setup, capsys):
    tmp_path, hr_dir, checkpoint = cli_setup
    run_dir = tmp_path / "run"
    assert main(["adapt", "--model", str(checkpoint), "--hr", str(hr_dir), "--out", str(run_dir), "--steps", "2",
                 "--batch-size", "2", "--patch", "16", "--rank", "2", "--lr", "1e-2", "--warmup-steps", "0",
                 "--device", "cpu", "--use-dora"]) == 0
    assert json.loads((run_dir / "adapter" / CONFIG).read_text())["use_dora"] is True
    base = adaptsr.load_model(checkpoint)
    load_adapter(base, run_dir / "adapter")
    merged = adaptsr.load_model(run_dir / "model_merged.safetensors")
    x = _image(size=10)
    torch.testing.assert_close(_out(merged, x), _out(base, x), rtol=1e-5, atol=1e-6)

    half = tmp_path / "half.safetensors"
    assert main(["merge", "--model", str(checkpoint), "--adapter", str(run_dir / "adapter"), "--strength", "0.5",
                 "--out", str(half)]) == 0
    set_adapter_strength(base, 0.5)
    torch.testing.assert_close(_out(adaptsr.load_model(half), x), _out(base, x), rtol=1e-5, atol=1e-6)

    capsys.readouterr()
    assert main(["combine", "--model", str(checkpoint), "--adapter", str(run_dir / "adapter"), "--strength", "0.5",
                 "--out", str(tmp_path / "combined")]) == 1
    assert "is a DoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "combined").exists()


def test_bench_names_the_dora_rows():
    from spandrel import ModelLoader

    from adaptsr.bench import bench_training_step

    torch.manual_seed(0)
    descriptor = ModelLoader().load_from_state_dict(ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict())
    rows = bench_training_step(descriptor, backends=["torch"], rank=2, use_dora=True, full_finetune=False,
                               batch_size=1, patch=8, rounds=1, warmup=0)
    assert [row.method for row in rows] == ["frozen", "DoRA"]
    adapted = copy.deepcopy(descriptor.model)
    inject_lora(adapted, preset="esrgan", rank=2)
    lora_params = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    magnitudes = sum(layer.base_layer.weight.shape[0] for _, layer in lora_layers(adapted))
    assert rows[1].trainable_params == lora_params + magnitudes


def test_a_merged_dora_layer_moves_with_its_weight_kept_for_unmerge():
    """merge() keeps W for unmerge() in a buffer, so .to() while merged carries it along."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    inject_lora(model, targets=["0"], rank=2, init_lora_weights=False, use_dora=True)
    layer = model[0]
    weight = layer.base_layer.weight.detach().double().clone()
    layer.merge()
    model.double()
    assert layer._weight_before_merge.dtype == torch.float64  # moved with the module, as a device move would
    layer.unmerge()
    assert layer.base_layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight, rtol=0, atol=0)
    assert "_weight_before_merge" not in layer.state_dict()
