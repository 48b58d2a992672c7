#!/usr/bin/env bash
# SmolLM2-135M-Instruct side by side with llama.cpp on this machine, in one run: plain
# causal prefill, the gist incremental path at batch 1 and 8, time to the first answer
# token from a stored gist state vs llama.cpp re-reading the text, and decode speed after
# the document (ours from its gist state, llama.cpp after its prefill).
#
#   PYTHON=venv/bin/python scripts/bench-smollm2.sh      # llama-cpp-python installed there
#
# LENGTHS (default "2048 8192"), TEXT (default: a bundled book), WEIGHTS (our GGUF weight
# mode, default dequantized), OUT (default: bench-smollm2/).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=$(scripts/get-smollm2.sh)
TEXT=${TEXT:-data/texts/baum-american-fairy-tales.txt}
LENGTHS=${LENGTHS:-2048 8192}
WEIGHTS=${WEIGHTS:-dequantized}
OUT=${OUT:-bench-smollm2}
PYTHON=${PYTHON:-python3}
BIN=${GISTSTREAM_BIN:-target/release/giststream}
export RAYON_NUM_THREADS=2
mkdir -p "$OUT"
[ -x "$BIN" ] || cargo build --release --bin giststream
"$BIN" bench --model "$GGUF" --text "$TEXT" --weights "$WEIGHTS" \
  --paths full-attention,incremental,incremental-batched,ttft-gist,decode-gist --batch 8 \
  --lengths "${LENGTHS// /,}" --json "$OUT/ours.json"
"$PYTHON" scripts/bench_llamacpp.py "$GGUF" "$TEXT" $LENGTHS | tee "$OUT/llama_cpp.jsonl"
