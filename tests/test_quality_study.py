"""benchmarks/quality_study.py end to end in its quick mode: each method trains in its own process,
is scored, and lands in the JSON and the markdown table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STUDY = Path(__file__).parents[1] / "benchmarks" / "quality_study.py"


def test_quality_study_quick(tmp_path):
    out = tmp_path / "study"
    subprocess.run([sys.executable, str(STUDY), "--quick", "--models", "swinir", "--presets", "lowlight",
                    "--methods", "base,lora4,lora4+,peft8", "--out", str(out)], check=True)
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    by_method = {r["method"]: r for r in results}
    assert list(by_method) == ["base", "lora4", "lora4+", "peft8"]
    assert by_method["base"]["trainable_params"] == 0
    # PEFT adapts exactly the layers adaptsr does, so rank 8 trains twice rank 4's parameters
    assert by_method["peft8"]["trainable_params"] == 2 * by_method["lora4"]["trainable_params"] > 0
    for r in results:
        assert 10 < r["psnr"] < 60 and 0 < r["ssim"] <= 1
    # LoRA+ trains the same adapters, at its own rates
    assert by_method["lora4+"]["trainable_params"] == by_method["lora4"]["trainable_params"]
    assert (by_method["lora4"]["lora_plus_ratio"], by_method["lora4+"]["lora_plus_ratio"]) == (1.0, 16.0)
    assert by_method["lora4+"]["lr"] < by_method["lora4"]["lr"]
    for r in (by_method["lora4"], by_method["lora4+"], by_method["peft8"]):
        assert r["step_ms"] > 0 and r["peak_mb"] >= 0 and r["final_loss"] > 0
    (timing,) = json.loads(out.with_suffix(".json").read_text())["timing"]
    assert timing["model"] == "swinir" and set(timing["step_ms"]) == {"lora8", "peft8", "full@0.0002"}
    assert all(ms > 0 for ms in timing["step_ms"].values())
    table = out.with_suffix(".md").read_text()
    assert "## swinir, profile `lowlight`" in table and "| peft8 |" in table
    assert "## Step time, interleaved" in table


def test_quality_study_failing_method_exits_nonzero(tmp_path):
    completed = subprocess.run([sys.executable, str(STUDY), "--quick", "--models", "edsr", "--presets", "lowlight",
                                "--methods", "base", "--out", str(tmp_path / "s")],
                               check=False, capture_output=True, text=True)
    assert completed.returncode != 0
    assert "no bundled model 'edsr'" in completed.stderr
