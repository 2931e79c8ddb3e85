#!/usr/bin/env bash
# For a GPU node without network: on a machine with network, download what the GPU check
# needs beyond torch and Triton into .whl/ (git-ignored), one folder per group, so that you
# copy to the node only what the steps you run need; tools/gpu/gpu_check.sh installs there
# whatever groups came along. Run it in the checkout you will copy.
#
#   bash tools/gpu/fetch_wheels.sh           # base, hf and the Megatron-LM scripts (~19 MiB)
#   bash tools/gpu/fetch_wheels.sh --qlora   # also .whl/qlora: bitsandbytes (41 MiB), for the QLoRA step
#   (without --qlora an earlier .whl/qlora is removed, so that copying .whl whole stays small)
#
#   .whl/base/   megatron-core, liger-kernel, cut-cross-entropy: gpu_tests (TP), fused_linear,
#                megatron_step, bench, megatron_lm
#   .whl/hf/     transformers, trl, peft, accelerate, datasets, and dill / multiprocess (datasets
#                needs them; a GPU node's image may lack them): sft_step, qlora. The versions the
#                CPU tests pin (requirements-dev.txt).
#   .whl/qlora/  bitsandbytes: the qlora step (with .whl/hf)
#   .whl/megatron-lm-core_v0.19.0/  Megatron-LM's training scripts, copied from
#                TOFU_MEGATRON_LM_DIR (or shared/fixtures/ beside the checkout; never committed
#                here): megatron_lm
#
# At the end it prints the size of the checkout, of each group and of each planned run
# (tools/gpu/carry_size.sh; add --limit MIB there to hold them against a size limit).
# Wheels are for CPython 3.12 on x86-64 Linux; PYTHON=... names the pip to use (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
QLORA=0
case ${1:-} in
  "") ;;
  --qlora) QLORA=1;;
  -h|--help) sed -n '2,23p' "$0"; exit 0;;
  *) echo "fetch_wheels.sh: unknown option '$1' (--qlora, --help)" >&2; exit 2;;
esac
PY=${PYTHON:-.venv/bin/python}
fetch() {  # fetch GROUP SPEC...: the wheels for CPython 3.12 on x86-64 Linux into .whl/GROUP
  local group=$1; shift
  rm -rf ".whl/$group" && mkdir -p ".whl/$group"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux1_x86_64 --platform any -d ".whl/$group" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
mkdir -p .whl
rm -f .whl/*.whl  # wheels of the older, unsplit layout: two versions of one package stop the install
fetch base megatron-core==0.19.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
fetch hf transformers==5.23.0 trl==1.16.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 \
  || echo "fetch_wheels: the Hugging Face wheels did not all download: sft_step and qlora may fail" >&2
if [ $QLORA = 1 ]; then
  fetch qlora bitsandbytes==0.50.2
else
  rm -rf .whl/qlora
fi
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
  # every script of the fixture: the tests read this copy before the shared one when it exists
  cp "$SRC"/{pretrain_gpt.py,gpt_builders.py,pretrain_hybrid.py,hybrid_builders.py,model_provider.py,LICENSE} \
    ".whl/$FIXTURE/"
  chmod u+w ".whl/$FIXTURE"/*
  echo "fixture: $SRC -> .whl/$FIXTURE"
else
  echo "fixture $FIXTURE not found (set TOFU_MEGATRON_LM_DIR): the GPU check will skip the Megatron-LM runs" >&2
fi
for d in .whl/*/; do echo "$d: $(ls "$d" | tr '\n' ' ')"; done
bash tools/gpu/carry_size.sh
