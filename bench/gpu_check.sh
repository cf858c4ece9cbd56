#!/usr/bin/env bash
# Issue 11's whole GPU path in one call, for a session that is lent a GPU (15 minutes of device
# time in all, so one prepared call, about 9 minutes). It installs what the GPU image lacks from the
# carried wheels (.whl/, made by `make gpu-wheels`), then bench/gpu_check.py runs every part with its
# own timeout, writes logs + JSON under $OUT (default ./gpu_out) and prints the table last.
#
#   bash bench/gpu_check.sh            # on the GPU machine: bench/README.md, "GPU check"
#   bash bench/gpu_check.sh --only b   # one part again, e.g. on a still-warm machine
#   bash bench/gpu_check.sh --dry-run  # here, on CPU: wheels under the carry limit, every part starts
set -u
START=$(date +%s)
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ "${1:-}" = "--dry-run" ]; then
    shift
    PY=${PYTHON:-$REPO/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    exec "$PY" bench/gpu_check.py run --out "$OUT" --dry-run --started "$START" "$@"
fi

# The image's python3 has torch, triton, transformers and peft; deepspeed, bitsandbytes, datasets
# and their missing needs come from the wheels, mtpeft from this checkout.
SITE=/tmp/site
if timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >"$OUT/setup.log" 2>&1; then
    INSTALL=ok
else
    INSTALL="failed (see setup.log)"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" DS_ACCELERATOR=cuda
exec python3 bench/gpu_check.py run --out "$OUT" --started "$START" --install-status "$INSTALL" "$@"
