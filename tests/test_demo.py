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
