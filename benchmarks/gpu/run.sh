#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA GPU: GPU tests, the CUDA extension build (when the
# package has one), the kernel benchmarks, and one markdown results file.
#
#   benchmarks/gpu/run.sh RESULTS.md
#
# Writes RESULTS.md (GPU name, torch/triton versions, date, test summary, benchmark tables)
# and keeps the raw logs and JSON next to it (RESULTS.md.d/). Exit status: non-zero when a
# GPU test failed. Environment knobs: BENCH_ARGS (extra pytest arguments for the benchmarks,
# e.g. BENCH_ARGS='-k bf16' for a shorter run), TEST_ARGS (the same for the tests),
# ROOFLINE_ARGS (e.g. '--dtypes bf16').
set -uo pipefail
out=${1:?usage: benchmarks/gpu/run.sh RESULTS.md}
cd "$(dirname "$0")/../.."
raw="$out.d"
mkdir -p "$raw"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu/run.sh: no CUDA GPU visible to torch" >&2
    exit 2
fi

# 1. Tests: the whole suite; the backend tests run on the GPU at full size where one is present.
$py -m pytest tests -q -p no:cacheprovider ${TEST_ARGS:-} 2>&1 | tee "$raw/tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. CUDA extension: not part of the package yet (see the CUDA extension issue).
if [ -d csrc ]; then
    $py setup.py build_ext --inplace 2>&1 | tee "$raw/build.log"
else
    echo "no csrc/: the CUDA extension is not part of this version" | tee "$raw/build.log"
fi

# 3. Benchmarks: pytest-benchmark providers at the GPU shapes, then the kernel floors.
eval "set -- ${BENCH_ARGS:-}"
$py -m pytest benchmarks -q -p no:cacheprovider --benchmark-only "$@" --benchmark-json="$raw/bench.json" 2>&1 | tee "$raw/bench.log"
$py benchmarks/to_markdown.py "$raw/bench.json" > "$raw/bench.md" 2>&1
$py benchmarks/gpu/kernel_roofline.py --out "$raw/roofline.md" ${ROOFLINE_ARGS:-} 2>&1 | tee "$raw/roofline.log"

{
    echo "# GPU results: $($py -c 'import torch; print(torch.cuda.get_device_name())')"
    echo
    echo "Date: $(date -u +%Y-%m-%d). torch $($py -c 'import torch; print(torch.__version__)'),"
    echo "triton $($py -c 'import triton; print(triton.__version__)'), CUDA $($py -c 'import torch; print(torch.version.cuda)')."
    echo
    echo "## Tests"
    echo
    echo '```'
    tail -n 15 "$raw/tests.log"
    echo '```'
    echo
    echo "## Kernel floors and layer timings"
    echo
    cat "$raw/roofline.md" 2>/dev/null || echo "(kernel_roofline.py failed: see roofline.log)"
    echo
    echo "## pytest-benchmark providers"
    echo
    cat "$raw/bench.md"
} > "$out"
echo "wrote $out"
exit "$tests_rc"
