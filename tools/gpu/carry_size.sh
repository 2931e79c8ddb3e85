#!/usr/bin/env bash
# What a device run carries: the checkout (tracked and untracked-not-ignored files) and each
# wheel group in .whl/, in MiB, with the totals of the planned runs (the limit is 64 MiB).
#   bash tools/gpu/carry_size.sh          # one line per part, then the plans
set -uo pipefail
cd "$(dirname "$0")/../.."
LIMIT=$((64 << 20))
bytes_of() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  CHECKOUT=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  HOW="git ls-files -co --exclude-standard"
else  # the device's copy has no .git: the tree less what gitignore keeps out
  CHECKOUT=$(find . \( -name .whl -o -name .venv -o -name .git -o -name build -o -name __pycache__ -o -name '*.so' \) -prune \
             -o -type f -print0 | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  HOW="du of the tree without .whl, .venv, build outputs"
fi
declare -A GROUP=()
line="carry: checkout $(mib "$CHECKOUT") MiB ($HOW)"
for d in .whl/*/; do
  [ -d "$d" ] || continue
  name=$(basename "$d"); GROUP[$name]=$(bytes_of "$d")
  line+="; .whl/$name $(mib "${GROUP[$name]}") MiB"
done
loose=$(ls .whl/*.whl 2>/dev/null | wc -l)
[ "$loose" -gt 0 ] && line+="; .whl/*.whl $(mib "$(bytes_of .whl/*.whl)") MiB ($loose loose wheels of an older fetch_wheels.sh)"
echo "$line"
plan() {  # plan NAME GROUP...: the checkout plus these groups, against the limit
  local name=$1 total=$CHECKOUT g have="" lack=""; shift
  for g in "$@"; do
    if [ -n "${GROUP[$g]:-}" ]; then total=$((total + GROUP[$g])); have+=" .whl/$g"; else lack+=" .whl/$g"; fi
  done
  echo "carry: $name = checkout +${have:- (no wheel group here)}: $(mib "$total") MiB of 64 MiB$([ "$total" -gt "$LIMIT" ] && echo ' (OVER THE LIMIT)')${lack:+ (not here:$lack)}"
}
plan "run 1 (default)" base hf megatron-lm-core_v0.19.0
plan "QLoRA run" hf qlora
plan "everything in one run" base hf qlora megatron-lm-core_v0.19.0
