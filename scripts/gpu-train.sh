#!/usr/bin/env bash
# One GPU lease: train the shipped model family and evaluate it, in one prepared run.
#
# Inputs in .gpu/ (made on the CPU machine; see README "Training the shipped model"):
#   giststream-cuda.gz    scripts/build-cuda.sh output, recompressed with gzip (the GPU
#                         machines have no zstd)
#   tokenizer.json        giststream train-tokenizer on the training corpus
#   corpus.tar.gz         train/ and valid/ folders of .txt books
# Writes to $OUT: log.txt, check.json (CPU vs GPU), eval.jsonl, and one tar per model.
#
# BIN, DEVICE, SECONDS_PER_RUN, MODELS (default "full ng1 ng2 ng4"), PARALLEL (1: all runs
# at once; 0: one after another) and EVAL (0 to skip) may be overridden (a CPU dry run:
# BIN=target/release/giststream DEVICE=cpu SECONDS_PER_RUN=20).
#
# Runs started together calibrate their time budget while the others still prepare data,
# then slow down as they share the GPU: with PARALLEL=1 a run can overshoot its budget by
# the number of runs. One after another is the safe choice on a short lease.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
DEVICE=${DEVICE:-cuda}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-300}
MODELS=${MODELS:-"full ng1 ng2 ng4"}
PARALLEL=${PARALLEL:-0}
EVAL=${EVAL:-1}
WORK=$(mktemp -d)
date
if [ -z "${BIN:-}" ]; then
  BIN=$WORK/giststream
  gzip -dc .gpu/giststream-cuda.gz > "$BIN" && chmod +x "$BIN"
  for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
    $(python3 -c 'import nvidia,os;print(*[os.path.join(p,"cu13","lib") for p in nvidia.__path__])' 2>/dev/null); do
    [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia,os;print(*[os.path.join(p,"curand","lib") for p in nvidia.__path__])' 2>/dev/null); do
    [ -e "$d/libcurand.so.10" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
  done
  ldd "$BIN" | grep -E "cuda|cublas|curand"
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi
tar -C "$WORK" -xzf .gpu/corpus.tar.gz

echo "== smoke: incremental path on $DEVICE"
"$BIN" bench --one incremental --lengths 512 --device "$DEVICE" || exit 1

echo "== CPU vs $DEVICE: perplexity of a random tiny model, f32 on both"
"$BIN" train --tokenizer .gpu/tokenizer.json --data data/texts --out "$WORK/rand" \
  --tokens 2048 --batch 2 --micro-batch 2 --seq-tokens 64 --device cpu >/dev/null 2>&1
for dev in cpu "$DEVICE"; do
  "$BIN" eval --model "$WORK/rand" --data data/texts --max-tokens 1024 --device "$dev" --json
done | tee "$OUT/check.json"

echo "== training $MODELS, ${SECONDS_PER_RUN}s each (parallel=$PARALLEL)"
common=(--tokenizer .gpu/tokenizer.json --data "$WORK/train" --device "$DEVICE" --tokens 400000000
        --batch 32 --micro-batch 32 --seq-tokens 256 --lr 2e-3 --checkpoint-every 200
        --max-seconds "$SECONDS_PER_RUN" --save-dtype bf16)
train_one() {
  local m=$1 extra=(--attention full)
  [ "$m" != full ] && extra=(--num-gists "${m#ng}")
  "$BIN" train "${common[@]}" "${extra[@]}" --out "$WORK/$m" > "$OUT/$m.log" 2>&1
  echo "-- $m: exit $?"; tail -c 300 "$OUT/$m.log"; echo
  rm -rf "$WORK/$m/checkpoint"
  tar -C "$WORK" -cf "$OUT/$m.tar" "$m"
}
for m in $MODELS; do
  if [ "$PARALLEL" = 1 ]; then train_one "$m" & else train_one "$m"; fi
done
wait
[ "$EVAL" = 1 ] || { date; exit 0; }

echo "== evaluation on valid/ (first 8192 tokens of each book)"
args=()
for m in $MODELS; do
  if [ "$m" = full ]; then args+=(--baseline "$WORK/full"); else args+=(--model "$WORK/$m"); fi
done
"$BIN" eval "${args[@]}" --data "$WORK/valid" --max-tokens 8192 --device "$DEVICE" --json | tee "$OUT/eval.jsonl"
date
