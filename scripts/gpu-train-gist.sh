#!/usr/bin/env bash
# The SmolLM2 gist adapter at full scale, on one GPU lease (parts prepared by
# scripts/gpu-pack-gist.sh; read its header first). Each call stashes the parts it
# carries; the call that completes the set reassembles the files (checked by sha256),
# then, in one command under 10 minutes:
#   1. trains the adapter from the base GGUF: the recipe of models/smollm2-gist, larger
#      (rank RANK, sequences of SEQ tokens, batches of BATCH, for TRAIN_SECONDS), each
#      document MEMORY_SPAN consecutive sequences long (`train --memory-span`: later
#      sequences read the earlier ones' gists, so the adapter learns to read far back),
#      with the previous sentence kept visible (WINDOW=1, the default: gist.json
#      `previous_sentence_visible`, 1.13x the ceiling at 2k against 1.31x on the CPU),
#      and BOS read at most SINK positions before each sentence (gist.json
#      `sink_distance`, 128 as shipped; 0: off), keys read from farther than FROM
#      positions faded by (FROM / d)^STRENGTH (DECAY=STRENGTH,FROM, gist.json
#      `distance_decay`, 1,256 as shipped; empty: off);
#      Held-out valid/ is scored every 50 steps (`train --valid`: the validation curve);
#   2. evaluates it on valid/ against the base (ceiling: full attention; floor: each
#      sentence alone) at 2k tokens per book;
#   3. with QA_SECONDS > 0 (default 0: off), trains the adapter on from there on
#      questions over compressed text (`train --qa`, data from scripts/make-qa.py on
#      train/, QA_BATCH questions a step) and asks both adapters QA_EVAL (100) held-out questions
#      (`eval-qa`, made from valid/): $OUT/qa/ holds that adapter, qa-eval-before.jsonl
#      and qa-eval.jsonl. TRAIN_SECONDS + QA_SECONDS + the evaluations must fit the
#      10-minute call: e.g. TRAIN_SECONDS=240 QA_SECONDS=120 QA_EVAL=50 (a guess: the
#      evaluations have not been timed on a GPU);
#   4. writes to $OUT: the adapter folder's three files (bf16), train-log.jsonl,
#      valid-log.jsonl, eval.jsonl
#      and log.txt.
# Copy $OUT's files to models/smollm2-gist/ (after checking eval.jsonl) to ship them.
#
# A rehearsal on a CPU machine: BIN=target/release/giststream DEVICE=cpu TRAIN_SECONDS=60
# RANK=4 SEQ=256 BATCH=2 EVAL_TOKENS=256 bash scripts/gpu-train-gist.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out/gist}
PACK=${PACK:-.gpu/gist}
STASH=${STASH:-.gpu-stash/gist}
DEVICE=${DEVICE:-cuda}
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
RANK=${RANK:-64}
SEQ=${SEQ:-4096}
BATCH=${BATCH:-16}
# N_g 2: chosen by the README's N_g study (half the state, far less loss far back).
NG=${NG:-2}
MEMORY_SPAN=${MEMORY_SPAN:-3}
WINDOW=${WINDOW:-1}
SINK=${SINK:-128}
DECAY=${DECAY-1,256}
EVAL_TOKENS=${EVAL_TOKENS:-2048}
QA_SECONDS=${QA_SECONDS:-0}
QA_BATCH=${QA_BATCH:-32}
QA_EVAL=${QA_EVAL:-100}
mkdir -p "$OUT" "$STASH"
exec > >(tee -a "$OUT/log.txt") 2>&1
date
[ -f "$PACK/manifest" ] || { echo "no $PACK/manifest: run scripts/gpu-pack-gist.sh first"; exit 2; }
for p in "$PACK"/[0-9][0-9]; do [ -e "$p" ] && cp "$p" "$STASH/" && echo "stashed $(basename "$p")"; done
parts=$(awk '$1 == "parts" {print $2}' "$PACK/manifest")
have=$(ls "$STASH" | grep -c '^[0-9][0-9]$')
if [ "$have" -lt "$parts" ]; then
  echo "have $have of $parts parts: call again with the next one (within the idle release)"
  exit 0
fi
WORK=${WORK:-/tmp/giststream-gist}
mkdir -p "$WORK"
# Reassemble: the parts in order are the files one after another.
cat "$STASH"/[0-9][0-9] > "$WORK/stream"
offset=0
while read -r kind name size sha; do
  [ "$kind" = file ] || continue
  tail -c +$(( offset + 1 )) "$WORK/stream" | head -c "$size" > "$WORK/$name"
  echo "$sha  $WORK/$name" | sha256sum --check --status || { echo "$name: sha256 mismatch"; exit 1; }
  offset=$(( offset + size ))
