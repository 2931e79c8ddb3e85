#!/usr/bin/env bash
# The package's GPU check, in one command, for your own GPU node (it needs no network there:
# tools/gpu/fetch_wheels.sh fetches the wheels beforehand). Steps in the order a user meets
# them and from the least proven on: the CUDA build, the gpu-marked tests (kernels with
# metrics, tensor parallelism emulated with several processes on one GPU, the fused linear
# loss, CUDA top-1 ties), the fused linear benchmark, a Megatron-Core training step (with the
# fused output rows), the TRL step, QLoRA (only where the bitsandbytes wheel came along), the
# loss benchmark with the time left, and Megatron-LM's own pretrain_gpt.py (already run on an
# H100 on 2026-11-27: last). Logs and results in one folder, optionally packed into one
# archive; --budget fits the whole run into a time slot.
set -uo pipefail
cd "$(dirname "$0")/../.."
STEPS="build gpu_tests fused_linear megatron_step sft_step qlora bench megatron_lm"
# per step: the least time worth starting it with, and its own limit (seconds on an H100/H200;
# 2026-11-27 on an H100: build 15-21 s, 472 gpu tests 144 s, pretrain_gpt.py both ways 102 s,
# the Megatron step 39 s)
declare -A MIN=([build]=10 [gpu_tests]=90 [fused_linear]=45 [megatron_step]=40 [sft_step]=40 [qlora]=60
                [bench]=45 [megatron_lm]=120)
declare -A MAX=([build]=180 [gpu_tests]=280 [fused_linear]=180 [megatron_step]=150 [sft_step]=150 [qlora]=200
                [bench]=600 [megatron_lm]=240)
RESERVE=10  # seconds kept back at the end for the summary and the archive

usage() {
  cat <<USAGE
usage: bash tools/gpu/gpu_check.sh [--out DIR] [--budget SECONDS] [--skip "STEP ..."] [--only "STEP ..."]
                                    [--pack FILE] [--bench-args "ARGS"] [--cpu-smoke] [--help]

  --out DIR           where the logs and results go (created if missing; default: a new
                      temporary folder, named in the first line of the output)
  --budget SECONDS    a limit on the whole run: each step gets at most what is left (less
                      ${RESERVE} s for the archive); a step is skipped, with the reason printed,
                      when what is left is under the least it needs; the loss benchmark trims
                      its grid to its time. Default: none, each step has only its own limit
  --skip "STEP ..."   steps not to run, e.g. a shorter rerun: --skip "megatron_lm bench"
  --only "STEP ..."   run only these steps, e.g. the QLoRA run: --only "build qlora"
                      (steps, in order: $STEPS)
  --pack FILE         at the end, pack DIR into one archive FILE (.tar.gz), e.g. ~/gpu_check.tar.gz,
                      to bring the results back in one file (logs over 4 MiB cut to their ends)
  --bench-args "..."  extra arguments to benchmarks/bench_loss.py (e.g. "--tokens 4096 --vocab 16032")
  --cpu-smoke         the same command path on a machine without a GPU: tiny sizes, the CUDA
                      build only where a toolkit exists, the gpu tests collected (they skip),
                      the steps that need a GPU (qlora, megatron_lm) skipped with the reason
  PYTHON=...          the interpreter (default python3; .venv/bin/python in smoke mode)

Exit status: 0 every step ran and passed (or was left out by --skip / --only / the smoke
mode / a wheel group not brought along), 1 a step failed, 3 none failed but the budget cut some.

On a GPU node without network: first, on a machine with network, bash tools/gpu/fetch_wheels.sh
puts the wheels, in one folder per group, and the Megatron-LM scripts into .whl/ (git-ignored):
  .whl/base/     megatron-core, liger-kernel, cut-cross-entropy  (gpu_tests, fused_linear,
                 megatron_step, bench, megatron_lm)
  .whl/hf/       transformers, trl, peft, accelerate, datasets and what datasets needs
                 that a CUDA image may lack (sft_step, qlora)
  .whl/qlora/    bitsandbytes (qlora; 41 MiB: only with fetch_wheels.sh --qlora; a run of its
                 own if you like: --only "build qlora")
  .whl/megatron-lm-core_v0.19.0/   Megatron-LM's pretrain_gpt.py and its helpers (megatron_lm)
Copy the checkout and the groups the run needs to the node (bash tools/gpu/carry_size.sh
prints their sizes), then run this script there; it prints what came along and installs it.
Files in DIR: summary.txt (what ran, what passed, the headline numbers), per step its log
(STEP.log) and results: bench_fused_linear.md and .json (V 128256 and the TP = 8 shard,
16032), bench_megatron_step.md, bench_sft_step.md and .json, bench_loss.md, .json and .png,
megatron_lm.md.
USAGE
}

