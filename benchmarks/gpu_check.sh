#!/usr/bin/env bash
# One prepared GPU run: environment, wheels, CUDA build, gpu-marked tests (kernels, and
# tensor parallelism emulated with several processes on one GPU), Megatron-LM's own
# pretrain_gpt.py with --loss-type cross_entropy and tofu, a Megatron-Core training-step
# benchmark, the fused linear benchmark and the loss benchmark; logs and results in one folder.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="build gpu_tests megatron_lm megatron_step fused_linear sft_step bench"

usage() {
  cat <<USAGE
usage: bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--skip "STEP ..."]
                                    [--bench-args "ARGS"] [--cpu-smoke] [--help]

  --out DIR           where the logs and results go (created if missing; default: a new
                      temporary folder, named in the first line of the output)
  --budget SECONDS    a limit on the whole run: each step gets at most what is left (less 20 s
                      for the steps after it) and the loss benchmark stops its grid in time;
                      default: none, each step has only its own limit
  --skip "STEP ..."   steps not to run, e.g. a shorter rerun: --skip "megatron_lm bench"
                      (steps, in order: $STEPS)
  --bench-args "..."  extra arguments to benchmarks/bench_loss.py (e.g. "--tokens 4096 --vocab 16032")
  --cpu-smoke         every step with tiny sizes and no GPU (the CUDA build only where a
                      toolkit exists), to check the script itself
  PYTHON=...          the interpreter (default python3; .venv/bin/python in smoke mode)

Before a run on a machine without network: bash benchmarks/fetch_wheels.sh (here, once) puts
the wheels and the Megatron-LM scripts it needs into .whl/; bring that folder along with the
checkout. Files in DIR: summary.txt (what ran, what passed, the headline numbers) and per step
its log (STEP.log) and results: megatron_lm.md, bench_megatron_step.md, bench_fused_linear.md
and .json (V 128256 and the TP = 8 shard, 16032), bench_sft_step.md and .json (TOFUSFTTrainer vs
SFTTrainer + compute_loss_func), bench_loss.md, .json and .png.
USAGE
}

OUT="" BUDGET="" SKIP="" BENCH_EXTRA="" SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=${2:?--out needs a folder}; shift 2;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2;;
    --skip) SKIP=${2?--skip needs step names}; shift 2;;
    --bench-args) BENCH_EXTRA=${2?--bench-args needs arguments}; shift 2;;
    --cpu-smoke) SMOKE=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2;;
  esac
done
case $BUDGET in *[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2;; esac
for name in $SKIP; do
  case " $STEPS " in *" $name "*) ;; *) echo "gpu_check.sh: --skip: no step '$name' (steps: $STEPS)" >&2; exit 2;; esac
done
START=$(date +%s)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "gpu_check: results in $OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ $SMOKE = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
FAILED=()

# seconds left of the budget (a day when there is none)
left() { echo $(( ${BUDGET:-86400} - ($(date +%s) - START) )); }
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
# step NAME MAX_SECONDS LOG -- command...: run with min(MAX, time left - reserve) seconds
step() {
  local name=$1 max=$2 log=$3; shift 4
  case " $SKIP " in *" $name "*) say "SKIP $name: --skip"; return;; esac
  local t; t=$(left); t=$(( t - 20 < max ? t - 20 : max ))
  if [ "$t" -le 5 ]; then say "SKIP $name: time budget spent"; FAILED+=("$name(skipped)"); return; fi
  say "START $name (limit ${t}s)"
  timeout --signal=INT --kill-after=10 "$t" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then say "OK $name"; else say "FAIL $name (exit $rc; tail of $log follows)"; tail -n 15 "$OUT/$log" | tee -a "$OUT/summary.txt"; FAILED+=("$name"); fi
}

say "mode: $([ $SMOKE = 1 ] && echo 'CPU smoke (tiny sizes, no GPU)' || echo GPU); python: $PYTHON; budget: ${BUDGET:-none}${BUDGET:+ s}"
{
  date -u; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  command -v nvcc >/dev/null && nvcc --version | tail -2
} >>"$OUT/summary.txt" 2>&1

