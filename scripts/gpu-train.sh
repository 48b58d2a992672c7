#!/usr/bin/env bash
# One GPU lease: train the shipped model family and evaluate it, in one prepared run.
#
# Inputs in .gpu/ (made on the CPU machine; see README "Training the shipped model"):
#   giststream-cuda.zst   scripts/build-cuda.sh output
#   tokenizer.json        giststream train-tokenizer on the training corpus
#   corpus.tar.zst        train/ and valid/ folders of .txt books
# Writes to $OUT: log.txt, check.json (CPU vs GPU), eval.jsonl, and one tar per model.
#
# BIN, DEVICE and SECONDS_PER_RUN may be overridden (a CPU dry run: BIN=target/release/giststream
# DEVICE=cpu SECONDS_PER_RUN=20).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
DEVICE=${DEVICE:-cuda}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-300}
WORK=$(mktemp -d)
date
if [ -z "${BIN:-}" ]; then
  BIN=$WORK/giststream
  zstd -q -d .gpu/giststream-cuda.zst -o "$BIN" && chmod +x "$BIN"
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
tar -C "$WORK" --zstd -xf .gpu/corpus.tar.zst

echo "== smoke: incremental path on $DEVICE"
"$BIN" bench --one incremental --lengths 512 --device "$DEVICE" || exit 1

echo "== CPU vs $DEVICE: perplexity of a random tiny model, f32 on both"
"$BIN" train --tokenizer .gpu/tokenizer.json --data data/texts --out "$WORK/rand" \
  --tokens 2048 --batch 2 --micro-batch 2 --seq-tokens 64 --device cpu >/dev/null 2>&1
for dev in cpu "$DEVICE"; do
  "$BIN" eval --model "$WORK/rand" --data data/texts --max-tokens 1024 --device "$dev" --json
done | tee "$OUT/check.json"

echo "== training, 4 runs side by side, ${SECONDS_PER_RUN}s each"
common=(--tokenizer .gpu/tokenizer.json --data "$WORK/train" --device "$DEVICE" --tokens 400000000
        --batch 32 --micro-batch 32 --seq-tokens 256 --lr 2e-3 --checkpoint-every 200
        --max-seconds "$SECONDS_PER_RUN" --save-dtype bf16)
"$BIN" train "${common[@]}" --attention full --out "$WORK/full" > "$WORK/full.log" 2>&1 &
for ng in 1 2 4; do
  "$BIN" train "${common[@]}" --num-gists $ng --out "$WORK/ng$ng" > "$WORK/ng$ng.log" 2>&1 &
done
wait
for m in full ng1 ng2 ng4; do
  echo "-- $m"; tail -c 600 "$WORK/$m.log"; echo
  tail -1 "$WORK/$m/train-log.jsonl"
  cp "$WORK/$m/train-log.jsonl" "$WORK/$m/train-log.jsonl.keep" 2>/dev/null
  rm -rf "$WORK/$m/checkpoint"
  tar -C "$WORK" -cf "$OUT/$m.tar" "$m"
done

echo "== evaluation on valid/ (first 8192 tokens of each book)"
"$BIN" eval --model "$WORK/ng1" --model "$WORK/ng2" --model "$WORK/ng4" --baseline "$WORK/full" \
  --data "$WORK/valid" --max-tokens 8192 --device "$DEVICE" --json | tee "$OUT/eval.jsonl"
date
