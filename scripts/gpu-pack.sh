#!/usr/bin/env bash
# Prepares .gpu/bench/ for a GPU lease (scripts/gpu-bench.sh), on this CPU machine:
#   - giststream-cuda.gz: the CUDA build (scripts/build-cuda.sh; GPU machines have gzip,
#     not zstd);
#   - wheels/: transformers 4.53.0 and the packages its import checks pin (the reference
#     needs that version; the GPU machine has no package registry);
#   - reference-src.tar.gz: the paper's reference code (REFERENCE_DIR, a checkout of
#     github.com/mrsndmn/sentence_attention), for the side-by-side run only.
# Then run there:  bash scripts/gpu-bench.sh   with carry [".gpu/bench"]  (under 64 MiB).
#
#   REFERENCE_DIR=/path/to/sentence_attention scripts/gpu-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REFERENCE_DIR:?set REFERENCE_DIR to a checkout of github.com/mrsndmn/sentence_attention}"
PACK=.gpu/bench
mkdir -p "$PACK/wheels"
scripts/build-cuda.sh
cp target/giststream-cuda.gz "$PACK/giststream-cuda.gz"
PIP=${PIP:-pip3}
"$PIP" download -q --no-deps -d "$PACK/wheels" --only-binary=:all: \
  --platform manylinux2014_x86_64 --python-version 3.12 \
  "transformers==4.53.0" "tokenizers==0.21.4" "huggingface_hub==0.36.2" "safetensors==0.6.2"
tar czf "$PACK/reference-src.tar.gz" -C "$REFERENCE_DIR" src
# Which source the binary is: a later session checks it before spending a lease on it.
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && echo dirty; } \
  > "$PACK/commit" || true
du -sh "$PACK"/* "$PACK"
