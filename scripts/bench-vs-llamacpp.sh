#!/usr/bin/env bash
# Side-by-side engine comparison with llama.cpp on the same GGUF, alternating runs so both see the same
# machine noise. Needs ../shared/baseline/build-llamacpp.sh to have built llama.cpp (outside the repo).
# Usage: scripts/bench-vs-llamacpp.sh [ROUNDS]   -> one line per measurement, then medians, then how many
# rounds meet each of the engine-speed issue's goals (BENCHMARKS.md, the table at the top).
# Where llama-batched-bench was built too (`cmake --build <llama.cpp>/build --target llama-batched-bench`),
# each round also runs it for 1 and 32 sequences (16-token prompts, 64 generated tokens each), so both
# engines' batched decode is measured against their own single-stream decode in the same minutes
# (`batch32` and `batch32/1`).
# flotilla runs once per round with `--threads 1 --vs-threads 2`: its ratios (`batch32/1`, and 2 threads
# over 1 as `prefill/1t`, `decode/1t`, `batch32/1t`) are the medians of pairs of runs seconds apart.
# llama.cpp's `prefill/1t` and `decode/1t` are over its 1-thread run of the same round.
# LLAMACPP_ARGS adds llama-bench options and LLAMACPP_BATCHED_ARGS llama-batched-bench ones (`--repack 0`
# and `--no-repack` where its AMX kernels die of SIGILL, as on the Sapphire Rapids VM in BENCHMARKS.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-3}
MODEL=${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${LLAMACPP_BIN:-$HOME/.cache/flotilla-baseline/llama.cpp/build/bin}
FLOTILLA=$ROOT/target/release/flotilla
[ -x "$BIN/llama-bench" ] || { echo "llama-bench not found in $BIN (run shared/baseline/build-llamacpp.sh)" >&2; exit 1; }
[ -x "$FLOTILLA" ] || (cd "$ROOT" && cargo build --release -p flotilla-node)
OUT=$(mktemp)
ROUND=
trap 'rm -f "$OUT" ${ROUND:+"$ROUND"}' EXIT
for r in $(seq "$ROUNDS"); do
  ROUND=$(mktemp)
  for t in 1 2; do
    LD_LIBRARY_PATH=$BIN "$BIN/llama-bench" -m "$MODEL" -p 128 -n 64 -t "$t" -r 3 ${LLAMACPP_ARGS:-} -o json 2>/dev/null \
      | python3 -c "import json,sys; [print('llamacpp', $t, ('prefill' if x['n_prompt'] else 'decode'), x['avg_ts']) for x in json.load(sys.stdin)]" >>"$ROUND"
  done
  "$FLOTILLA" bench engine --model "$MODEL" --threads 1 --vs-threads 2 --runs 3 --batch 32 --json | python3 -c "
import json,sys
x = json.load(sys.stdin)
for t, r in ((1, x), (2, x['vs_threads'])):
    print('flotilla', t, 'prefill', r['prefill_tok_s']); print('flotilla', t, 'decode', r['decode_tok_s'])
    print('flotilla', t, 'batch32', r['batch_decode_tok_s']); print('flotilla', t, 'batch32/1', r['batch_over_decode'])
v = x['vs_threads']
print('flotilla', 2, 'prefill/1t', v['prefill_speedup']); print('flotilla', 2, 'decode/1t', v['decode_speedup'])
print('flotilla', 2, 'batch32/1t', v['batch_decode_speedup'])" >>"$ROUND"
  for t in 1 2; do
    if [ -x "$BIN/llama-batched-bench" ]; then
      LD_LIBRARY_PATH=$BIN "$BIN/llama-batched-bench" -m "$MODEL" -c 4096 -b 512 -ub 512 -npp 16 -ntg 64 -npl 1,32 -t "$t" ${LLAMACPP_BATCHED_ARGS:-} \
        --output-format jsonl 2>&1 | grep '^{' | python3 -c "
import json,sys
r = {x['pl']: x['speed_tg'] for x in map(json.loads, sys.stdin)}
print('llamacpp', $t, 'batch32', r[32]); print('llamacpp', $t, 'batch32/1', r[32] / r[1])" >>"$ROUND"
    fi
  done
  # llama.cpp's 2 threads over its 1 thread of this round
  SPEEDUPS=$(python3 - "$ROUND" <<'PY'
import sys
d = {}
for line in open(sys.argv[1]):
    eng, t, what, v = line.split()
    d[(eng, int(t), what)] = float(v)
for what in ("prefill", "decode"):
    if ("llamacpp", 1, what) in d and ("llamacpp", 2, what) in d:
        print("llamacpp", 2, what + "/1t", d[("llamacpp", 2, what)] / d[("llamacpp", 1, what)])
PY
)
  cat "$ROUND" >>"$OUT"
  [ -z "$SPEEDUPS" ] || echo "$SPEEDUPS" >>"$OUT"
  rm -f "$ROUND"
done
cat "$OUT"
python3 - "$OUT" <<'PY'
import statistics, sys, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    eng, t, what, v = line.split()
    d[(eng, int(t), what)].append(float(v))
print("\nmedians (tok/s; ratios for the names with a slash):")
for k in sorted(d):
    print(f"  {k[0]:9} threads={k[1]} {k[2]:10} {statistics.median(d[k]):8.2f}   (runs: {', '.join(f'{v:.2f}' for v in d[k])})")
# the engine-speed issue's goals (its floors were llama.cpp's figures on the machine kind it was filed on)
goals = [
    ("1-thread decode >= 62 tok/s", "decode", 1, 62),
    ("1-thread prefill >= 156 tok/s", "prefill", 1, 156),
    ("batched 32 >= 4x single stream, 1 thread", "batch32/1", 1, 4),
    ("batched 32 >= 4x single stream, 2 threads", "batch32/1", 2, 4),
    ("2 threads >= 1.8x 1 thread, prefill", "prefill/1t", 2, 1.8),
    ("2 threads >= 1.8x 1 thread, decode", "decode/1t", 2, 1.8),
]
print("\nflotilla against the engine-speed goals (rounds that meet each):")
for name, what, t, floor in goals:
    vs = d.get(("flotilla", t, what))
    if vs:
        print(f"  {name:44} {sum(v >= floor for v in vs)} of {len(vs)}   (range {min(vs):.2f}-{max(vs):.2f})")
    else:
        print(f"  {name:44} not measured")
PY
