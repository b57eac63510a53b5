#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU: the CUDA extension build, the GPU tests (the "cuda"
# backend's included), the kernel benchmarks, and one markdown results file.
#
#   benchmarks/gpu/run.sh RESULTS.md
#
# Writes RESULTS.md (GPU name, torch/triton versions, date, test summary, benchmark tables, the
# measured "auto" choice per op) and keeps the raw logs and JSON in RAW_DIR (default RESULTS.md.d/)
# plus one archive of them, RESULTS.md.raw.tgz. RESULTS.md and the archive are rewritten after
# every stage, so a call cut off at its time limit still leaves what the finished stages measured.
# Exit status: non-zero when a GPU test failed.
#
# Made for a lease of minutes (the workplace's device tool: 15 minutes of device time a session,
# 10 a command, 8 files back). The defaults fit one call of under ten minutes:
#   - BUDGET_S (default 540): the whole run's wall-clock budget in seconds; each stage gets what is
#     left (less 15 s to write the results); a stage with less than MIN_STAGE_S (default 45) left
#     does not start, and says so; 0: no budget.
#   - STAGES (default "build tests roofline model bench", run in that order; "ptxas" also exists,
#     which CI already runs for sm_90 on the CPU). "model" is `adaptsr bench` on the bundled SwinIR:
#     the whole training step per backend, as a user would time it, and "auto" autotuned
#     (ADAPTSR_AUTOTUNE=1; MODEL_ARGS: its flags, default "--batch-size 16 --patch 48 --rounds 10"). "profile" (not in the default) is
#     benchmarks/gpu/profile_layer.py: the kernels a conv, linear and attention step spend their time
#     in, per backend (PROFILE_ARGS: its flags), for the call after a missed target.
#   - TEST_PATHS (default: the test files that exercise the GPU: tests/ops, the extension's tests,
#     the backend table, autotuning's races, the training loop on the GPU; the rest of tests/ is CPU-only and runs in
#     CI); TEST_PATHS=tests for all.
#     TEST_WORKERS (default 4 where pytest-xdist is installed): test processes, which compile the
#     Triton kernels in parallel. TEST_ARGS: more pytest arguments. TESTS_MAX_S (default 240): the
#     tests' share of the budget at most, so that the measurements after them still run.
#   - BENCH_ARGS (default '-k "bf16 and not r4 and not r16"': the issues' targets are bf16, rank 8;
#     BENCH_ARGS='' runs every case, about 180, which needs more than one call). The benchmark files
#     run in the order of BENCH_FIRST (default: the LoRA layers, then the window-attention core),
#     then the others alphabetically (the bundled SwinIR, the spandrel modules whose attention
#     adaptsr switches), so a cut-off call has measured what the issues' targets need first.
#   - ROOFLINE_ARGS (default '--dtypes bf16 --ranks 8').
#   - ADAPTSR_AOT=1 builds adaptsr._C ahead of time in place with setup.py (for ADAPTSR_CUDA_ARCHS)
#     instead of the default just-in-time build for the visible GPU.
# Packages the machine lacks (spandrel, kornia) are installed from .whl/ at the repository root
# when it holds wheels: benchmarks/gpu/fetch_wheels.sh fetches them on a machine with PyPI.
#
# With the device tool: carry [".whl"], timeout_s 600, and
#   RAW_DIR=/tmp/gpu-raw benchmarks/gpu/run.sh $OUT/gpu.md
# (RAW_DIR outside $OUT: the archive brings the logs back as one file).
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh RESULTS.md}
out=$(realpath -m "$out")
cd "$(dirname "$0")/../.."
raw=$(realpath -m "${RAW_DIR:-$out.d}")
mkdir -p "$raw" "$(dirname "$out")"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
stages=" ${STAGES:-build tests roofline model bench} "
budget=${BUDGET_S:-540}
reserve=15
min_stage=${MIN_STAGE_S:-45}
start=$(date +%s)
tests_rc=0

run_stage() { [[ "$stages" == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - start )); }
# Seconds a stage may still take (a large number without a budget).
remaining() { if [ "$budget" -le 0 ]; then echo 86400; else echo $(( budget - reserve - $(elapsed) )); fi; }
# within STAGE CMD...: CMD under `timeout` for the time left (SIGINT first, so pytest still
# reports and writes its JSON), or a line on stderr (the stage's log) saying why it did not start.
within() {
    local name=$1 left
    shift
    left=$(remaining)
    if [ "$left" -lt "$min_stage" ]; then
        echo "stage $name not started: ${left} s left of BUDGET_S=$budget (MIN_STAGE_S=$min_stage)" >&2
        return 124
    fi
    if [ "$name" = tests ] && [ "$left" -gt "${TESTS_MAX_S:-240}" ]; then left=${TESTS_MAX_S:-240}; fi
    echo "stage $name: up to ${left} s (at $(elapsed) s)" >&2
    timeout --signal=INT --kill-after=10 "$left" "$@"
}

