#!/usr/bin/env bash
# Prepares a GPU lease that trains the SmolLM2 gist adapter at full scale
# (scripts/gpu-train-gist.sh), on this CPU machine.
#
# What the lease needs is more than one call may carry (the working tree that travels is
# at most 64 MiB): the CUDA binary (~28 MB), the SmolLM2 GGUF (98 MB) and the corpus. So
# everything is packed into .gpu/gist/ as numbered parts of at most PART_MB each, plus a
# manifest (each whole file's name, size and sha256, and the part count). Each call of the
# lease carries `.gpu/gist/manifest` and one or more parts; the script stashes the parts
# it gets in an ignored folder that stays on the warm machine between calls, and trains
# once every part is there. The calls must follow each other within the machine's idle
# release (30 s on an H200): prepare them, then make them back to back.
#
#   CORPUS=../shared/corpus scripts/gpu-pack-gist.sh
#   then, for each line it prints: run(command="bash scripts/gpu-train-gist.sh",
#                                      carry=[".gpu/gist/manifest", ".gpu/gist/NN"])
#
# GGUF: the base (default: scripts/get-smollm2.sh). SKIP_BUILD=1 reuses
# target/giststream-cuda.gz. TRAIN_MB: megabytes of training text packed (default 24).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu/gist
PART_MB=${PART_MB:-30}
TRAIN_MB=${TRAIN_MB:-24}
CORPUS=${CORPUS:-../shared/corpus}
GGUF=${GGUF:-$(scripts/get-smollm2.sh)}
rm -rf "$PACK" && mkdir -p "$PACK"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
grep -qxF '/.gpu-stash/' .git/info/exclude 2>/dev/null || echo '/.gpu-stash/' >> .git/info/exclude
[ "${SKIP_BUILD:-0}" = 1 ] || scripts/build-cuda.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp target/giststream-cuda.gz "$WORK/giststream-cuda.gz"
BASE=$(basename "$GGUF")
cp "$GGUF" "$WORK/$BASE"
# The corpus: valid/ whole, and books of train/ in manifest order up to TRAIN_MB.
mkdir -p "$WORK/corpus/train"
cp -r "$CORPUS/valid" "$WORK/corpus/valid"
total=0
for f in "$CORPUS"/train/*.txt; do
  size=$(stat -c %s "$f")
  [ "$total" -gt 0 ] && [ $(( total + size )) -gt $(( TRAIN_MB * 1000000 )) ] && break
  cp "$f" "$WORK/corpus/train/" && total=$(( total + size ))
done
tar -C "$WORK" -czf "$WORK/corpus.tar.gz" corpus && rm -rf "$WORK/corpus"
# One stream of the three files, cut into parts; the manifest says how to undo it.
: > "$PACK/manifest"
for f in giststream-cuda.gz "$BASE" corpus.tar.gz; do
  echo "file $f $(stat -c %s "$WORK/$f") $(sha256sum "$WORK/$f" | cut -d' ' -f1)" >> "$PACK/manifest"
done
cat "$WORK/giststream-cuda.gz" "$WORK/$BASE" "$WORK/corpus.tar.gz" \
  | split -b "${PART_MB}M" -d -a 2 - "$PACK/"
n=$(ls "$PACK" | grep -c '^[0-9][0-9]$')
echo "parts $n" >> "$PACK/manifest"
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && echo dirty; } \
  > "$PACK/commit" || true
cat "$PACK/manifest"
for p in $(ls "$PACK" | grep '^[0-9][0-9]$'); do
  echo "call: carry [\".gpu/gist/manifest\", \".gpu/gist/$p\"]"
done
