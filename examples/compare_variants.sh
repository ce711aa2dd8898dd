#!/usr/bin/env bash
# The paper's Table-4 comparison in miniature, on a CPU: a shared transformer, HardMoE (a vision MLP in
# every 2nd layer), MoT (vision q/k/v, QK norms and MLP in every layer, one global attention) and Uni-X
# (first and last layer separated), all tiny (4 layers), trained on the same data, batches and budget,
# exported and evaluated, through tools/compare.py: OUTPUT_DIR/report.md (Table 4 with the paper's rows,
# parameters, throughput, losses), losses.png (text and vision losses of the four on one plot) and
# grad_conflict.png (their gradient-conflict profiles). Stopped, the same command resumes.
#
#   bash examples/compare_variants.sh [OUTPUT_DIR]        (default: ./compare-output)
#
# COMPARE_ITERS overrides the iterations per model (default 80: about 6 minutes of training on 2 cores);
# more flags of tools/compare.py (--help) go after OUTPUT_DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-compare-output}"
PYTHON="${PYTHON:-python}"
exec "$PYTHON" "$REPO/tools/compare.py" --output-dir "$OUT" --train-iters "${COMPARE_ITERS:-80}" "${@:2}"
