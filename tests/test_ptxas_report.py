"""The Triton kernels compile for real GPUs without register spills: benchmarks/gpu/ptxas_report.py
compiles them here, on the CPU, for sm_90 with Triton's bundled ptxas (no GPU or driver needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "ptxas_report.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in the repository, compiling for real targets (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_every_kernel_compiles_for_sm90_without_spills():
    result = _run(str(SCRIPT), "--check", "--archs", "90")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for prefix, least in (("| lora", 30), ("| window", 40)):
        rows = [line for line in lines if line.startswith(prefix)]
        assert len(rows) >= least and all(line.endswith(("| ok |", "| ok (minor spill) |")) for line in rows), prefix


def test_the_report_sees_spills():
    """A tile known to spill (fp32, 128 x 128 x 64 at 8 warps) is reported, so a clean report means something."""
    code = f"""
import sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import ptxas_report as report
case = next(c for c in report.lora_conv2d_cases() if c.autotune_group == "lora fwd conv3x3 180ch 64x64 nhwc fp32 ieee")
case.constexprs.update(BLOCK_M=128, BLOCK_N=128, BLOCK_C=64)
case.num_warps, case.num_stages = 8, 3
print(report.compile_case(case, 90)["spill_bytes"])
"""
    result = _run("-c", code)
    if result.returncode != 0:
        pytest.fail(result.stderr[-4000:])
    assert int(result.stdout.strip().splitlines()[-1]) > 0
