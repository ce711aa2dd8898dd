#!/bin/bash
# Uni-X-3B (Qwen2.5-3B dimensions, Qwen3 layer style, 12 encode : 6 decode separated layers),
# continued pretraining from a converted Qwen2.5-3B on multi-node 8-GPU nodes.
#
#   sbatch examples/pretrain_3b.sh
#
# Every value a user is expected to change is in the "edit me" block. The model dimensions come
# from the converted checkpoint (--pretrained-checkpoint), so only N:M and the run are set here.
#
#SBATCH --job-name=unix-3b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8            # one task per GPU: srun starts the ranks, no torchrun
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@600              # SIGTERM 10 min before the limit: pretrain_unix saves and exits
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---------------------------------------------------------------- edit me
REPO=${REPO:-$HOME/megatron-unix}
QWEN_DIR=/models/Qwen2.5-3B                          # HF checkpoint (safetensors + tokenizer)
INIT=/checkpoints/unix-3b-init                       # converted once, see below
SAVE=/checkpoints/unix-3b                            # resumed automatically if it holds a checkpoint
DATA_PATH="0.5 /data/unix/text_web 0.1 /data/unix/text_code 0.4 /data/unix/image_text"   # weight prefix ...
WANDB_PROJECT=unix                                   # unset to disable; WANDB_MODE=offline works
TP=1                                                 # 3B fits one GPU per replica with the distributed optimizer
PP=1
SEQ_LENGTH=8192
MICRO_BATCH=1
GLOBAL_BATCH=256                                     # 256 x 8192 = 2.1M tokens per step
TRAIN_ITERS=50000
# ---------------------------------------------------------------- environment
source "$REPO/.venv/bin/activate"
export CUDA_DEVICE_MAX_CONNECTIONS=1                 # Megatron's TP/SP comm-compute overlap needs it
export NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=8
export MASTER_PORT=${MASTER_PORT:-29500}             # MASTER_ADDR = first node of the allocation
mkdir -p logs "$SAVE"

# One-time conversion (run on one node before the first job; N:M fixed here):
#   python $REPO/tools/convert_checkpoint.py import-hf --hf-dir $QWEN_DIR --save $INIT \
#       --vision-encode-layers 12 --vision-decode-layers 6 --layer-style qwen3 --verify
# Data: python $REPO/tools/preprocess_data.py --input 'raw/image_text/*.jsonl.gz' \
#       --output-prefix /data/unix/image_text --tokenizer-model $QWEN_DIR --workers 32

srun --kill-on-bad-exit=1 python "$REPO/pretrain_unix.py" \
    --pretrained-checkpoint "$INIT" \
    --load "$SAVE" --save "$SAVE" --save-interval 1000 --keep-last-checkpoints 3 \
    --tokenizer-model "$QWEN_DIR" \
    --data-path $DATA_PATH --split 998,2,0 \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
    --train-iters "$TRAIN_ITERS" \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 1000 --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --attention-backend auto \
    --log-interval 10 --eval-interval 1000 --eval-iters 20 \
    --tensorboard-dir "$SAVE/tensorboard" \
    ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT" --wandb-exp-name "unix-3b-${SLURM_JOB_ID}"} \
    --exit-duration-in-mins 2850
