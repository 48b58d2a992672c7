#!/usr/bin/env bash
# Side by side, in one run on one machine: `giststream bench` and the paper's reference code
# (scripts/bench_reference.py) on the same workload. Writes bench-out/results.json and
# prints a markdown table.
#
#   REFERENCE_DIR=/path/to/sentence_attention PYTHON=venv/bin/python scripts/bench-vs-reference.sh
#
# LENGTHS (default "2048 16384 65536"), THREADS (default 2, both sides) and BATCH (8) can be
# set. The reference's dense-mask forward is skipped where its T x T float mask alone would
# not fit in memory (over 16 GiB at 64k tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REFERENCE_DIR:?set REFERENCE_DIR to a checkout of github.com/mrsndmn/sentence_attention}"
PYTHON=${PYTHON:-python3}
LENGTHS=${LENGTHS:-"2048 16384 65536"}
THREADS=${THREADS:-2}
BATCH=${BATCH:-8}
OUT=bench-out
mkdir -p "$OUT"
cargo build --release --quiet
export RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS
: > "$OUT/results.jsonl"
for n in $LENGTHS; do
  for p in incremental incremental-batched parallel full-attention; do
    ./target/release/giststream bench --one "$p" --lengths "$n" --batch "$BATCH" | tee -a "$OUT/results.jsonl"
  done
  for m in causal scrooge dense; do
    seq=$(( n * 31 / 27 ))
    if [ "$m" = dense ] && [ $(( seq * seq * 4 )) -gt $(( 16 * 1024 * 1024 * 1024 )) ]; then
      echo "{\"path\": \"reference-dense\", \"tokens\": $n, \"skipped\": \"a ${seq}x${seq} f32 mask needs $(( seq * seq * 4 / 1073741824 )) GiB\"}" | tee -a "$OUT/results.jsonl"
      continue
    fi
    REFERENCE_DIR=$REFERENCE_DIR "$PYTHON" scripts/bench_reference.py --mode "$m" --tokens "$n" --threads "$THREADS" | tee -a "$OUT/results.jsonl"
  done
done
"$PYTHON" - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump(rows, open(sys.argv[1].replace(".jsonl", ".json"), "w"), indent=1)
lengths = sorted({r["tokens"] for r in rows})
paths = list(dict.fromkeys(r["path"] for r in rows))
get = {(r["path"], r["tokens"]): r for r in rows}
print("| path | " + " | ".join(f"{n // 1024}k tok/s | {n // 1024}k peak RSS" for n in lengths) + " |")
print("|---" * (1 + 2 * len(lengths)) + "|")
for p in paths:
    cells = []
    for n in lengths:
        r = get.get((p, n))
        if r is None:
            cells += ["", ""]
        elif "skipped" in r:
            cells += ["not run", r["skipped"]]
        else:
            mem = f"{r['peak_rss'] / 2**20:,.0f} MiB"
            if r.get("state_allocated"):
                mem += f" ({r['state_allocated'] / 2**20:,.0f} state)"
            cells += [f"{r['tokens_per_second']:,.0f}", mem]
    print(f"| {p} | " + " | ".join(cells) + " |")
PY
