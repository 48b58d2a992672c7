#!/usr/bin/env bash
# Train the shipped model family on a CPU machine, equal tokens for every model.
#
#   scripts/cpu-train.sh CORPUS_DIR TOKENIZER OUT_DIR
#
# CORPUS_DIR holds train/ (and valid/ for the evaluation afterwards); TOKENIZER comes from
# `giststream train-tokenizer`. Trains the full-attention baseline and N_g = 1, 2, 4 with
# the same seed, data order and token budget (TOKENS, default 4M regular tokens), JOBS runs
# at a time (default 2, one thread each: candle's thread pools spin-wait and fight on
# 2 cores, so two single-threaded runs beat one two-threaded run). Runs are niced, so a
# build on the same machine still gets the CPU. Kill it and start it again: each run
# resumes from its checkpoint (a finished run only rewrites its files).
set -euo pipefail
CORPUS=$1 TOKENIZER=$2 OUT=$3
BIN=${BIN:-target/release/giststream}
TOKENS=${TOKENS:-4000000}
JOBS=${JOBS:-2}
MODELS=${MODELS:-"ng4 full ng1 ng2"}
export CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1
# glibc malloc settings from GIST.md: about 30% faster training steps.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456
mkdir -p "$OUT"
train_one() {
  local m=$1 extra=(--attention full)
  [ "$m" != full ] && extra=(--num-gists "${m#ng}")
  local resume=()
  [ -e "$OUT/$m/checkpoint" ] && resume=(--resume)
  nice -n 19 "$BIN" train "${resume[@]}" --tokenizer "$TOKENIZER" --data "$CORPUS/train" \
    --out "$OUT/$m" "${extra[@]}" --tokens "$TOKENS" --batch 8 --micro-batch 8 \
    --seq-tokens 512 --lr 2e-3 --checkpoint-every 25 --seed 1 --save-dtype bf16 \
    > "$OUT/$m.log" 2>&1
  echo "$m: trained"
}
running=0
for m in $MODELS; do
  train_one "$m" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
