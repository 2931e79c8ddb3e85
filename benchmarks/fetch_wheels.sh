#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks (it has no network) into .whl/ (git-ignored);
# run here before `benchmarks/gpu_check.sh` is sent there with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl megatron-core==0.19.2 liger-kernel==0.8.5
ls -la .whl