# -- packages the machine lacks, from the wheels carried in .whl/ --
if compgen -G ".whl/*.whl" > /dev/null; then
    site=/tmp/adaptsr-gpu-site
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "benchmarks/gpu/run.sh: installing .whl/*.whl failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu/run.sh: no CUDA GPU visible to torch" >&2
    exit 2
fi
if ! $py -c "import adaptsr" 2> "$raw/import.log"; then
    echo "benchmarks/gpu/run.sh: adaptsr does not import (missing packages? see benchmarks/gpu/fetch_wheels.sh):" >&2
    cat "$raw/import.log" >&2
    exit 2
fi

section() {  # a results file's part, or why it is missing
    if [ -s "$1" ]; then cat "$1"
    elif [ -f "$2" ]; then echo '```'; tail -n 5 "$2"; echo '```'
    else echo "(not run: STAGES=\"$(echo $stages)\")"; fi
}

write_results() {
    {
        echo "# GPU results: $($py -c 'import torch; print(torch.cuda.get_device_name())')"
        echo
        echo "Date: $(date -u +%Y-%m-%d). torch $($py -c 'import torch; print(torch.__version__)'),"
        echo "triton $($py -c 'import triton; print(triton.__version__)'), CUDA $($py -c 'import torch; print(torch.version.cuda)')."
        echo "Run: STAGES=\"${stages# }\" BUDGET_S=$budget TEST_PATHS=\"${TEST_PATHS:-default}\""
        echo "BENCH_ARGS='${BENCH_ARGS-default}' ROOFLINE_ARGS='${ROOFLINE_ARGS:-default}'; $(elapsed) s so far."
        echo
        echo "## CUDA extension build"
        echo
        echo '```'
        if [ -f "$raw/build.log" ]; then tail -n 3 "$raw/build.log"; else echo "(not run)"; fi
        echo '```'
        echo
        echo "## Tests"
        echo
        echo '```'
        if [ -f "$raw/tests.log" ]; then grep -E "^(FAILED|ERROR)" "$raw/tests.log" | head -n 30; tail -n 4 "$raw/tests.log"
        else echo "(not run)"; fi
        echo '```'
        echo
        echo "## Kernel floors and layer timings"
        echo
        section "$raw/roofline.md" "$raw/roofline.log"
        echo
        echo "## The bundled SwinIR's training step per backend (adaptsr bench)"
        echo
        section "$raw/model.md" "$raw/model.log"
        echo
        echo "## pytest-benchmark providers"
        echo
        section "$raw/bench.md" "$raw/bench.log"
        echo
        echo "## \"auto\" per op (benchmarks/gpu/auto_choice.py; copy the dict into adaptsr/backend.py)"
        echo
        section "$raw/auto.md" "$raw/bench.log"
        if run_stage profile; then
            echo
            echo "## Kernel time per op and backend (benchmarks/gpu/profile_layer.py)"
            echo
            section "$raw/profile.md" "$raw/profile.log"
        fi
        if run_stage ptxas; then
            echo
            echo "## Triton kernels: registers and spills (benchmarks/gpu/ptxas_report.py)"
            echo
            section "$raw/ptxas.md" "$raw/ptxas.log"
        fi
    } > "$out.tmp" && mv "$out.tmp" "$out"
    tar czf "$out.raw.tgz.tmp" -C "$raw" . && mv "$out.raw.tgz.tmp" "$out.raw.tgz"
    echo "wrote $out at $(elapsed) s"
}

# 1. CUDA extension adaptsr._C, built before the tests so that the "cuda" backend's tests and
#    benchmarks run (a failed build shows in the log and fails tests/test_cuda_extension.py).
#    Default: the just-in-time path the package itself uses (adaptsr/_cuda.py; cached in
#    ~/.cache/adaptsr or $ADAPTSR_BUILD_DIR), for the visible GPU's architecture.
if run_stage build; then
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ "${ADAPTSR_AOT:-0}" = 1 ]; then
        within build env ADAPTSR_FORCE_CUDA_BUILD=1 $py setup.py build_ext --inplace 2>&1 | tee "$raw/build.log"
    else
        within build $py -c "from adaptsr import _cuda; m = _cuda.load(verbose=True); print('adaptsr._C ready:', m.__file__)" \
            2>&1 | tee "$raw/build.log"
    fi
    echo "build exit status ${PIPESTATUS[0]} after $(elapsed) s" | tee -a "$raw/build.log"
    write_results