done < "$PACK/manifest"
rm -f "$WORK/stream"
# The base keeps its own name: the adapter records it, and finds it beside its folder.
BASE=$WORK/$(awk '$1 == "file" && $2 ~ /\.gguf$/ {print $2}' "$PACK/manifest")
tar -C "$WORK" -xzf "$WORK/corpus.tar.gz"
if [ -z "${BIN:-}" ]; then
  BIN=$WORK/giststream
  gzip -dc "$WORK/giststream-cuda.gz" > "$BIN" && chmod +x "$BIN"
  for d in /usr/local/cuda/lib64 \
    $(python3 -c 'import nvidia,os;print(*[os.path.join(p,"cu13","lib") for p in nvidia.__path__])' 2>/dev/null); do
    [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  ldd "$BIN" | grep -E "cuda|cublas|curand"
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi

echo "== training: rank $RANK, N_g $NG, compressed positions, kept BOS, previous sentence visible $WINDOW, sink distance $SINK, distance decay ${DECAY:-off}, $SEQ-token sequences, memory span $MEMORY_SPAN, ${TRAIN_SECONDS}s"
# A rerun on the same warm machine trains afresh: an earlier call's checkpoint would make
# `train` refuse, and its adapter would be evaluated and returned as if new.
rm -rf "$WORK/adapter"
"$BIN" train --from "$BASE" --adapter-rank "$RANK" --adapter-alpha $(( 2 * RANK )) \
  --positions compressed --keep-bos $( [ "$WINDOW" = 1 ] && echo --previous-sentence-visible ) \
  $( [ "$SINK" != 0 ] && echo --sink-distance "$SINK" ) \
  $( [ -n "$DECAY" ] && echo --distance-decay "$DECAY" ) \
  --num-gists "$NG" --data "$WORK/corpus/train" --out "$WORK/adapter" \
  --tokens 100000000 --batch "$BATCH" --micro-batch "$BATCH" --seq-tokens "$SEQ" --lr 1e-3 \
  --memory-span "$MEMORY_SPAN" --valid "$WORK/corpus/valid" --valid-every 50 \
  --warmup-steps 20 --checkpoint-every 50 --max-seconds "$TRAIN_SECONDS" --save-dtype bf16 \
  --device "$DEVICE"
rc=$?
echo "-- train exit $rc"
[ "$rc" = 0 ] || exit "$rc"
cp "$WORK/adapter/train-log.jsonl" "$WORK/adapter/valid-log.jsonl" "$OUT/" 2>/dev/null
for f in adapter.json gist.json adapter.safetensors; do cp "$WORK/adapter/$f" "$OUT/" 2>/dev/null; done

echo "== evaluation on valid/, $EVAL_TOKENS tokens per book"
"$BIN" eval --model "$WORK/adapter" --baseline "$BASE" --floor "$BASE" \
  --data "$WORK/corpus/valid" --max-tokens "$EVAL_TOKENS" --device "$DEVICE" --json | tee "$OUT/eval.jsonl"
if [ "$QA_SECONDS" -gt 0 ]; then
  echo "== questions over compressed text: ${QA_SECONDS}s, $QA_BATCH questions a step"
  python3 scripts/make-qa.py --books "$WORK/corpus/train" --count 20000 --seed 1 > "$WORK/qa-train.jsonl"
  python3 scripts/make-qa.py --books "$WORK/corpus/valid" --count "$QA_EVAL" --seed 101 > "$WORK/qa-valid.jsonl"
  rm -rf "$WORK/adapter-qa"
  "$BIN" train --from "$BASE" --init-adapter "$WORK/adapter" --qa "$WORK/qa-train.jsonl" \
    --out "$WORK/adapter-qa" --seq-tokens 1024 --batch "$QA_BATCH" --micro-batch "$QA_BATCH" \
    --tokens 100000000 --lr 2e-4 --warmup-steps 10 --checkpoint-every 50 \
    --max-seconds "$QA_SECONDS" --save-dtype bf16 --device "$DEVICE"
  rc=$?
  echo "-- train --qa exit $rc"
  [ "$rc" = 0 ] || exit "$rc"
  mkdir -p "$OUT/qa"
  for f in adapter.json gist.json adapter.safetensors train-log.jsonl; do cp "$WORK/adapter-qa/$f" "$OUT/qa/" 2>/dev/null; done
  "$BIN" eval-qa --model "$WORK/adapter" --qa "$WORK/qa-valid.jsonl" --device "$DEVICE" > "$OUT/qa-eval-before.jsonl"
  "$BIN" eval-qa --model "$WORK/adapter-qa" --qa "$WORK/qa-valid.jsonl" --device "$DEVICE" > "$OUT/qa-eval.jsonl"
  tail -n 1 "$OUT/qa-eval-before.jsonl" "$OUT/qa-eval.jsonl"
fi
date
