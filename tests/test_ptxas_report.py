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


def test_the_report_counts_tensor_core_instructions():
    """bf16 products compile to tensor-core instructions and IEEE float32 ones do not, so a 16-bit or TF32
    kernel whose dots fell back to FMAs is caught by --check."""
    code = f"""
import sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import ptxas_report as report
cases = report.lora_conv2d_cases()
for group in ("lora fwd linear 180->540 (1x1) nhwc bf16", "lora fwd linear 180->540 (1x1) nhwc fp32 ieee"):
    case = next(c for c in cases if c.autotune_group == group)
    print(report.wants_tensor_cores(case), report.compile_case(case, 80)["tensor_core_ops"])
"""
    result = _run("-c", code)
    if result.returncode != 0:
        pytest.fail(result.stderr[-4000:])
    (bf16_wants, bf16_ops), (ieee_wants, ieee_ops) = [line.split() for line in result.stdout.strip().splitlines()[-2:]]
    assert bf16_wants == "True" and int(bf16_ops) > 0
    assert ieee_wants == "False" and int(ieee_ops) == 0