OUT="" BUDGET="" SKIP="" ONLY="" PACK="" BENCH_EXTRA="" SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=${2:?--out needs a folder}; shift 2;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2;;
    --skip) SKIP=${2?--skip needs step names}; shift 2;;
    --only) ONLY=${2:?--only needs step names}; shift 2;;
    --pack) PACK=${2:?--pack needs a file}; shift 2;;
    --bench-args) BENCH_EXTRA=${2?--bench-args needs arguments}; shift 2;;
    --cpu-smoke) SMOKE=1; shift;;
    -h|--help) usage; exit 0;;
    *) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2;;
  esac
done
case $BUDGET in *[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2;; esac
for name in $SKIP $ONLY; do
  case " $STEPS " in *" $name "*) ;; *) echo "gpu_check.sh: --skip/--only: no step '$name' (steps: $STEPS)" >&2; exit 2;; esac
done
case $PACK in ""|*.tar.gz|*.tgz) ;; *) echo "gpu_check.sh: --pack writes a .tar.gz or .tgz, got '$PACK'" >&2; exit 2;; esac
START=$(date +%s)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/summary.txt"
echo "gpu_check: results in $OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ $SMOKE = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
FAILED=() CUT=()

# seconds left of the budget (a day when there is none)
left() { echo $(( ${BUDGET:-86400} - ($(date +%s) - START) )); }
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
# blocked NAME: why --skip / --only leave NAME out (nothing: they do not)
blocked() {
  case " $SKIP " in *" $1 "*) echo "--skip"; return;; esac
  if [ -n "$ONLY" ]; then case " $ONLY " in *" $1 "*) ;; *) echo "not in --only";; esac; fi
}
# step NAME -- command...: run it with min(its limit, the budget left less RESERVE) seconds,
# or say why not (returns 1 when it did not run)
step() {
  local name=$1; shift 2
  local why t rc
  why=$(blocked "$name")
  t=$(( $(left) - RESERVE )); [ "$t" -gt "${MAX[$name]}" ] && t=${MAX[$name]}
  if [ -z "$why" ] && [ "$t" -lt "${MIN[$name]}" ]; then
    why="time budget: $(( t > 0 ? t : 0 ))s left, it needs at least ${MIN[$name]}s"; CUT+=("$name")
  fi
  if [ -n "$why" ]; then say "SKIP $name: $why"; return 1; fi
  say "START $name (limit ${t}s)"
  timeout --signal=INT --kill-after=10 "$t" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then say "OK $name"
  else
    if [ $rc -eq 124 ]; then say "FAIL $name (stopped at its ${t}s limit; tail of $name.log follows)"
    else say "FAIL $name (exit $rc; tail of $name.log follows)"; fi
    tail -n 15 "$OUT/$name.log" | tee -a "$OUT/summary.txt"; FAILED+=("$name")
  fi
}
# needs_gpu NAME WHY: in smoke mode (and NAME not left out otherwise) say that NAME needs a GPU
needs_gpu() {
  [ $SMOKE = 1 ] && [ -z "$(blocked "$1")" ] && say "SKIP $1: needs a GPU ($2)"
}

say "mode: $([ $SMOKE = 1 ] && echo 'CPU smoke (tiny sizes, no GPU)' || echo GPU); python: $PYTHON; budget: ${BUDGET:-none}${BUDGET:+ s}"
# What came along with this checkout: the tree and each wheel group, in MiB.
bash tools/gpu/carry_size.sh | tee -a "$OUT/summary.txt"

