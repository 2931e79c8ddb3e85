#!/usr/bin/env bash
# Bring what a GPU machine without network lacks into .whl/ (git-ignored), to be copied
# there with the checkout: the wheels of megatron-core, liger-kernel and cut-cross-entropy,
# and a copy of the Megatron-LM training scripts the GPU check runs (the project's fixture:
# read from the shared folder, never committed here). benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl megatron-core==0.19.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# The Hugging Face stack of the TRL step benchmark and the QLoRA GPU test (the versions tested
# on CPU; the GPU image has an older transformers and no TRL / PEFT / bitsandbytes).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl transformers==5.23.0 trl==1.16.0 peft==0.21.2 \
    accelerate==1.15.0 datasets==5.2.0 bitsandbytes==0.50.2 \
  || echo "fetch_wheels: the Hugging Face wheels did not all download: the sft_step step and the QLoRA test may fail" >&2
FIXTURE=megatron-lm-core_v0.19.0
SRC=${TOFU_MEGATRON_LM_DIR:-}
if [ -z "$SRC" ]; then
  for d in "$PWD" "$(git config --get remote.origin.url 2>/dev/null || true)"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    d=$(cd "$d" && pwd)
    while [ "$d" != "/" ]; do
      [ -f "$d/shared/fixtures/$FIXTURE/pretrain_gpt.py" ] && { SRC="$d/shared/fixtures/$FIXTURE"; break 2; }
      d=$(dirname "$d")
    done
  done
fi
if [ -n "$SRC" ]; then
  rm -rf ".whl/$FIXTURE" && mkdir -p ".whl/$FIXTURE"
  cp "$SRC"/{pretrain_gpt.py,gpt_builders.py,model_provider.py,LICENSE} ".whl/$FIXTURE/"
  chmod u+w ".whl/$FIXTURE"/*
  echo "fixture: $SRC -> .whl/$FIXTURE"
else
  echo "fixture $FIXTURE not found (set TOFU_MEGATRON_LM_DIR): the GPU check will skip the Megatron-LM runs" >&2
fi
du -sh .whl; ls .whl
