#!/usr/bin/env bash
# Build (once, cached by the pin file's hash) the site directory of .ci/legacy-transformers.txt and print its path.
# Usage: bash .ci/legacy_transformers.sh PYTHON   (the venv's python, whose pip installs it)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$1"
hash=$(sha256sum "$here/legacy-transformers.txt" | cut -c1-16)
site="${MEGATRON_UNIX_VENV_CACHE:-$HOME/.cache/megatron-unix}/legacy-transformers-$hash"
if [ ! -f "$site/.complete" ]; then
    rm -rf "$site"
    "$python" -m pip install -q --no-deps --target "$site" -r "$here/legacy-transformers.txt" >&2
    touch "$site/.complete"
fi
echo "$site"
