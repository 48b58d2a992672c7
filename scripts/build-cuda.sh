#!/usr/bin/env bash
# Builds `giststream` with `--features cuda` on a machine without a GPU (nor a CUDA install),
# as docs/GPU notes describe: the CUDA 13.0 toolchain from PyPI, a link-time stub for
# libcuda.so.1 (the driver library only a GPU machine has), sm_90 (H100/H200). Then strips
# and compresses the binary, and checks with LD_BIND_NOW that every CUDA symbol resolves.
#
#   scripts/build-cuda.sh            -> target/giststream-cuda.gz (the GPU machines have gzip,
#                                       not zstd)
#
# With a CUDA toolkit of your own, `cargo build --release --features cuda` is all it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STUB=$ROOT/target/cuda-stub
BIN=$ROOT/target/giststream-cuda

# The toolchain: a virtual environment made earlier, or pip --target (no python3-venv
# needed, as on CI).
PKGS=("nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-nvrtc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  "nvidia-curand==10.4.0.*" "nvidia-cublas==13.0.*")
VENV=${CUDA_VENV:-$ROOT/target/cuda-venv}
if [ -e "$VENV/.ready" ]; then
  CU=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
else
  PY=$ROOT/target/cuda-py
  if [ ! -e "$PY/.ready" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$PY" "${PKGS[@]}"
    touch "$PY/.ready"
  fi
  CU=$PY/nvidia/cu13
fi
[ -x "$CU/bin/nvcc" ] || { echo "no nvcc under $CU" >&2; exit 1; }

# The driver stub: every cu* function cudarc declares, returning an error code.
cargo fetch --quiet
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -1)
mkdir -p "$STUB"
grep -o '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDARC/src/driver/sys/mod.rs" | sort -u |
  awk '{print "int " $1 "(void){return 999;}"}' > "$STUB/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/libcuda_stub.c"
ln -sf libcuda.so.1 "$STUB/libcuda.so"
for l in libcublas libcublasLt libnvrtc libcudart; do
  ln -sf "$(ls "$CU"/lib/$l.so.13* | head -1)" "$STUB/$l.so"
done
ln -sf "$(ls "$CU"/lib/libcurand.so.10* | head -1)" "$STUB/libcurand.so"

# Keep this environment identical between builds: any change rebuilds nvcc's kernels.
export CUDA_HOME=$CU CUDA_ROOT=$CU CUDA_PATH=$CU NVCC=$CU/bin/nvcc PATH=$CU/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L native=$STUB"
cargo build --release --features cuda --target-dir "$ROOT/target/cuda"
cp "$ROOT/target/cuda/release/giststream" "$BIN"
strip "$BIN"
gzip -9 -c "$BIN" > "$BIN.gz"

# Symbol check: every CUDA symbol must resolve now (LD_BIND_NOW), and opening the device
# must fail in CUDA itself (the stub), not in the loader.
export LD_LIBRARY_PATH="$STUB:$CU/lib"
LD_BIND_NOW=1 "$BIN" --version
set +e
msg=$(LD_BIND_NOW=1 "$BIN" bench --one incremental --lengths 64 --device cuda 2>&1)
rc=$?
set -e
echo "$msg" | grep -v "^ *[0-9]*: \|^ *at " | head -3
if [ $rc -eq 127 ] || echo "$msg" | grep -q "error while loading shared libraries"; then
  echo "symbol check FAILED: the loader could not resolve the binary" >&2
  exit 1
fi
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc" || true
echo "built $BIN.gz ($(du -h "$BIN.gz" | cut -f1)); symbols resolve"