fi

# 2. Tests on the GPU at full size (Triton compiled, not interpreted; the "cuda" backend).
if run_stage tests; then
    eval "set -- ${TEST_PATHS:-tests/ops tests/test_cuda_extension.py tests/test_backend.py tests/test_autotune.py tests/test_train.py::test_adapt_on_a_gpu}"
    workers=()
    if $py -c "import xdist" 2> /dev/null && [ "${TEST_WORKERS:-4}" -gt 1 ]; then workers=(-n "${TEST_WORKERS:-4}"); fi
    within tests $py -m pytest "$@" -q -p no:cacheprovider "${workers[@]}" ${TEST_ARGS:-} 2>&1 | tee "$raw/tests.log"
    tests_rc=${PIPESTATUS[0]}
    write_results
fi

# 3. Kernel floors: each kernel alone against bytes / bandwidth and FLOPs / rate (before the
#    benchmarks: it takes about a minute, and it decides the kernels' design).
if run_stage roofline; then
    eval "set -- ${ROOFLINE_ARGS:---dtypes bf16 --ranks 8}"
    within roofline $py benchmarks/gpu/kernel_roofline.py --out "$raw/roofline.md" "$@" 2>&1 | tee "$raw/roofline.log"
    write_results
fi

# 4. A whole model's training step (forward, loss, backward, AdamW) for frozen, full fine-tuning and
#    LoRA on every backend that runs here: adaptsr bench on the bundled SwinIR, a minute at most.
if run_stage model; then
    eval "set -- ${MODEL_ARGS:---batch-size 16 --patch 48 --rounds 10}"
    # with autotuning on, an "auto" row too: the backends auto's trials pick per op, listed under the table;
    # the choices' cache file goes with the raw logs (fresh each run, so the trials are measured here)
    within model env ADAPTSR_AUTOTUNE=1 ADAPTSR_AUTOTUNE_CACHE="$raw/autotune-cache.json" $py -m adaptsr bench --model swinir --device cuda --json "$raw/model.json" "$@" \
        > "$raw/model.md" 2> "$raw/model.log"
    write_results
fi

# 5. Benchmarks: pytest-benchmark providers at the GPU shapes, and the "auto" choice they imply.
if run_stage bench; then
    eval "set -- ${BENCH_ARGS-"-k \"bf16 and not r4 and not r16\""}"
    first=${BENCH_FIRST:-"benchmarks/test_bench_lora_conv2d.py benchmarks/test_bench_lora_linear.py benchmarks/test_bench_window_attention.py"}
    bench_files=($first)
    for f in benchmarks/test_bench_*.py; do
        case " $first " in *" $f "*) ;; *) bench_files+=("$f") ;; esac
    done
    within bench $py -m pytest "${bench_files[@]}" -q -p no:cacheprovider --benchmark-only "$@" \
        --benchmark-json="$raw/bench.json" 2>&1 | tee "$raw/bench.log"
    if [ -s "$raw/bench.json" ]; then
        $py benchmarks/to_markdown.py "$raw/bench.json" > "$raw/bench.md" 2>&1
        $py benchmarks/gpu/auto_choice.py "$raw/bench.json" > "$raw/auto.md" 2>&1
    fi
    write_results
fi

# 6. Kernel time per op and backend (torch.profiler), where a target was missed.
if run_stage profile; then
    eval "set -- ${PROFILE_ARGS:-}"
    within profile $py benchmarks/gpu/profile_layer.py "$@" > "$raw/profile.txt" 2> "$raw/profile.log"
    if [ -s "$raw/profile.txt" ]; then { echo '```'; cat "$raw/profile.txt"; echo '```'; } > "$raw/profile.md"; fi
    write_results
fi

# 7. Register spills and shared memory of every Triton kernel for this card's architecture.
if run_stage ptxas; then
    arch=$($py -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
    within ptxas $py benchmarks/gpu/ptxas_report.py --archs "$arch" > "$raw/ptxas.md" 2> "$raw/ptxas.log"
    write_results
fi

write_results
exit "$tests_rc"
