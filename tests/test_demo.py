"""`adaptsr demo` end to end in its reduced mode."""

from __future__ import annotations

import pytest

from adaptsr.cli import main
from adaptsr.demo import run_demo


@pytest.mark.parametrize("model", ["swinir", "rrdb"])
def test_demo_quick(model, tmp_path, capsys):
    result = run_demo(model=model, out=tmp_path, quick=True, device="cpu")
    output = capsys.readouterr().out
    assert "bundled model" in output and "LoRA r=8, merged" in output
    for key in ("bicubic", "base", "adapted"):
        assert 0 < result[key]["psnr"] < 100 and 0 < result[key]["ssim"] <= 1
    assert result["gain_db"] == pytest.approx(result["adapted"]["psnr"] - result["base"]["psnr"])
    assert 0 < result["trainable_share"] < 1
    run = tmp_path / "run"
    for name in ("adapter/adapter_model.safetensors", "model_merged.safetensors", "comparison.png", "curves.png"):
        assert (run / name).is_file(), name


def test_demo_unknown_model(tmp_path, capsys):
    assert main(["demo", "--model", "edsr", "--quick", "--out", str(tmp_path)]) == 1
    assert "no bundled model 'edsr'" in capsys.readouterr().err


def test_demo_takes_a_degradation_file(tmp_path, capsys):
    """A camera file reaches the degradation: a clean, sharp camera leaves the bundled model (trained on bicubic
    downscaling) close to its bicubic-degradation scores, and the named file appears in the report."""
    import json

    camera = tmp_path / "clean.json"
    camera.write_text(json.dumps({"camera_profile": {"blur_sigma": 0.1, "noise": 0, "jpeg_quality": 100}}))
    clean = run_demo(profile=str(camera), out=tmp_path / "clean", quick=True, device="cpu", steps=1)
    assert f"camera profile '{camera}'" in capsys.readouterr().out
    noisy = run_demo(profile="lowlight", out=tmp_path / "noisy", quick=True, device="cpu", steps=1)
    assert clean["base"]["psnr"] > noisy["base"]["psnr"] + 1  # 26.3 against 24.5 dB on the quick crops
    assert main(["demo", "--profile", str(tmp_path / "missing.json"), "--quick", "--out", str(tmp_path / "x")]) == 1
    assert "is neither a preset" in capsys.readouterr().err


def test_demo_trains_dora_adapters(tmp_path, capsys):
    import json

    assert main(["demo", "--use-dora", "--quick", "--steps", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "DoRA r=8, merged" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize(("flags", "lr", "ratio"),
                         [([], 1e-3, 16.0), (["--lr", "2e-3", "--lora-plus-ratio", "1"], 2e-3, 1.0)])
def test_demo_trains_with_lora_plus_unless_told_otherwise(tmp_path, capsys, flags, lr, ratio):
    """The demo's recipe is LoRA+ (lora_B at 16x a base rate of 1e-3); the flags give plain LoRA back."""
    import json

    import torch

    assert main(["demo", "--quick", "--steps", "1", "--out", str(tmp_path), "--device", "cpu", *flags]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["lr"], config["lora_plus_ratio"]) == (lr, ratio)
    optimizer = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["optimizer"]
    assert [group["initial_lr"] for group in optimizer["param_groups"]] == ([lr, lr * ratio] if ratio != 1 else [lr])
    assert f"lr {lr:g}" in capsys.readouterr().out
