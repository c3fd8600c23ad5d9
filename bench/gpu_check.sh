#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): unlearn's step with su and graddiff on a ~100M Llama, bf16, ZeRO-2 then ZeRO-3.
#
#   bash bench/gpu_check.sh prep   here (with network): put the wheels the GPU machine lacks into bench/gpu_wheels/
#   bash bench/gpu_check.sh run    on the GPU machine (no network): install those wheels, run, log into $OUT
#   bash bench/gpu_check.sh tiny   the run's logic on a toy model, on CPU: checks the script, measures nothing
#
# The GPU machine's python3 has torch (CUDA), transformers, peft and pyarrow; this adds deepspeed and its
# dependencies only. One run takes a few minutes; stop it at 8.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/gpu_wheels
MAX_MIB=64
PY=${PYTHON:-python3}
# deepspeed's requirements beyond torch/numpy/tqdm/packaging (pydantic-core and msgpack are built per CPython)
PURE=(hjson py-cpuinfo einops pydantic annotated-types typing-inspection typing-extensions)
BINARY=(ninja msgpack pydantic-core psutil pyyaml)
DEEPSPEED=deepspeed==0.19.8

prep() {
  mkdir -p "$WHEELS"
  "$PY" -m pip wheel -q --no-deps "$DEEPSPEED" -w "$WHEELS"  # an sdist on PyPI: built here, pure Python
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${PURE[@]}"
  for version in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --python-version "$version" -d "$WHEELS" "${BINARY[@]}"
  done
  local mib
  mib=$(du -sm "$WHEELS" | cut -f1)
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files, ${mib} MiB"
  if [ "$mib" -gt "$MAX_MIB" ]; then echo "error: over ${MAX_MIB} MiB" >&2; exit 1; fi
}

run() {
  local out=${OUT:-./gpu_check_out}
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed
  fi
  export TORCH_EXTENSIONS_DIR="$out/torch_extensions" TOKENIZERS_PARALLELISM=false
  PYTHONPATH=$PWD timeout 480 "$PY" bench/gpu_check.py --out "$out" "$@"
}

case "${1:-}" in
  prep) prep ;;
  run) shift; run "$@" ;;
  tiny) shift; run --tiny --steps 3 "$@" ;;
  *) echo "usage: bash bench/gpu_check.sh prep | run | tiny" >&2; exit 2 ;;
esac
