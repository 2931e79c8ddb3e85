#!/usr/bin/env bash
# One prepared GPU run: environment, wheels, CUDA build, gpu-marked tests, a few SFT
# iterations, the benchmark at full sizes; logs and results under $OUT. It guards its
# own time (GPU_CHECK_BUDGET seconds, default 450 < 8 min): every step gets what is left.
#
#   bash benchmarks/fetch_wheels.sh                 # here, once: megatron-core + liger wheels
#   device run: bash benchmarks/gpu_check.sh        # carry=[".whl"]; results come back from $OUT
#   bash benchmarks/gpu_check.sh --cpu-smoke        # here: the same steps, tiny sizes, no GPU
#
# Files under $OUT (8 at most come back): summary.txt env.txt build.log gpu_tests.log
# sft.log bench_loss.md bench_loss.png bench_loss.json
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ $SMOKE = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
FAILED=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
# step NAME MAX_SECONDS LOG -- command...: run with min(MAX, time left - reserve) seconds
step() {
  local name=$1 max=$2 log=$3; shift 4
  local t; t=$(left); t=$(( t - 30 < max ? t - 30 : max ))
  if [ "$t" -le 5 ]; then say "SKIP $name: time budget spent"; FAILED+=("$name(skipped)"); return; fi
  say "START $name (limit ${t}s)"
  timeout --signal=INT --kill-after=10 "$t" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then say "OK $name"; else say "FAIL $name (exit $rc; tail of $log follows)"; tail -n 15 "$OUT/$log" | tee -a "$OUT/summary.txt"; FAILED+=("$name"); fi
}

say "mode: $([ $SMOKE = 1 ] && echo 'CPU smoke (tiny sizes, no GPU)' || echo GPU); python: $PYTHON; budget ${BUDGET}s"
{
  date -u; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  command -v nvcc >/dev/null && nvcc --version | tail -2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$OUT/summary.txt"

# Wheels carried with the checkout (the GPU machine has no network).
if ls .whl/*.whl >/dev/null 2>&1 && [ $SMOKE = 0 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tofu_site .whl/*.whl \
    && export PYTHONPATH=/tmp/tofu_site${PYTHONPATH:+:$PYTHONPATH} && say "installed wheels: $(ls .whl | tr '\n' ' ')"
else
  say "no .whl/ wheels installed (smoke mode, or none carried): Megatron/Liger use what is importable"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Build the CUDA extension from source: in place and forced on the GPU machine; in smoke
# mode into a scratch folder (never over a library a running process may have mapped).
if [ $SMOKE = 1 ]; then
  BUILD=(env TOFU_BUILD_CUDA=auto "$PYTHON" setup.py build_ext --build-lib "$(mktemp -d)" --build-temp "$(mktemp -d)")
else
  BUILD=(env TOFU_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace)
fi
step build 240 build.log -- "${BUILD[@]}"
"$PYTHON" -c "import tofu_kernels as tk; print('CUDA extension loaded:', tk.extension_loaded())" 2>&1 | tee -a "$OUT/summary.txt"

# gpu-marked tests (skipped with their reason in smoke mode) + the extension's CPU tests.
step gpu_tests 200 gpu_tests.log -- "$PYTHON" -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_cuda_ext.py -p no:cacheprovider
tail -n 3 "$OUT/gpu_tests.log" >>"$OUT/summary.txt"

# A few iterations of the SFT entry point with --loss-type tofu.
if [ $SMOKE = 1 ]; then SFT_ARGS=(--device cpu --train-iters 4 --log-interval 2 --seq-length 16); else
  SFT_ARGS=(--device cuda --bf16 --train-iters 30 --log-interval 10 --num-layers 4 --hidden-size 256 --seq-length 256 --micro-batch-size 16); fi
step sft 90 sft.log -- "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_patch.sft \
  --data mock --loss-type tofu --tofu-gamma 3.0 --tofu-beta 0.8 "${SFT_ARGS[@]}"
grep -E "^iter" "$OUT/sft.log" | tail -n 3 >>"$OUT/summary.txt"

# The benchmark at full sizes, within what is left (the targets' shapes run first).
if [ $SMOKE = 1 ]; then BENCH_ARGS=(--cpu-smoke --tokens 8 --vocab 256 --reps 2); else
  BENCH_ARGS=(--dtype bf16 fp32 --time-budget $(( $(left) - 90 > 30 ? $(left) - 90 : 30 ))); fi
step bench 600 bench.log -- "$PYTHON" benchmarks/bench_loss.py --out "$OUT" "${BENCH_ARGS[@]}"
grep -E "PASS|MISS|n\.a\." "$OUT/bench_loss.md" >>"$OUT/summary.txt" 2>/dev/null
rm -f "$OUT/bench.log"  # the table is in bench_loss.md; keep $OUT within 8 files

say "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
