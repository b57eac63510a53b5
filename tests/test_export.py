"""ONNX export (adaptsr.export, `adaptsr export`): ONNX Runtime runs the file at sizes the export never saw and
gives the adapted model's output; a graph with a size traced in, or wrong outputs, is refused and nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spandrel import ModelLoader

import adaptsr
from adaptsr.cli import main
from adaptsr.export import export_onnx

onnxruntime = pytest.importorskip("onnxruntime")


def _descriptor(module):
    return ModelLoader().load_from_state_dict(module.state_dict()).eval()


def _run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.fixture(scope="module")
def adapted_esrgan(tiny_sr):
    model = _descriptor(tiny_sr.esrgan())
    torch.manual_seed(0)
    adaptsr.inject_lora(model, preset="esrgan", rank=2, init_lora_weights=False)
    return model


def test_dynamic_export_runs_any_size_with_the_adapters_merged(adapted_esrgan, tiny_sr, tmp_path):
    path = tmp_path / "esrgan.onnx"
    report = export_onnx(adapted_esrgan, path)
    assert report["dynamic"] and [c[:3] for c in report["checked"]] == [(1, 32, 32), (2, 40, 48)]
    assert all(c[3] < 1e-5 for c in report["checked"])
    x = torch.rand(3, 3, 13, 21)  # a batch and sizes the export never saw
    with torch.no_grad():
        expected = adapted_esrgan.model(x)
        base = _descriptor(tiny_sr.esrgan()).model(x)
    got = _run_onnx(path, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapters are in it
    assert any(True for _ in adaptsr.lora_layers(adapted_esrgan.model))  # the model passed in keeps its adapters


def test_a_size_traced_in_is_refused_and_a_fixed_size_works(tiny_sr, tmp_path):
    """spandrel's SwinIR builds its shifted-window mask from the image size: the dynamic export holds the example's
    size, which the check on a second size finds; --size exports that one size, checked."""
    swinir = _descriptor(tiny_sr.swinir(embed_dim=12, depths=[1], mlp_ratio=1.0))
    path = tmp_path / "swinir.onnx"
    with pytest.raises(ValueError, match=r"2x3x40x48 input.*export one input size with size=\(h, w\)"):
        export_onnx(swinir, path)
    assert not path.exists()
    with pytest.raises(ValueError, match="SwinIR does not run in float16: spandrel marks it unsupported"):
        export_onnx(swinir, path, size=(24, 40), half=True)
    report = export_onnx(swinir, path, size=(24, 40))
    assert not report["dynamic"] and [c[:3] for c in report["checked"]] == [(1, 24, 40)]
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(path, x), swinir.model(x), rtol=0, atol=1e-4)


def test_a_model_that_writes_into_its_input(tiny_sr, tmp_path):
    """spandrel's RCAN subtracts the mean from its input in place: the export's check compares with the model's
    output on a copy (comparing after the write made the difference 116)."""
    rcan = _descriptor(tiny_sr.rcan())
    export_onnx(rcan, tmp_path / "rcan.onnx", size=(16, 24))
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = rcan.model(x.clone())
    torch.testing.assert_close(_run_onnx(tmp_path / "rcan.onnx", x), expected, rtol=0, atol=1e-4)


def test_wrong_outputs_and_bad_arguments_are_refused(adapted_esrgan, tmp_path, monkeypatch):
    from adaptsr import export

    real = export._onnx_outputs
    monkeypatch.setattr(export, "_onnx_outputs", lambda path, x: real(path, x) + np.float32(0.01))
    path = tmp_path / "off.onnx"
    with pytest.raises(ValueError, match=r"differs from the model's by 0.01 on a 1x3x32x32 input"):
        export_onnx(adapted_esrgan, path, size=(32, 32))
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="use a .onnx file name"):
        export_onnx(adapted_esrgan, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="size 20x20 does not suit the model: sides of at least 16 pixels, multiples of 8"):
        export._check_size((20, 20), minimum=16, multiple=8)


def test_float16_export(adapted_esrgan, tiny_sr, tmp_path):
    """half=True: a float16 graph, input and output, at any size, within float16's rounding of the float32 model."""
    path = tmp_path / "esrgan16.onnx"
    report = export_onnx(adapted_esrgan, path, half=True)
    assert report["dtype"] == "float16" and report["dynamic"]
    assert all(0 < c[3] <= 1e-2 for c in report["checked"])  # rounded, unlike the float32 graph's 1e-5
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float16)"]
    x = torch.rand(2, 3, 17, 11)
    got = session.run(None, {"input": x.half().numpy()})[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        expected = adapted_esrgan.model(x)
        base = _descriptor(tiny_sr.esrgan()).model(x)
    got = torch.from_numpy(got).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)
    # the adapters are in it: the graph is far nearer the adapted model than the base
    assert (got - expected).abs().mean() < 0.1 * (got - base).abs().mean()
    export_onnx(adapted_esrgan, tmp_path / "esrgan32.onnx", size=(32, 32))
    assert path.stat().st_size < 0.6 * (tmp_path / "esrgan32.onnx").stat().st_size  # two bytes a weight, not four


