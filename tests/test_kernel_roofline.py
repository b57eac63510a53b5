"""benchmarks/gpu/kernel_roofline.py in its CPU smoke mode: the GPU session's script runs end to end
(every timed callable, both forward compositions, the floors) before a GPU is ever spent on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_kernel_roofline_smoke(tmp_path):
    out = tmp_path / "roofline.md"
    # no PYTHONPATH: the script finds the repository's benchmarks package itself, as a user runs it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "kernel_roofline.py"), "--smoke", "--out", str(out)],
                   check=True, env=env, cwd=ROOT)
    report = out.read_text()
    for heading in ("Low-rank gradient pass alone", "Forward alone", "Whole layer fwd+bwd", "Window-attention core"):
        assert heading in report
    # one row per (shape, rank, dtype) in each of the three tables: 2 shapes x 3 tables
    rows = [line for line in report.splitlines() if line.startswith(("| conv3x3", "| linear"))]
    assert len(rows) == 6
    # the attention shape's forward and forward + backward, timed on every backend that runs here
    attention = [line.split(" | ") for line in report.splitlines() if " windows x " in line]
    assert [cells[2] for cells in attention] == ["forward", "forward + backward"]
    for cells in attention:
        reference, torch_ms, triton_ms, cuda_ms, floor = (cells[i] for i in range(3, 8))
        assert all(float(ms) > 0 for ms in (reference, torch_ms, triton_ms, floor)) and cuda_ms == "n/a"
    assert "nan" not in report.lower()
