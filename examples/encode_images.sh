#!/bin/bash
# Images -> VQ codes -> a training dataset on every GPU of several nodes, in one job.
#
#   sbatch examples/encode_images.sh
#
# srun starts one task per GPU (no torchrun); each task encodes a contiguous block of the input's
# shards (jsonl files, parquet row groups, tar files, in input order) on its node's LOCAL_RANK-th GPU
# into OUTPUT.rank-<r>-of-<W>, and tokenizes it into DATA_PREFIX.rank-<r>-of-<W>. When all are done,
# rank 0 merges the datasets into DATA_PREFIX (with the vocabulary record pretrain_unix.py checks) and
# joins the codes into OUTPUT, in input order: the same bytes as one process would write. A job that
# is killed or runs out of time is resumed by submitting it again (each rank goes on where it stopped;
# a rank that finished is left as it is); if it was killed while joining, --merge finishes the join:
#
#   python tools/encode_images.py --merge --output "$OUTPUT" --output-prefix "$DATA_PREFIX" \
#       --vqgan "$VQGAN" --tokenizer-model "$TOKENIZER"
#
# OUTPUT and DATA_PREFIX must be on a file system that every node sees. Values of the "edit me" block
# can come from the environment (INPUT='shards/*.parquet' sbatch ...), #SBATCH lines from sbatch's
# command line; the job's output starts with the values in use.
#
#SBATCH --job-name=unix-encode
#SBATCH --nodes=4                      # edit me
#SBATCH --ntasks-per-node=8            # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12             # WORKERS decoding processes per task, and the task itself
#SBATCH --time=24:00:00                # edit me: a job cut short is resumed by submitting it again
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu               # edit me: your GPU partition (then drop one '#')
##SBATCH --account=my-project          # edit me: the account charged (then drop one '#')
set -euo pipefail

# ---------------------------------------------------------------- edit me
REPO=${REPO:-$HOME/megatron-unix}
VENV=${VENV:-$REPO/.venv}                            # the virtual environment megatron-unix is installed in
INPUT=${INPUT:-"/data/raw/pairs/*.jsonl"}            # files or globs (quoted: expanded by the program, in order)
OUTPUT=${OUTPUT:-/data/unix/image_text_codes.jsonl}  # the codes, joined in input order
DATA_PREFIX=${DATA_PREFIX:-/data/unix/image_text}    # the dataset for pretrain_unix.py --data-path
VQGAN_CONFIG=${VQGAN_CONFIG:-/models/chameleon/tokenizer/vqgan.yaml}
VQGAN_CHECKPOINT=${VQGAN_CHECKPOINT:-/models/chameleon/tokenizer/vqgan.ckpt}
TOKENIZER=${TOKENIZER:-/models/Qwen2.5-1.5B}         # the text tokenizer of the model to train
BATCH_SIZE=${BATCH_SIZE:-64}                         # images per encoder call
WORKERS=${WORKERS:-10}                               # decoding processes per GPU (--cpus-per-task less the task)
EXTRA_FLAGS=${EXTRA_FLAGS:-}                         # e.g. "--caption-key alt_text --min-size 128"
# ---------------------------------------------------------------- end of edit me

# shellcheck source=/dev/null
source "$VENV/bin/activate"
export OMP_NUM_THREADS=1                             # the encoder runs on the GPU; workers decode one image each
echo "job ${SLURM_JOB_ID:-?}: ${SLURM_JOB_NUM_NODES:-?} nodes, ${SLURM_NTASKS:-?} tasks; INPUT=$INPUT"
echo "OUTPUT=$OUTPUT DATA_PREFIX=$DATA_PREFIX BATCH_SIZE=$BATCH_SIZE WORKERS=$WORKERS EXTRA_FLAGS=$EXTRA_FLAGS"

read -r -a inputs <<< "$INPUT"
read -r -a extra <<< "$EXTRA_FLAGS"
# --kill-on-bad-exit: a rank that dies hard (not one that failed on bad data: it reports and waits) ends
# the step at once rather than leaving the others waiting for it until --distributed-timeout-minutes.
srun --kill-on-bad-exit=1 python "$REPO/tools/encode_images.py" \
    --input "${inputs[@]}" --output "$OUTPUT" \
    --vqgan-config "$VQGAN_CONFIG" --vqgan-checkpoint "$VQGAN_CHECKPOINT" \
    --output-prefix "$DATA_PREFIX" --tokenizer-model "$TOKENIZER" \
    --batch-size "$BATCH_SIZE" --workers "$WORKERS" "${extra[@]}"
