#!/usr/bin/env bash
# The paper's Table-4 comparison in miniature, on a CPU: a shared transformer, HardMoE (a vision MLP in
# every 2nd layer), MoT (vision q/k/v, QK norms and MLP in every layer, one global attention) and Uni-X
# (first and last layer separated), all tiny (4 layers), trained on the same data, batches and budget;
# then their text and vision losses on one plot (OUTPUT_DIR/compare.png) and each run's first and last
# losses. Start-up lines show each variant's parameter count; iteration lines its TFLOP/s from its real
# compute (spec §9).
#
#   bash examples/compare_variants.sh [OUTPUT_DIR]        (default: ./compare-output)
#
# COMPARE_ITERS overrides the iterations per model (default 80: about 6 minutes in all on 2 cores).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-compare-output}" && cd "${1:-compare-output}" && pwd)"
ITERS="${COMPARE_ITERS:-80}"
PYTHON="${PYTHON:-python}"
cd "$REPO"
source "$REPO/examples/quickstart_data.sh"
prepare_quickstart_data "$OUT"

declare -A VARIANT=(
    [shared]="--vision-encode-layers 0 --vision-decode-layers 0"
    [hardmoe]="--layer-variant hardmoe --decoder-sparse-step 2 --vision-encode-layers 0 --vision-decode-layers 0"
    [mot]="--layer-variant mot --vision-encode-layers 0 --vision-decode-layers 0"
    [unix]="--vision-encode-layers 1 --vision-decode-layers 1"
)
NAMES=(shared hardmoe mot unix)
for name in "${NAMES[@]}"; do
    echo "== training $name for $ITERS iterations (log: $OUT/$name.log)"
    # shellcheck disable=SC2086  # the variant's flags are words
    "$PYTHON" pretrain_unix.py --model-preset tiny ${VARIANT[$name]} --transformer-impl local \
        --tokenizer-model "$OUT/tokenizer" \
        --data-path 0.5 "$OUT/data/text" 0.5 "$OUT/data/image_text" --split 90,10,0 \
        --seq-length 1152 --micro-batch-size 1 --global-batch-size 4 --seed 1234 \
        --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters $(( ITERS / 10 )) --lr-decay-style cosine \
        --weight-decay 0.01 --clip-grad 1.0 --log-interval 5 --eval-interval "$ITERS" --eval-iters 2 \
        --save "$OUT/$name" > "$OUT/$name.log" 2>&1 || { tail -n 20 "$OUT/$name.log" >&2; exit 1; }
    grep -E "^> (Uni-X|HardMoE|MoT) | validation loss" "$OUT/$name.log"
    grep -E " iteration +$ITERS/" "$OUT/$name.log" | grep -oE "tokens/s: [0-9,]+ \| TFLOP/s/device: [0-9.]+"
done

echo "== losses per modality (nats per token), first -> last"
METRICS=()
for name in "${NAMES[@]}"; do METRICS+=("$OUT/$name/metrics.jsonl"); done
"$PYTHON" tools/plot_losses.py "${METRICS[@]}" --labels "$(IFS=,; echo "${NAMES[*]}")" \
    --output "$OUT/compare.png" --codebook-size 8192
