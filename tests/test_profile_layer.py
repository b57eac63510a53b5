"""benchmarks/gpu/profile_layer.py in its CPU smoke mode: every op's table, frozen and LoRA, runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_profile_layer_smoke():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "profile_layer.py"), "--smoke"],
                          check=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    headers = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert headers == [
        "== conv: frozen, 5 steps of forward + backward, float32",
        "== conv: LoRA, backend torch, 5 steps of forward + backward, float32",
        "== linear: frozen, 5 steps of forward + backward, float32",
        "== linear: LoRA, backend torch, 5 steps of forward + backward, float32",
        "== attention: backend torch, 5 steps of forward + backward, float32",
    ]
    # each table names the op that did the work: the LoRA rows run adaptsr's autograd Functions
    assert "_LoRAConv2dFunction" in proc.stdout and "_LoRALinearFunction" in proc.stdout
