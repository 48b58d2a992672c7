#!/usr/bin/env bash
# One prepared GPU lease (GPU.md: build here, ship one file, run there), under 10 minutes:
#
#   1. the CUDA binary: unpacked, ldd (every CUDA library must resolve), nvidia-smi;
#   2. smoke: one short incremental run on the GPU;
#   3. equivalence: `giststream crosscheck` of the GPU in f32 and in bf16 against the CPU
#      in f32 (the shipped model, every path; tolerances in src/bench/crosscheck.rs);
#   4. ours, on a Llama-3.2-1B-shaped model with random bf16 weights: the incremental path
#      for 1, 8 and 32 documents of 16k tokens on the slots engine (the GPU default);
#   5. the paper's reference code on the same workload and GPU: its scrooge prefill and its
#      dense-mask forward;
#   then, in the time left: 32 documents on the per-document engine, plain transformers
#   causal attention (a ceiling), our parallel and full-attention forwards, and 64
#   documents on slots;
#   6. results.json and table.md: tokens/s, peak GPU memory, share of the chip's bf16
#      peak, and our batched path's ratio to the reference's best prefill.
#
# Each step writes what it measured as soon as it has it, under $OUT, so a step that fails
# or times out loses nothing done before it; steps that would pass DEADLINE are skipped
# and said so, and the summary is always written. Prepared on a CPU machine by
# scripts/gpu-pack.sh into .gpu/bench/; the lease runs, from the repository root:
#
#   bash scripts/gpu-bench.sh          (carry: .gpu/bench)
#
# Peak GPU memory is nvidia-smi's memory.used sampled every 20 ms while each measurement
# runs, minus the reading before it started (the CUDA context included, on both sides);
# the reference also reports PyTorch's allocator peak.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out/gpu}
PACK=${PACK:-$PWD/.gpu/bench}
TOKENS=${TOKENS:-16384}
# DEVICE=cpu DTYPE=f32 GISTSTREAM_BIN=target/release/giststream (with a stub nvidia-smi on
# PATH) rehearses the plumbing on a CPU machine.
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
BATCHES=${BATCHES:-"8 32"}
WORK=${WORK:-/tmp/giststream-gpu}
# Seconds from the start by which every measurement must be over, leaving time for the
# summary inside one 600-second command.
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT" "$WORK"
BIN=$WORK/giststream
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/steps.log"; }

# Runs a command under `timeout`, sampling GPU memory; appends its JSON line (the command's
# last stdout line) with gpu_peak_used added, or a line saying why it has none.
measure() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "{\"name\": \"$name\", \"failed\": \"not run: out of time\"}" >> "$RESULTS"
    log "$name not run: out of time"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local samples=$WORK/mem.$name
  local before
  before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$samples" &
  local sampler=$!
  timeout "$limit" "$@" > "$WORK/out.$name" 2> "$OUT/$name.stderr"
  local rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  local peak
  peak=$(sort -n "$samples" | tail -1)
  local line
  line=$(grep '^{' "$WORK/out.$name" | tail -1)
  if [ $rc -eq 0 ] && [ -n "$line" ]; then
    python3 - "$line" "$name" "${peak:-0}" "${before:-0}" >> "$RESULTS" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
r["name"] = sys.argv[2]
r["gpu_peak_used"] = (int(sys.argv[3]) - int(sys.argv[4])) * 2**20
print(json.dumps(r))
PY
    log "$name: $(python3 -c 'import json,sys; print("{:,.0f} tok/s".format(json.loads(sys.argv[1])["tokens_per_second"]))' "$line"), peak GPU $(( ${peak:-0} - ${before:-0} )) MiB"
  else
    local why="exit $rc"
    [ $rc -eq 124 ] && why="timed out after $limit s"
    echo "{\"name\": \"$name\", \"failed\": \"$why\", \"stderr\": $(tail -c 600 "$OUT/$name.stderr" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" >> "$RESULTS"
    log "$name FAILED ($why): $(tail -c 300 "$OUT/$name.stderr")"
  fi
}

