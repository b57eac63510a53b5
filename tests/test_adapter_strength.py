"""Adapter strength: W + strength * s B A, from the API (``set_adapter_strength``) and the CLI (``--strength``)."""

from __future__ import annotations

import copy

import pytest
import torch

import adaptsr
from adaptsr.cli import main


def _adapted(build, preset: str):
    """(base model, the same with a non-zero adapter on the preset's layers)."""
    base = build().eval()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    adaptsr.inject_lora(model, preset=preset, rank=4, init_lora_weights=False)
    return base, model.eval()


def _output(model, x):
    with torch.no_grad():
        return model(x)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize(("arch", "preset"), [("esrgan", "esrgan"), ("swinir", "swinir")])
def test_strength_blends_base_and_adapted(tiny_sr, arch, preset):
    """SwinIR's window attention reads its qkv / proj through the LoRA layers' weight: the strength reaches it too."""
    base, model = _adapted(getattr(tiny_sr, arch), preset)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    base_out, full_out = _output(base, x), _output(model, x)
    assert (full_out - base_out).abs().max() > 1e-3  # the adapter changes the output: the checks below can fail

    adaptsr.set_adapter_strength(model, 0.0)
    torch.testing.assert_close(_output(model, x), base_out, rtol=1e-5, atol=1e-6)

    adaptsr.set_adapter_strength(model, 0.5)
    half_out = _output(model, x)
    assert all(layer.strength == 0.5 and "strength=0.5" in repr(layer) for _, layer in adaptsr.lora_layers(model))
    # merging folds in the scaled update: the merged model is the unmerged one, and its weights lie halfway
    merged = adaptsr.merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(_output(merged, x), half_out, rtol=1e-5, atol=1e-5)
    adaptsr.set_adapter_strength(model, 1.0)
    full = _weights(adaptsr.merge_lora(copy.deepcopy(model)))
    for key, weight in _weights(merged).items():
        torch.testing.assert_close(weight, (base.state_dict()[key] + full[key]) / 2, rtol=1e-5, atol=1e-6)


def test_strength_errors(tiny_sr, tmp_path):
    base, model = _adapted(tiny_sr.esrgan, "esrgan")
    with pytest.raises(ValueError, match="finite"):
        adaptsr.set_adapter_strength(model, float("nan"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        adaptsr.set_adapter_strength(base, 0.5)

    adaptsr.set_adapter_strength(model, 0.5)
    with pytest.raises(ValueError, match=r"strength 0\.5, which an adapter file does not record"):
        adaptsr.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    adaptsr.set_adapter_strength(model, 1)
    adaptsr.save_adapter(model, tmp_path / "adapter")  # as trained: saved

    adaptsr.merge_lora(model, unload=False)
    with pytest.raises(ValueError, match="merged .* unmerge them first"):
        adaptsr.set_adapter_strength(model, 0.5)
    adaptsr.unmerge_lora(model)
    adaptsr.set_adapter_strength(model, 0.5)


@pytest.fixture
def checkpoint_and_adapter(tiny_sr, tmp_path):
    base, model = _adapted(tiny_sr.esrgan, "esrgan")
    adaptsr.save_model(base, tmp_path / "base.safetensors")
    adaptsr.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base.safetensors", tmp_path / "adapter"


def test_merge_command_strength(checkpoint_and_adapter, tmp_path, capsys):
    checkpoint, adapter = checkpoint_and_adapter
    merged = {}
    for strength in ("0", "0.5", "1"):
        out = tmp_path / f"merged-{strength}.safetensors"
        assert main(["merge", "--model", str(checkpoint), "--adapter", str(adapter), "--strength", strength,
                     "--out", str(out)]) == 0
        merged[strength] = _weights(adaptsr.load_model(out).model)
    assert "at strength 0.5" in capsys.readouterr().out
    base = _weights(adaptsr.load_model(checkpoint).model)
    assert any(not torch.equal(merged["1"][k], base[k]) for k in base)
    for key, weight in base.items():
        torch.testing.assert_close(merged["0"][key], weight, rtol=0, atol=0)
        torch.testing.assert_close(merged["0.5"][key], (weight + merged["1"][key]) / 2, rtol=1e-5, atol=1e-6)


def test_strength_flag_errors(checkpoint_and_adapter, tmp_path, capsys):
    checkpoint, adapter = checkpoint_and_adapter
    image = tmp_path / "lr.png"
    from PIL import Image

    Image.new("RGB", (12, 12)).save(image)
    argv = ["upscale", str(image), "--model", str(checkpoint), "--strength", "0.5", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("adaptsr upscale: error: --strength 0.5 scales an adapter: pass --adapter DIR")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as usage:
        main(["merge", "--model", str(checkpoint), "--adapter", str(adapter), "--strength", "inf",
              "--out", str(tmp_path / "m.safetensors")])
    assert usage.value.code == 2 and "'inf' is not a finite number" in capsys.readouterr().err
