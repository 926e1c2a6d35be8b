#!/usr/bin/env bash
# The lifelong-editing evaluation of issue 8, prepared for one call of a lent GPU (the device tool):
# every run starts at once in the background (SmolLM2 is small: one H200 holds them all and each is
# latency-bound), and whatever they measured by the deadline comes back. Each run writes
# partial.json at every checkpoint, so a run cut short still reports its checkpoints.
#
#   bash bench/lifelong_gpu.sh [deadline_s=540] [out=$OUT or ./gpu-runs]
#
# Runs: CounterFact 10,000 edits in batches of 100 with checkpoints at 1k/2k/5k (default profile,
# paper profile, MEMIT), the 2,000-edit ablation (each regulariser alone), a MEMIT lambda sweep at
# 2,000, and zsRE at 1,000 (the shared zsRE file has 1,000 records).
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-540}
OUT_DIR=${2:-${OUT:-./gpu-runs}}
mkdir -p "$OUT_DIR"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

common=(--device cuda --quiet --sample 500 --first-k 1000 --fluency-n 100)
run() {  # name, then eval arguments
  local name=$1; shift
  $PY -m knowpatch eval "$@" "${common[@]}" --out "$OUT_DIR/$name" >"$OUT_DIR/$name.log" 2>&1 &
}
cf10k=(counterfact --n 10000 --batch-size 100 --checkpoints 1000,2000,5000)
cf2k=(counterfact --n 2000 --batch-size 100 --checkpoints 1000)

# warm the model conversion and the statistics cache once, so the parallel runs only read them
$PY -m knowpatch eval counterfact --n 1 --batch-size 1 --device cuda --quiet --ppl-chunks 1 --control-n 1 \
    --fluency-tokens 0 --out "$OUT_DIR/warmup" >"$OUT_DIR/warmup.log" 2>&1

run cf10k-default "${cf10k[@]}"
run cf10k-paper "${cf10k[@]}" --profile paper
run cf10k-memit "${cf10k[@]}" --method memit
run cf2k-mpes-only "${cf2k[@]}" --norm-penalty 0
run cf2k-norm-only "${cf2k[@]}" --profile paper --norm-penalty 10
run cf2k-neither "${cf2k[@]}" --profile paper
for lam in 1500 5000 50000; do run "cf2k-memit-l$lam" "${cf2k[@]}" --method memit --mom2-weight "$lam"; done
run zsre1k-default zsre --n 1000 --batch-size 100 --checkpoints 500
run zsre1k-memit zsre --n 1000 --batch-size 100 --checkpoints 500 --method memit

sleep "$DEADLINE"
kill $(jobs -p) 2>/dev/null
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >"$OUT_DIR/gpu.txt" 2>&1
echo "runs in $OUT_DIR:"; ls "$OUT_DIR"
