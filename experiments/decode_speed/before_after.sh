#!/usr/bin/env bash
# `evaluate`'s tokens/s on one export, the commit before the decoding work vs this checkout:
# alternating rounds on the same machine, medians. Usage (from the repository root):
#   experiments/decode_speed/before_after.sh <HF export of a run> [before-commit] [rounds]
# Prints one line per run and a table of medians; eval.json of each run under $OUT.
set -euo pipefail
CKPT=${1:?usage: before_after.sh <hf export> [before-commit] [rounds]}
BEFORE=${2:-05f42c1}
ROUNDS=${3:-3}
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-.venv/bin/python}
git worktree add -f "$OUT/before" "$BEFORE" -q
trap 'git worktree remove --force "$OUT/before"' EXIT
run() {  # name, source tree, extra evaluate args
  local name=$1 tree=$2; shift 2
  local dir="$OUT/$name.$round"
  (cd "$tree" && PYTHONPATH="$tree" "$OLDPWD/$PY" -m tinyreason.evaluate ckpt="$CKPT" out="$dir" "$@" > "$dir.log" 2>&1)
  "$PY" -c "import json,sys; d=json.load(open('$dir/eval.json')); print('$name', $round, *(f\"{k} {v['tokens_per_s']:.0f}\" for k, v in d.items()))"
}
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  run before "$OUT/before"
  run after "$PWD"
  run after_compiled "$PWD" eval.compile=true
done | tee "$OUT/rounds.txt"
"$PY" - "$OUT/rounds.txt" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, _, *rest = line.split()
    for split, tps in zip(rest[::2], rest[1::2]):
        rows.setdefault((name, split), []).append(float(tps))
names = sorted({n for n, _ in rows}, key=["before", "after", "after_compiled"].index)
splits = sorted({s for _, s in rows})
print("| evaluate | " + " | ".join(f"{s} tokens/s (median)" for s in splits) + " | vs before |")
print("|---|" + "---:|" * (len(splits) + 1))
base = {s: statistics.median(rows["before", s]) for s in splits}
for n in names:
    med = {s: statistics.median(rows[n, s]) for s in splits}
    ratio = ", ".join(f"{med[s] / base[s]:.2f}x" for s in splits)
    print(f"| {n} | " + " | ".join(f"{med[s]:,.0f}" for s in splits) + f" | {ratio} |")
PY