# Wheels (one folder per group) and the Megatron-LM scripts brought along in .whl/.
WHEELS=$(ls .whl/*/*.whl .whl/*.whl 2>/dev/null | tr '\n' ' ')
GROUPS_HERE=$(for d in .whl/*/; do [ -d "$d" ] && ls "$d"*.whl >/dev/null 2>&1 && basename "$d"; done | xargs)
if [ -z "$WHEELS" ]; then
  say "no wheels in .whl/ (none brought along): Megatron, Liger, CCE and the Hugging Face stack are what is importable"
elif [ $SMOKE = 1 ]; then
  say "smoke: the wheels in .whl/ (groups: ${GROUPS_HERE:-none}) are not installed here; this machine's packages are used"
else
  SITE=/tmp/tofu_site; rm -rf "$SITE"
  # shellcheck disable=SC2086
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $WHEELS >"$OUT/wheels.log" 2>&1; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    say "installed wheels (groups: ${GROUPS_HERE:-none}): $(for w in $WHEELS; do basename "$w"; done | tr '\n' ' ')"
  else
    say "wheel install failed (see wheels.log): the steps use what is importable"; tail -n 5 "$OUT/wheels.log" | tee -a "$OUT/summary.txt"
  fi
fi
[ -d .whl/megatron-lm-core_v0.19.0 ] && export TOFU_MEGATRON_LM_DIR=$PWD/.whl/megatron-lm-core_v0.19.0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Build the CUDA extension from source: in place and forced on a GPU node; in smoke
# mode into a scratch folder (never over a library a running process may have mapped),
# whose objects later smoke runs of this checkout reuse: the build is ninja's, which
# recompiles what changed, headers and flags included (a cold build takes ~20 s on 2 cores).
if [ $SMOKE = 1 ]; then
  SCRATCH=${TMPDIR:-/tmp}/tofu_gpu_check_smoke_$(printf %s "$PWD" | md5sum | cut -c1-8)
  mkdir -p "$SCRATCH"; LOCK=(); command -v flock >/dev/null && LOCK=(flock "$SCRATCH/lock")  # runs side by side
  BUILD=("${LOCK[@]}" env TOFU_BUILD_CUDA=auto "$PYTHON" setup.py build_ext --build-lib "$SCRATCH/lib"
         --build-temp "$SCRATCH/temp")
else
  BUILD=(env TOFU_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace)
