#!/bin/bash
# The launch shared by examples/pretrain_*.sh: environment, then one srun of pretrain_unix.py (one
# task per GPU, no torchrun). Sourced after the caller has set the variables of its "edit me" block.
set -euo pipefail

source "$REPO/.venv/bin/activate"
export CUDA_DEVICE_MAX_CONNECTIONS=1                 # Megatron's TP/SP comm-compute overlap needs it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-8}   # newer slurm: srun does not inherit --cpus-per-task
export OMP_NUM_THREADS=$SRUN_CPUS_PER_TASK            # the CPUs slurm gives each rank
source "$REPO/examples/slurm_time.sh"
EXIT_MINUTES=$(exit_minutes "$EXIT_MARGIN_MINUTES")   # from #SBATCH --time
export MASTER_PORT=${MASTER_PORT:-29500}             # MASTER_ADDR = first node of the allocation
mkdir -p "$SAVE"

srun --kill-on-bad-exit=1 python "$REPO/pretrain_unix.py" \
    --pretrained-checkpoint "$INIT" \
    --load "$SAVE" --save "$SAVE" --save-interval 1000 --keep-last-checkpoints 3 \
    --tokenizer-model "$QWEN_DIR" \
    --data-path $DATA_PATH --split 998,2,0 \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
    --train-iters "$TRAIN_ITERS" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --attention-backend auto \
    --log-interval 10 --eval-interval 1000 --eval-iters 20 \
    --tensorboard-dir "$SAVE/tensorboard" \
    ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${RUN_NAME}-${SLURM_JOB_ID}"} \
    ${EXIT_MINUTES:+--exit-duration-in-mins "$EXIT_MINUTES"}