# Wheels and the Megatron-LM scripts brought along in .whl/ (for a machine without network).
if ls .whl/*.whl >/dev/null 2>&1 && [ $SMOKE = 0 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tofu_site .whl/*.whl \
    && export PYTHONPATH=/tmp/tofu_site${PYTHONPATH:+:$PYTHONPATH} && say "installed wheels: $(ls .whl | tr '\n' ' ')"
else
  say "no .whl/ wheels installed (smoke mode, or none brought along): Megatron/Liger use what is importable"
fi
[ -d .whl/megatron-lm-core_v0.19.0 ] && export TOFU_MEGATRON_LM_DIR=$PWD/.whl/megatron-lm-core_v0.19.0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Build the CUDA extension from source: in place and forced on the GPU machine; in smoke
# mode into a scratch folder (never over a library a running process may have mapped).
if [ $SMOKE = 1 ]; then
  BUILD=(env TOFU_BUILD_CUDA=auto "$PYTHON" setup.py build_ext --build-lib "$(mktemp -d)" --build-temp "$(mktemp -d)")
else
  BUILD=(env TOFU_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace)
fi
step build 180 build.log -- "${BUILD[@]}"
"$PYTHON" -c "import tofu_kernels as tk; print('CUDA extension loaded:', tk.extension_loaded())" 2>&1 | tee -a "$OUT/summary.txt"

# gpu-marked tests (skipped with their reason in smoke mode) + the extension's CPU tests.
export TOFU_GPU_NOTES="$OUT/summary.txt"  # the TP tests say there how the all-gather ran under gloo
step gpu_tests 320 gpu_tests.log -- "$PYTHON" -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_gpu_tp.py tests/test_linear.py \
  tests/test_cuda_ext.py tests/test_metrics.py tests/test_hf_trainer.py -p no:cacheprovider
tail -n 3 "$OUT/gpu_tests.log" >>"$OUT/summary.txt"

# Megatron-LM's own pretrain_gpt.py through the launcher, cross entropy vs TOFU.
step megatron_lm 240 megatron_lm.log -- "$PYTHON" benchmarks/megatron_lm_check.py --out "$OUT" \
  $([ $SMOKE = 1 ] && echo --smoke)
grep -E "^\| (cross_entropy|tofu) |^- first|^- TOFU|^Result" "$OUT/megatron_lm.md" >>"$OUT/summary.txt" 2>/dev/null

# A Megatron-Core training step with each loss (ms/step, peak memory).
step megatron_step 120 megatron_step.log -- "$PYTHON" benchmarks/bench_megatron_step.py --out "$OUT" \
  $([ $SMOKE = 1 ] && echo --cpu-smoke)
grep -E "PASS|MISS" "$OUT/bench_megatron_step.md" >>"$OUT/summary.txt" 2>/dev/null

# The model's last layer and its loss: fused linear + TOFU against matmul + loss, CCE, Liger.
step fused_linear 240 fused_linear.log -- "$PYTHON" benchmarks/bench_fused_linear.py --out "$OUT" \
  $([ $SMOKE = 1 ] && echo --cpu-smoke)
grep -E "PASS|MISS|n\.a\." "$OUT/bench_fused_linear.md" >>"$OUT/summary.txt" 2>/dev/null

step sft_step 240 sft_step.log -- "$PYTHON" benchmarks/bench_sft_step.py --out "$OUT" \
  $([ $SMOKE = 1 ] && echo --cpu-smoke)
grep -E "PASS|MISS|n\.a\." "$OUT/bench_sft_step.md" >>"$OUT/summary.txt" 2>/dev/null

# The loss benchmark at full sizes (the targets' shapes run first), within the budget if any.
BENCH_ARGS=()
if [ $SMOKE = 1 ]; then BENCH_ARGS=(--cpu-smoke --tokens 8 --vocab 256 --reps 2)
elif [ -n "$BUDGET" ]; then BENCH_ARGS=(--time-budget $(( $(left) - 60 > 30 ? $(left) - 60 : 30 ))); fi
step bench 600 bench.log -- "$PYTHON" benchmarks/bench_loss.py --out "$OUT" "${BENCH_ARGS[@]}" $BENCH_EXTRA
grep -E "PASS|MISS|n\.a\." "$OUT/bench_loss.md" >>"$OUT/summary.txt" 2>/dev/null
say "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
