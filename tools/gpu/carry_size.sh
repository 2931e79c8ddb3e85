#!/usr/bin/env bash
# What a run on a GPU node without network needs copied to it: the checkout (tracked and
# untracked-not-ignored files) and each wheel group in .whl/, in MiB, with the totals of the
# planned runs. With --limit MIB (e.g. the size your transfer or removable medium allows) each
# planned run is also held against that limit and flagged when over it; without, only sizes.
#   bash tools/gpu/carry_size.sh              # one line per part, then the plans
#   bash tools/gpu/carry_size.sh --limit 64   # the same, each plan against 64 MiB
set -uo pipefail
LIMIT_MIB=""
while [ $# -gt 0 ]; do
  case $1 in
    --limit) LIMIT_MIB=${2:?--limit needs MiB}; shift 2;;
    -h|--help) sed -n '2,7p' "$0"; exit 0;;
    *) echo "carry_size.sh: unknown option '$1' (--limit MIB, --help)" >&2; exit 2;;
  esac
done
case $LIMIT_MIB in *[!0-9]*) echo "carry_size.sh: --limit takes whole MiB, got '$LIMIT_MIB'" >&2; exit 2;; esac
cd "$(dirname "$0")/../.."
bytes_of() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  CHECKOUT=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  HOW="git ls-files -co --exclude-standard"
else  # a copy without .git: the tree less what gitignore keeps out
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
plan() {  # plan NAME GROUP...: the checkout plus these groups (against --limit where given)
  local name=$1 total=$CHECKOUT g have="" lack="" against=""; shift
  for g in "$@"; do
    if [ -n "${GROUP[$g]:-}" ]; then total=$((total + GROUP[$g])); have+=" .whl/$g"; else lack+=" .whl/$g"; fi
  done
  if [ -n "$LIMIT_MIB" ]; then
    against=" of $LIMIT_MIB MiB$([ "$total" -gt $((LIMIT_MIB << 20)) ] && echo ' (OVER THE LIMIT)')"
  fi
  echo "carry: $name = checkout +${have:- (no wheel group here)}: $(mib "$total") MiB$against${lack:+ (not here:$lack)}"
}
plan "run 1 (default)" base hf megatron-lm-core_v0.19.0
plan "QLoRA run" hf qlora
plan "everything in one run" base hf qlora megatron-lm-core_v0.19.0
