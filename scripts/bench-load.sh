#!/usr/bin/env bash
# Serving benchmark, side by side: `flotilla bench load` against a 1-node and a 3-node flotilla
# cluster and, when a llama.cpp build is at hand (../shared/baseline/build-llamacpp.sh), against
# llama-server with 32 slots, all on this machine, same model, same load (64 greedy tokens per
# request, end of sequence ignored, 10-16-token prompts), at concurrency 1, 8 and 32.
# Usage: scripts/bench-load.sh [requests-per-level]   (prints one JSON line per measurement)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
BIN=./target/release/flotilla
LLAMA=${LLAMA_BIN:-$HOME/.cache/flotilla-baseline/llama.cpp/build/bin}
[ -x "$BIN" ] || cargo build --release -p flotilla-node
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_ready() { for _ in $(seq 1 300); do curl -sf "$1/ready" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not ready: $1" >&2; return 1; }
wait_health() { for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "not healthy: $1" >&2; return 1; }

load() { # label, urls...
  local label=$1; shift
  local args=()
  for u in "$@"; do args+=(--url "$u"); done
  for c in 1 8 32; do
    local n=$N; [ "$c" -eq 1 ] && n=$(( N < 8 ? N : 8 ))
    echo "{\"system\":\"$label\",\"result\":$($BIN bench load "${args[@]}" --concurrency $c --requests $n --max-tokens 64 --json)}"
  done
}

# flotilla, one node, 2 compute threads
$BIN up --nodes 1 --cluster-port 7600 --http-port 8600 --model $MODEL >/tmp/flotilla-bench-1.log 2>&1 & pids+=($!)
wait_ready http://127.0.0.1:8600
load "flotilla 1 node" http://127.0.0.1:8600
cleanup; pids=()

# flotilla, three nodes (one replica each, 1 compute thread each on this 2-core machine), load spread over the nodes
$BIN up --nodes 3 --cluster-port 7610 --http-port 8610 --model $MODEL >/tmp/flotilla-bench-3.log 2>&1 & pids+=($!)
for p in 8610 8611 8612; do wait_ready http://127.0.0.1:$p; done
load "flotilla 3 nodes x 1 replica" http://127.0.0.1:8610 http://127.0.0.1:8611 http://127.0.0.1:8612
cleanup; pids=()

# flotilla, three nodes as one 3-stage pipeline
FLOTILLA__PARALLELISM__REPLICAS=1 $BIN up --nodes 3 --cluster-port 7620 --http-port 8620 --model $MODEL >/tmp/flotilla-bench-p.log 2>&1 & pids+=($!)
for p in 8620 8621 8622; do wait_ready http://127.0.0.1:$p; done
load "flotilla 3-stage pipeline" http://127.0.0.1:8620
cleanup; pids=()

if [ -x "$LLAMA/llama-server" ]; then
  LD_LIBRARY_PATH=$LLAMA "$LLAMA/llama-server" -m $MODEL --host 127.0.0.1 --port 8689 -t 2 -np 32 -c 8192 >/tmp/llama-server.log 2>&1 & pids+=($!)
  wait_health http://127.0.0.1:8689
  load "llama-server -t 2 -np 32" http://127.0.0.1:8689
fi
