#!/usr/bin/env bash
# Wheels of the packages adaptsr needs that a GPU machine without a registry lacks, fetched here
# (a machine that reaches PyPI) into .whl/ at the repository root, for benchmarks/gpu/run.sh to
# install there (it does so by itself when .whl/ holds wheels).
#
#   benchmarks/gpu/fetch_wheels.sh            # Python 3.12 on x86-64 Linux, the lent machine's
#   PY_VERSION=3.11 benchmarks/gpu/fetch_wheels.sh
#
# The device image carries torch, torchvision, triton, numpy, safetensors, einops, peft,
# hypothesis, pytest-benchmark and pytest-xdist, but not spandrel (imported by adaptsr.nn) or kornia
# (imported by adaptsr.data); pyiqa is imported only by the evaluation, which the GPU suite does
# not run. Versions are the ones the CPU test environment resolves; --no-deps because each one's
# other requirements are on the image. .whl/ is git-ignored: carry it (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
py_version=${PY_VERSION:-3.12}
WHEELS=(spandrel==0.4.2 kornia==0.9.0 kornia_rs==0.2.0)
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -1 .whl