fi
step build -- "${BUILD[@]}"
# The machine, the versions that matter, and whether our extension loads (one interpreter start).
{
  date -u; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1
  "$PYTHON" - <<'PY'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
names = ["triton", "megatron-core", "liger-kernel", "cut-cross-entropy", "transformers", "trl", "peft", "accelerate",
         "datasets", "pyarrow", "fsspec", "dill", "multiprocess", "huggingface-hub", "tokenizers", "bitsandbytes"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("packages:", ", ".join(f"{n} {version(n)}" for n in names))
import tofu_kernels as tk
print("CUDA extension loaded:", tk.extension_loaded())
PY
} 2>&1 | grep -v "^W[0-9]" | tee -a "$OUT/summary.txt"
# a pytest summary line ("3 passed, 2 skipped in 4.1s") into the summary
pytest_line() { grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|error)" "$OUT/$1.log" | tail -1 | tee -a "$OUT/summary.txt"; }

# 1. gpu-marked tests: kernels with metrics, TP emulated, the fused linear loss, CUDA top-1
# ties (in smoke mode they are collected and skip, saying why).
export TOFU_GPU_NOTES="$OUT/summary.txt"  # the TP tests say there how the all-gather ran
step gpu_tests -- "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests/gpu/test_gpu.py tests/gpu/test_gpu_tp.py \
  tests/kernels/test_linear.py tests/kernels/test_metrics.py tests/kernels/test_cuda_ext.py && pytest_line gpu_tests

# 2. The model's last layer and its loss: ours, matmul + ours, the composed recipe (Liger's
# fused linear CE with reduction "none" + a no-grad pass for the focal weight), CCE, Liger.
SMOKE_ARG=$([ $SMOKE = 1 ] && echo --cpu-smoke)
step fused_linear -- "$PYTHON" benchmarks/bench_fused_linear.py --out "$OUT" $SMOKE_ARG \
  && grep -E "PASS|MISS|n\.a\." "$OUT/bench_fused_linear.md" >>"$OUT/summary.txt" 2>/dev/null

# 3. A Megatron-Core training step with each loss, --tofu-fused-linear among them.
step megatron_step -- "$PYTHON" benchmarks/bench_megatron_step.py --out "$OUT" $SMOKE_ARG \
  && grep -E "PASS|MISS" "$OUT/bench_megatron_step.md" >>"$OUT/summary.txt" 2>/dev/null

# 4. The TRL step: TOFUSFTTrainer against SFTTrainer + compute_loss_func.
step sft_step -- "$PYTHON" benchmarks/bench_sft_step.py --out "$OUT" $SMOKE_ARG \
  && grep -E "PASS|MISS|n\.a\." "$OUT/bench_sft_step.md" >>"$OUT/summary.txt" 2>/dev/null

# 5. QLoRA (bitsandbytes 4-bit): only where .whl/qlora came along (a run of its own).
if needs_gpu qlora "bitsandbytes' 4-bit kernels"; then :
elif [ -z "$(blocked qlora)" ] && ! "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; then
  say "SKIP qlora: bitsandbytes not importable (fetch_wheels.sh --qlora; bring .whl/hf and .whl/qlora along)"
else
  step qlora -- "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests/hf/test_hf_trainer.py && pytest_line qlora
fi

# 6. The loss benchmark at full sizes (the targets' shapes first), in the time left.
BENCH_ARGS=()
if [ $SMOKE = 1 ]; then BENCH_ARGS=(--cpu-smoke --tokens 8 --vocab 256 --reps 2 --impl ours authors)
elif [ -n "$BUDGET" ]; then
  b=$(( $(left) - RESERVE )); [ $b -gt ${MAX[bench]} ] && b=${MAX[bench]}
  BENCH_ARGS=(--time-budget $(( b - 40 > 30 ? b - 40 : 30 )))  # 40 s: start-up, copy, writing
fi
# shellcheck disable=SC2086
step bench -- "$PYTHON" benchmarks/bench_loss.py --out "$OUT" "${BENCH_ARGS[@]}" $BENCH_EXTRA \
  && grep -E "PASS|MISS|n\.a\." "$OUT/bench_loss.md" >>"$OUT/summary.txt" 2>/dev/null

# 7. Megatron-LM's own pretrain_gpt.py through the launcher, cross entropy vs TOFU.
needs_gpu megatron_lm "Megatron-LM stops at its CUDA check; tests/megatron/test_megatron_lm.py runs the launcher to it" \
  || { step megatron_lm -- "$PYTHON" tools/gpu/megatron_lm_check.py --out "$OUT" \
       && grep -E "^\| (cross_entropy|tofu) |^- first|^- TOFU|^Result" "$OUT/megatron_lm.md" >>"$OUT/summary.txt" 2>/dev/null; }

say "done in $(( $(date +%s) - START ))s; failed: ${FAILED[*]:-none}; cut by the budget: ${CUT[*]:-none}"
if [ -n "$PACK" ]; then
  # keep the archive small: cut any log over 4 MiB to its first 300 and last 3000 lines
  for f in "$OUT"/*.log; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((4 << 20)) ] || continue
    { head -n 300 "$f"; echo "[... cut by gpu_check.sh --pack ...]"; tail -n 3000 "$f"; } >"$f.cut" && mv "$f.cut" "$f"
  done
  mkdir -p "$(dirname "$PACK")"
  tar -czf "$PACK" --exclude="./$(basename "$PACK")" -C "$OUT" . && say "packed $(find "$OUT" -type f | wc -l) files of $OUT into $PACK ($(( $(stat -c %s "$PACK") / 1024 )) KiB)"
fi
[ ${#FAILED[@]} -gt 0 ] && exit 1
[ ${#CUT[@]} -gt 0 ] && exit 3
exit 0
