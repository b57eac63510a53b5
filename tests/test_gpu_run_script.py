"""benchmarks/gpu/run.sh's control flow on the CPU: stages, the time budget, the results file.

A GPU lease is minutes long, so the script must not be first run there. Here it runs with
``PYTHON`` pointing at a stand-in interpreter (a shell script) that claims a GPU, answers the
version queries, and plays pytest and kernel_roofline.py: passing or failing tests, a benchmark
stage that outlasts the budget. What the stand-in cannot show (the real tests, builds and timings)
is the GPU session's to see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# $FAKE_TESTS_RC: the tests' exit status; $FAKE_TESTS_SLEEP, $FAKE_BENCH_SLEEP: seconds the tests and the
# benchmarks take.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
case "$*" in
  *cuda.is_available*) exit 0 ;;
  "-m pip install"*) exit 0 ;;  # wheels from .whl/, where a developer fetched some
  *"import adaptsr"*) exit 0 ;;
  *"import xdist"*) exit 1 ;;
  *get_device_name*) echo "Fake GPU 80GB" ;;
  *"_cuda.load"*) echo "adaptsr._C ready: /fake/adaptsr_C.so" ;;
  *"import torch; print"*|*"import triton; print"*) echo "0.0-fake" ;;
  "-m pytest benchmarks/"*)
    json=$(printf '%s\n' "$@" | sed -n 's/^--benchmark-json=//p')
    sleep "${FAKE_BENCH_SLEEP:-0}" &
    trap 'kill $!; echo "1 passed, interrupted"; echo "{\"benchmarks\": []}" > "$json"; exit 2' INT
    wait
    echo '{"benchmarks": []}' > "$json"; echo "3 passed" ;;
  "-m pytest"*)
    sleep "${FAKE_TESTS_SLEEP:-0}" &
    trap 'kill $!; echo "3 passed, interrupted"; exit 2' INT
    wait
    echo "tests run: $*"; echo "7 passed"; exit "${FAKE_TESTS_RC:-0}" ;;
  *get_device_capability*) echo 90 ;;
  "-m adaptsr bench"*) echo "| adaptsr bench table $* |" ;;
  *ptxas_report.py*) echo "| ptxas table |" ;;
  *profile_layer.py*) echo "== conv: frozen $*" ;;
  *to_markdown.py*) echo "| benchmark table |" ;;
  *auto_choice.py*) echo "AUTO_ON_CUDA = {}" ;;
  *kernel_roofline.py*)
    out=$(printf '%s\n' "$@" | sed -n '/^--out$/{n;p}')
    echo "| roofline table $* |" > "$out" ;;
  *) echo "fake python: unexpected call: $*" >&2; exit 3 ;;
esac
"""


def _run(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    results = tmp_path / "out" / "gpu.md"
    full_env = {**os.environ, "PYTHON": str(fake), "FAKE_CALLS": str(tmp_path / "calls"),
                "RAW_DIR": str(tmp_path / "raw"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(results)], env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc, results


pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tar") is None,
                                reason="run.sh needs coreutils' timeout and tar")


def test_every_stage_lands_in_the_results_file(tmp_path):
    proc, results = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert text.startswith("# GPU results: Fake GPU 80GB")
    assert "adaptsr._C ready" in text and "7 passed" in text
    assert "| roofline table" in text and "--dtypes bf16 --ranks 8 |" in text
    assert "| benchmark table |" in text and "AUTO_ON_CUDA = {}" in text
    # the bundled model's whole step on the GPU, with the default flags
    assert "| adaptsr bench table -m adaptsr bench --model swinir --device cuda" in text
    assert "--batch-size 16 --patch 48 --rounds 10 |" in text
    calls = (tmp_path / "calls").read_text()
    # the default test selection and benchmark filter of the lease
    assert "-m pytest tests/ops tests/test_cuda_extension.py tests/test_backend.py tests/test_autotune.py tests/test_train.py::test_adapt_on_a_gpu" in calls
    assert "-k bf16 and not r4 and not r16" in calls
    # the benchmark files: the LoRA layers and the window-attention core first, then every other one once
    bench_call = next(line for line in calls.splitlines() if line.startswith("-m pytest benchmarks/"))
    files = [arg for arg in bench_call.split() if arg.startswith("benchmarks/")]
    assert files[:3] == ["benchmarks/test_bench_lora_conv2d.py", "benchmarks/test_bench_lora_linear.py",
                         "benchmarks/test_bench_window_attention.py"]
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("test_bench_*.py"))
    with tarfile.open(f"{results}.raw.tgz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"build.log", "tests.log", "bench.json", "bench.md", "auto.md", "roofline.md", "model.md"} <= names


def test_a_failed_test_fails_the_run_and_the_rest_still_runs(tmp_path):
    proc, results = _run(tmp_path, FAKE_TESTS_RC="1")
    assert proc.returncode == 1
    assert "| roofline table" in results.read_text()


def test_the_budget_cuts_a_long_stage_and_skips_the_rest(tmp_path):
    # 15 s are kept back for the results: a 32 s budget leaves the benchmarks about 17 s of their 60
    start = time.monotonic()
    proc, results = _run(tmp_path, BUDGET_S="32", MIN_STAGE_S="5", FAKE_BENCH_SLEEP="60",
                         STAGES="tests roofline bench ptxas")
    assert time.monotonic() - start < 45, "the budget did not stop the benchmarks"
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert "7 passed" in text and "roofline table" in text  # the stages before the long one
    assert "stage ptxas not started" in text  # the results say why
    assert "ptxas table" not in text
    assert "(not run" in text  # the build was not asked for
    # the interrupted benchmarks still reported (pytest writes its JSON on SIGINT)
    assert "| benchmark table |" in text


def test_tests_get_their_share_and_the_measurements_still_run(tmp_path):
    start = time.monotonic()
    proc, results = _run(tmp_path, TESTS_MAX_S="3", FAKE_TESTS_SLEEP="60", STAGES="tests roofline")
    assert time.monotonic() - start < 30, "TESTS_MAX_S did not stop the tests"
    assert proc.returncode != 0, "tests cut short must fail the run"
    text = results.read_text()
    assert "3 passed, interrupted" in text and "roofline table" in text


def test_the_profile_stage_on_request(tmp_path):
    proc, results = _run(tmp_path, STAGES="profile", PROFILE_ARGS="--ops conv")
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert "## Kernel time per op and backend" in text and "profile_layer.py --ops conv" in text
    proc, results = _run(tmp_path, STAGES="roofline")
    assert "Kernel time per op" not in results.read_text()  # not a default stage


def test_stages_select_what_runs(tmp_path):
    proc, results = _run(tmp_path, STAGES="roofline", ROOFLINE_ARGS="--dtypes fp32")
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text()
    assert "-m pytest" not in calls and "_cuda.load" not in calls
    assert "--dtypes fp32 |" in results.read_text()