# 1. The binary and its libraries.
if [ -n "${GISTSTREAM_BIN:-}" ]; then
  BIN=$GISTSTREAM_BIN
else
  log "unpacking"
  gunzip -c "$PACK/giststream-cuda.gz" > "$BIN" && chmod +x "$BIN"
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
  $(python3 -c 'import nvidia,os;print(*[os.path.join(p,"cu13","lib") for p in nvidia.__path__])' 2>/dev/null); do
  [ -e "$d/libcublas.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
ldd "$BIN" > "$OUT/ldd.txt" 2>&1
grep -E "cuda|cublas|curand|nvrtc" "$OUT/ldd.txt" | tee -a "$OUT/steps.log"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
log "GPU: $GPU"
if grep -q "not found" "$OUT/ldd.txt"; then
  log "a library does not resolve: stopping"
  exit 1
fi
"$BIN" --version | tee -a "$OUT/steps.log"
log "binary built from $(cat "$PACK/commit" 2>/dev/null || echo "an unrecorded commit"); tree at $(git rev-parse HEAD 2>/dev/null)"

# 2. Smoke.
measure smoke 120 "$BIN" bench --one incremental --lengths 256 --device "$DEVICE" --dtype "$DTYPE"

# 3. Equivalence with the CPU.
for dt in "$DTYPE" f32; do
  log "crosscheck $dt"
  timeout 180 "$BIN" crosscheck --device "$DEVICE" --dtype "$dt" --json "$OUT/crosscheck-$dt.json" \
    > /dev/null 2> "$OUT/crosscheck-$dt.stderr"
  log "crosscheck $dt: exit $? $(tail -4 "$OUT/crosscheck-$dt.stderr")"
done

# 4. Ours on the 1B shape.
M=$WORK/llama-3.2-1b
ONE=("$BIN" bench --shape llama-3.2-1b --model-dir "$M" --device "$DEVICE" --dtype "$DTYPE" --lengths "$TOKENS")
measure ours-incremental-1 240 "${ONE[@]}" --one incremental
for b in $BATCHES; do
  measure "ours-incremental-$b" 240 "${ONE[@]}" --one incremental-batched --batch "$b"
done

# 5. The reference code, one document at a time (its prefill supports batch 1 only).
REF=$WORK/reference
PY=$WORK/py
mkdir -p "$REF" "$PY"
tar xzf "$PACK/reference-src.tar.gz" -C "$REF"
for w in "$PACK"/wheels/*.whl; do python3 -m zipfile -e "$w" "$PY"; done
export PYTHONPATH=$PY REFERENCE_DIR=$REF TQDM_DISABLE=1
# PyTorch brings its own CUDA libraries: keep ours off its path.
PYTHON=${PYTHON:-python3}
PYRUN=(env -u LD_LIBRARY_PATH "$PYTHON")
"${PYRUN[@]}" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$OUT/steps.log"
reference() {
  measure "reference-$1" 240 "${PYRUN[@]}" scripts/bench_reference.py --mode "$1" \
    --tokens "$TOKENS" --shape llama-3.2-1b --device "$DEVICE" --dtype "$DTYPE"
}
reference scrooge
reference dense

# Then what explains the numbers: the per-document engine at the largest batch, plain
# causal prefill in transformers, and our whole-document forwards of one document.
B=${BATCHES##* }
measure "ours-incremental-$B-per-document" 240 "${ONE[@]}" --one incremental-batched \
  --batch "$B" --incremental per-document
reference causal
measure ours-parallel 120 "${ONE[@]}" --one parallel
measure ours-full-attention 120 "${ONE[@]}" --one full-attention
# How far the batch scales past the issue's 32 documents (1M tokens), if time is left.
measure ours-incremental-64 180 "${ONE[@]}" --one incremental-batched --batch 64

# 6. Summary.
python3 - "$RESULTS" "$GPU" "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gpu, out = sys.argv[2], sys.argv[3]
# Dense bf16 tensor-core peak (no sparsity), from NVIDIA's data sheets.
peak = 756e12 if "PCIe" in gpu else 989.4e12 if ("H100" in gpu or "H200" in gpu) else None
by = {r["name"]: r for r in rows}
# The reference does the same useful work as our path of the same shape and length: its
# FLOPs are taken from our measurement of that work (gist attention for scrooge and dense,
# causal for transformers).
same_work = {"reference-scrooge": "ours-incremental-1", "reference-dense": "ours-incremental-1",
             "reference-causal": "ours-full-attention"}
for r in rows:
    if "failed" in r:
        continue
    flops = r.get("flops")
    if flops is None and same_work.get(r["name"]) in by:
        flops = by[same_work[r["name"]]].get("flops")
    if flops and peak:
        r["share_of_bf16_peak"] = flops / r["seconds"] / peak
ref = [by[n]["tokens_per_second"] for n in ("reference-scrooge", "reference-dense")
       if n in by and "failed" not in by[n]]
best_ref = max(ref) if ref else None
summary = {"gpu": gpu, "bf16_peak_flops": peak, "rows": rows, "reference_best_tokens_per_second": best_ref}
for r in rows:
    if best_ref and r["name"].startswith("ours-incremental") and "failed" not in r:
        r["ratio_to_reference_best"] = r["tokens_per_second"] / best_ref
cc = {}
for dt in ("f32", "bf16", "f16"):
    try:
        cc[dt] = json.load(open(f"{out}/crosscheck-{dt}.json"))
    except FileNotFoundError:
        if dt != "f16":
            cc[dt] = {"error": f"no crosscheck-{dt}.json (see crosscheck-{dt}.stderr)"}
summary["crosscheck"] = cc
json.dump(summary, open(f"{out}/results.json", "w"), indent=1)
lines = [f"GPU: {gpu}", "",
         "| run | documents | tokens/s | peak GPU memory | share of bf16 peak | vs reference best |",
         "|---|---|---|---|---|---|"]
for r in rows:
    if "failed" in r:
        lines.append(f"| {r['name']} | | failed: {r['failed']} | | | |")
        continue
    share = f"{100 * r['share_of_bf16_peak']:.1f}%" if "share_of_bf16_peak" in r else ""
    ratio = f"{r['ratio_to_reference_best']:.2f}x" if "ratio_to_reference_best" in r else ""
    lines.append(f"| {r['name']} | {r.get('documents', 1)} | {r['tokens_per_second']:,.0f} | "
                 f"{r['gpu_peak_used'] / 2**30:.1f} GiB | {share} | {ratio} |")
lines.append("")
for dt, c in cc.items():
    if "paths" in c:
        tol = c["tolerance"]
        for p in c["paths"]:
            parts = []
            if "logits" in p:
                l = p["logits"]
                parts.append(f"max |dlogit| {l['max_abs_diff']:.3e} ({l['max_relative_diff']:.3e} "
                             f"of the spread, tolerance {tol['max_relative_logit_diff']}), "
                             f"top-1 {l['top1_agreement']:.4f}")
            if "mean_abs_nll_diff" in p:
                parts.append(f"mean |dNLL| {p['mean_abs_nll_diff']:.2e} (tolerance {tol['max_mean_abs_nll_diff']})")
            if "states" in p:
                parts.append(f"states {p['states']['max_relative_diff']:.3e} of the spread "
                             f"(tolerance {tol['max_relative_state_diff']})")
            if p["exceeded"]:
                parts.append(f"EXCEEDED: {p['exceeded']}")
            lines.append(f"crosscheck {dt} {p['path']}: " + ", ".join(parts))
    else:
        lines.append(f"crosscheck {dt}: {c}")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
log "done"
