#!/bin/bash
# The launch shared by examples/pretrain_*.sh: environment, then one srun of pretrain_unix.py (one
# task per GPU, no torchrun: each rank reads SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID, and
# rendezvouses at the step's first node). Sourced after the caller has set the variables of its
# "edit me" block.
set -euo pipefail

source "$VENV/bin/activate"
export CUDA_DEVICE_MAX_CONNECTIONS=1                 # Megatron's TP/SP comm-compute overlap needs it
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-8}   # newer slurm: srun does not inherit --cpus-per-task
export OMP_NUM_THREADS=$SRUN_CPUS_PER_TASK            # the CPUs slurm gives each rank
source "$REPO/examples/slurm_time.sh"
EXIT_MINUTES=$(exit_minutes "$EXIT_MARGIN_MINUTES")   # from the job's end time (#SBATCH --time)
export MASTER_PORT=${MASTER_PORT:-29500}             # MASTER_ADDR = first node of the step (pretrain_unix.py)
mkdir -p "$SAVE"
for name in REPO VENV QWEN_DIR INIT SAVE DATA_PATH SPLIT WANDB_PROJECT RUN_NAME TP PP SEQ_LENGTH \
    MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS LR MIN_LR WARMUP_ITERS SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL \
    EVAL_ITERS GPU_FLAGS EXIT_MARGIN_MINUTES EXIT_MINUTES MASTER_PORT; do
    echo "$name=${!name}"                            # the values in use, at the top of the job's output
done

# shellcheck disable=SC2086 # DATA_PATH and GPU_FLAGS are lists of words
srun --kill-on-bad-exit=1 python "$REPO/pretrain_unix.py" \
    --pretrained-checkpoint "$INIT" \
    --load "$SAVE" --save "$SAVE" --save-interval "$SAVE_INTERVAL" --keep-last-checkpoints 3 \
    --tokenizer-model "$QWEN_DIR" \
    --data-path $DATA_PATH --split "$SPLIT" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
    --train-iters "$TRAIN_ITERS" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS" --lr-decay-style cosine \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    $GPU_FLAGS \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --attention-backend auto \
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" \
    --tensorboard-dir "$SAVE/tensorboard" \
    ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT" --wandb-exp-name "${RUN_NAME}-${SLURM_JOB_ID}"} \
    ${EXIT_MINUTES:+--exit-duration-in-mins "$EXIT_MINUTES"}
