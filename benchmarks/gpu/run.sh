#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU: the CUDA extension build, GPU tests (the "cuda"
# backend's included), the kernel benchmarks, and one markdown results file.
#
#   benchmarks/gpu/run.sh RESULTS.md
#
# Writes RESULTS.md (GPU name, torch/triton versions, date, test summary, benchmark tables, the
# measured "auto" choice per op, the Triton kernels' register report)
# and keeps the raw logs and JSON next to it (RESULTS.md.d/). Exit status: non-zero when a
# GPU test failed. Environment knobs: BENCH_ARGS (extra pytest arguments for the benchmarks,
# e.g. BENCH_ARGS='-k bf16' for a shorter run), TEST_ARGS (the same for the tests),
# ROOFLINE_ARGS (e.g. '--dtypes bf16'), ADAPTSR_AOT=1 (build adaptsr._C ahead of time in place with
# setup.py, for ADAPTSR_CUDA_ARCHS, instead of the default just-in-time build for the visible GPU),
# STAGES (which of "build tests bench roofline ptxas" to run, default all: a machine that allows
# ten minutes per command runs them in several calls, e.g. STAGES="build tests" then
# STAGES="build bench"; each call's RESULTS.md holds the stages it ran, "(not run)" for the others).
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh RESULTS.md}
cd "$(dirname "$0")/../.."
raw="$out.d"
mkdir -p "$raw"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
stages=" ${STAGES:-build tests bench roofline ptxas} "
run_stage() { [[ "$stages" == *" $1 "* ]]; }
tests_rc=0

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu/run.sh: no CUDA GPU visible to torch" >&2
    exit 2
fi

# 1. CUDA extension adaptsr._C, built before the tests so that the "cuda" backend's tests and
#    benchmarks run (a failed build shows in the log and fails tests/test_cuda_extension.py).
#    Default: the just-in-time path the package itself uses (adaptsr/_cuda.py; cached in
#    ~/.cache/adaptsr or $ADAPTSR_BUILD_DIR), for the visible GPU's architecture.
if run_stage build; then
    build_start=$(date +%s)
    if [ "${ADAPTSR_AOT:-0}" = 1 ]; then
        ADAPTSR_FORCE_CUDA_BUILD=1 $py setup.py build_ext --inplace 2>&1 | tee "$raw/build.log"
    else
        $py -c "from adaptsr import _cuda; m = _cuda.load(verbose=True); print('adaptsr._C ready:', m.__file__)" \
            2>&1 | tee "$raw/build.log"
    fi
    build_rc=${PIPESTATUS[0]}
    echo "build exit status $build_rc after $(( $(date +%s) - build_start )) s" | tee -a "$raw/build.log"
fi

# 2. Tests: the whole suite; the backend tests run on the GPU at full size where one is present.
if run_stage tests; then
    $py -m pytest tests -q -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tee "$raw/tests.log"
    tests_rc=${PIPESTATUS[0]}
fi

# 3. Benchmarks: pytest-benchmark providers at the GPU shapes, and the "auto" choice they imply.
if run_stage bench; then
    eval "set -- ${BENCH_ARGS:-}"
    $py -m pytest benchmarks -q -p no:cacheprovider --benchmark-only "$@" --benchmark-json="$raw/bench.json" 2>&1 \
        | tee "$raw/bench.log"
    $py benchmarks/to_markdown.py "$raw/bench.json" > "$raw/bench.md" 2>&1
    $py benchmarks/gpu/auto_choice.py "$raw/bench.json" > "$raw/auto.md" 2>&1
fi
# 4. Kernel floors: each kernel alone against bytes / bandwidth and FLOPs / rate.
if run_stage roofline; then
    $py benchmarks/gpu/kernel_roofline.py --out "$raw/roofline.md" ${ROOFLINE_ARGS:-} 2>&1 | tee "$raw/roofline.log"
fi
# 5. Register spills and shared memory of every Triton kernel for this card's architecture.
if run_stage ptxas; then
    arch=$($py -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
    $py benchmarks/gpu/ptxas_report.py --archs "$arch" > "$raw/ptxas.md" 2>&1
fi

section() {  # a results file's part, or why it is missing
    if [ -f "$1" ]; then cat "$1"; else echo "(not run in this call: STAGES=\"${STAGES:-}\")"; fi
}

{
    echo "# GPU results: $($py -c 'import torch; print(torch.cuda.get_device_name())')"
    echo
    echo "Date: $(date -u +%Y-%m-%d). torch $($py -c 'import torch; print(torch.__version__)'),"
    echo "triton $($py -c 'import triton; print(triton.__version__)'), CUDA $($py -c 'import torch; print(torch.version.cuda)')."
    echo
    echo "## CUDA extension build"
    echo
    echo '```'
    [ -f "$raw/build.log" ] && tail -n 3 "$raw/build.log" || echo "(not run)"
    echo '```'
    echo
    echo "## Tests"
    echo
    echo '```'
    [ -f "$raw/tests.log" ] && tail -n 15 "$raw/tests.log" || echo "(not run)"
    echo '```'
    echo
    echo "## Kernel floors and layer timings"
    echo
    section "$raw/roofline.md"
    echo
    echo "## pytest-benchmark providers"
    echo
    section "$raw/bench.md"
    echo
    echo "## \"auto\" per op (benchmarks/gpu/auto_choice.py; copy the dict into adaptsr/backend.py)"
    echo
    section "$raw/auto.md"
    echo
    echo "## Triton kernels: registers and spills (benchmarks/gpu/ptxas_report.py)"
    echo
    section "$raw/ptxas.md"
} > "$out"
echo "wrote $out"
exit "$tests_rc"
