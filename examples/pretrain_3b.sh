#!/bin/bash
# Uni-X-3B (Qwen2.5-3B dimensions, Qwen3 layer style, 12 encode : 6 decode separated layers),
# continued pretraining from a converted Qwen2.5-3B on multi-node 8-GPU nodes.
#
#   sbatch examples/pretrain_3b.sh
#
# Every value a user is expected to change is in the "edit me" block and the #SBATCH lines
# marked "edit me" (--time sets the run's --exit-duration-in-mins too). The model dimensions come
# from the converted checkpoint (--pretrained-checkpoint), so only N:M and the run are set here.
# Each value of the block can also come from the environment, which sbatch passes to the job
# (TRAIN_ITERS=100 sbatch ...), and each #SBATCH line from sbatch's command line; the job's output
# starts with the values in use. CI runs this script unchanged on a one-node CPU cluster that way
# (tests/test_slurm.py: -N 1 -n 2 --gpus-per-node=0, GPU_FLAGS= and a tiny model).
#
#SBATCH --job-name=unix-3b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8            # one task per GPU: srun starts the ranks, no torchrun
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00                # edit me: wall time (--exit-duration-in-mins follows it)
#SBATCH --signal=TERM@600              # SIGTERM 10 min before the limit: pretrain_unix saves and exits
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu               # edit me: your GPU partition (then drop one '#')
##SBATCH --account=my-project          # edit me: the account charged (then drop one '#')
set -euo pipefail

# ---------------------------------------------------------------- edit me
REPO=${REPO:-$HOME/megatron-unix}
VENV=${VENV:-$REPO/.venv}                            # the virtual environment megatron-unix is installed in
QWEN_DIR=${QWEN_DIR:-/models/Qwen2.5-3B}             # HF checkpoint (safetensors + tokenizer)
INIT=${INIT:-/checkpoints/unix-3b-init}              # converted once, see below
SAVE=${SAVE:-/checkpoints/unix-3b}                   # resumed automatically if it holds a checkpoint
DATA_PATH=${DATA_PATH:-"0.5 /data/unix/text_web 0.1 /data/unix/text_code 0.4 /data/unix/image_text"}  # weight prefix ...
SPLIT=${SPLIT:-998,2,0}                              # train, validation, test weights
WANDB_PROJECT=${WANDB_PROJECT-unix}                  # empty to disable; WANDB_MODE=offline works
RUN_NAME=${RUN_NAME:-unix-3b}
TP=${TP:-1}                                          # 3B fits one GPU per replica with the distributed optimizer
PP=${PP:-1}
SEQ_LENGTH=${SEQ_LENGTH:-8192}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}                    # 256 x 8192 = 2.1M tokens per step
TRAIN_ITERS=${TRAIN_ITERS:-50000}
LR=${LR:-1e-4}                                       # peak; cosine decay to MIN_LR after warmup
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}                 # SIGTERM and the time limit save too
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-20}
GPU_FLAGS=${GPU_FLAGS-"--bf16 --use-distributed-optimizer --overlap-grad-reduce"}  # empty on CPU nodes
EXIT_MARGIN_MINUTES=${EXIT_MARGIN_MINUTES:-30}       # stop and save this long before #SBATCH --time ends

# One-time conversion (run on one node before the first job; N:M fixed here):
#   python $REPO/tools/convert_checkpoint.py import-hf --hf-dir $QWEN_DIR --save $INIT \
#       --vision-encode-layers 12 --vision-decode-layers 6 --layer-style qwen3 --verify
# Data: python $REPO/tools/preprocess_data.py --input 'raw/image_text/*.jsonl.gz' \
#       --output-prefix /data/unix/image_text --tokenizer-model $QWEN_DIR --workers 32

source "$REPO/examples/pretrain_common.sh"
