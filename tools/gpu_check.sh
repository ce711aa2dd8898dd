#!/usr/bin/env bash
# tools/gpu_check.py on the lent GPU machine: megatron-core from the wheels carried in .whl/ (installed into
# /tmp/site when it is not importable), the project from this checkout. See tools/gpu_check.py's header.
#
#   bash tools/gpu_check.sh --out "$OUT" [--steps ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python3 -c "import megatron.core" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 tools/gpu_check.py "$@"