def test_float16_overflow_is_refused(tmp_path):
    """A model whose activations leave float16's range (65,504) gives inf in float16: refused, nothing written;
    the float32 export of the same model is fine."""

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1))
    with torch.no_grad():  # (plain layers: the exporter's child process unpickles the model)
        model[0].bias.add_(300)  # about 300 everywhere
        model[1].weight.fill_(100)  # 3 x 300 x 100 = 90,000: inf in float16
        model[2].weight.fill_(1 / 270_000)  # back to about 1 in float32
    path = tmp_path / "squares.onnx"
    with pytest.raises(ValueError, match=r"in float16 the model's output differs .* on a 1x3x8x8 input .*"
                                         r"leaves float16's range"):
        export_onnx(model, path, size=(8, 8), half=True)
    assert not path.exists()
    assert export_onnx(model, path, size=(8, 8))["checked"][0][3] < 1e-3


def test_export_command(tmp_path, capsys, tiny_sr):
    base = tmp_path / "base.safetensors"
    model = _descriptor(tiny_sr.esrgan())
    adaptsr.save_model(model, base)
    adaptsr.inject_lora(model, preset="esrgan", rank=2, init_lora_weights=False)
    adaptsr.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "adapted.onnx"
    assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--size", "32x24"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: ESRGAN x" in printed and "float32, fixed input 1x32x24" in printed and "1x32x24 (" in printed
    x = torch.rand(1, 3, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(out, x), model.model(x), rtol=0, atol=1e-5)
    half = tmp_path / "adapted16.onnx"
    assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(half),
                 "--size", "32x24", "--fp16"]) == 0
    assert "float16, fixed input 1x32x24" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(half), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.half().numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got).float(), model.model(x).detach(), rtol=0, atol=1e-2)
    for size in ("0x5", "big"):
        with pytest.raises(SystemExit):
            main(["export", "--model", str(base), "--out", str(tmp_path / "x.onnx"), "--size", size])
        assert "is not a size HxW" in capsys.readouterr().err
    assert main(["export", "--model", str(base), "--out", str(tmp_path / "x.txt")]) == 1
    assert "use a .onnx file name" in capsys.readouterr().err


def test_the_architecture_survey_script(tmp_path):
    """benchmarks/onnx_export_survey.py on RRDB (exported both ways; the refusals' wording is tested above), its
    rows in the JSON and the table; a refusal's reason is cut in the table only."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "onnx_export_survey.py"
    spec = importlib.util.spec_from_file_location("onnx_export_survey", script)
    survey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(survey)
    out = tmp_path / "survey"
    subprocess.run([sys.executable, str(script), "--only", "esrgan", "--out", str(out)], check=True,
                   capture_output=True, timeout=600)
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["name"] == "esrgan" and row["dynamic"]["ok"] and row["fixed"]["ok"] and row["float16"]["ok"]
    assert row["dynamic"]["max_difference"] < 1e-4 < row["float16"]["max_difference"] < 1e-2
    assert "| esrgan | ESRGAN | yes (" in out.with_suffix(".md").read_text()
    refused = {**row, "dynamic": {"ok": False, "reason": "a | b " + "x" * 300, "seconds": 1.0}, "float16": None}
    table = survey.to_markdown([row, refused])
    assert "no: a / b xxx" in table and "x" * 200 not in table and table.count("...") == 1
    assert table.splitlines()[-3].endswith(" | - |")  # the refused row: no float16 attempt
    assert "1 of 2 export with dynamic sizes, 2 of 2 at a fixed size, 1 of 2 in float16" in table
