#!/usr/bin/env bash
# Uni-X from nothing on a CPU, in a few minutes: train a small tokenizer on the shipped text,
# preprocess the shipped text and image-text pairs into Megatron datasets, train a tiny Uni-X
# (1 encode + 1 decode separated layer) for 150 iterations, in which both the text and the vision
# loss fall far below their start (the shipped images are learnable: examples/data/make_quickstart_data.py),
# save a checkpoint, print the first and last losses and plot them (OUTPUT_DIR/loss.png).
#
#   bash examples/quickstart.sh [OUTPUT_DIR]        (default: ./quickstart-output)
#
# Everything goes under OUTPUT_DIR. QUICKSTART_ITERS overrides the number of iterations.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-quickstart-output}" && cd "${1:-quickstart-output}" && pwd)"
ITERS="${QUICKSTART_ITERS:-150}"
PYTHON="${PYTHON:-python}"
cd "$REPO"

source "$REPO/examples/quickstart_data.sh"
prepare_quickstart_data "$OUT"

echo "== training a tiny Uni-X for $ITERS iterations"
"$PYTHON" pretrain_unix.py \
    --model-preset tiny \
    --tokenizer-model "$OUT/tokenizer" \
    --data-path 0.5 "$OUT/data/text" 0.5 "$OUT/data/image_text" --split 90,10,0 \
    --seq-length 1152 --micro-batch-size 1 --global-batch-size 4 \
    --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters $(( ITERS / 10 )) --lr-decay-style cosine \
    --weight-decay 0.01 --clip-grad 1.0 \
    --log-interval 5 --eval-interval 10 --eval-iters 2 \
    --save "$OUT/checkpoints" --save-interval 50 \
    --tensorboard-dir "$OUT/tensorboard"

echo "== losses (nats per token), first -> last"
"$PYTHON" tools/plot_losses.py "$OUT/checkpoints/metrics.jsonl" --output "$OUT/loss.png" --codebook-size 8192

echo "== done. Where everything went:"
echo "   tokenizer      $OUT/tokenizer"
echo "   datasets       $OUT/data/{text,image_text}.{bin,idx} (+ _lossmask, _vision companions)"
echo "   checkpoints    $OUT/checkpoints (latest: iteration $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "   metrics        $OUT/checkpoints/metrics.jsonl"
echo "   tensorboard    tensorboard --logdir $OUT/tensorboard"
echo "   export to HF   python tools/convert_checkpoint.py export-hf --load $OUT/checkpoints --save $OUT/hf"
