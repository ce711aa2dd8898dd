#!/bin/bash
# How long this slurm job may still run, so that --exit-duration-in-mins follows the job's real end
# (#SBATCH --time, or a limit changed since) instead of a second number kept in step by hand. Sourced by
# pretrain_common.sh.

# Seconds from now to the job's end: slurm's SLURM_JOB_END_TIME where it exports it (23.02 and later),
# else squeue's end time; nothing for a job without a time limit (squeue prints NONE).
job_seconds_left() {
    local end=${SLURM_JOB_END_TIME:-}
    [ -n "$end" ] || end=$(SLURM_TIME_FORMAT=%s squeue -h -j "$SLURM_JOB_ID" -o %e)
    [[ $end =~ ^[0-9]+$ ]] || return 0
    echo $(( end - $(date +%s) ))
}

# --exit-duration-in-mins: the job's minutes left less a margin (minutes, may be fractional) for the
# final save, to the hundredth of a minute; empty without a limit, an error when nothing is left.
exit_minutes() {
    local margin=$1 seconds
    seconds=$(job_seconds_left)
    [ -z "$seconds" ] && return
    awk -v seconds="$seconds" -v margin="$margin" 'BEGIN {
        left = seconds / 60 - margin
        if (left <= 0) {
            printf "the job has %.1f min left: no time after EXIT_MARGIN_MINUTES=%s\n", seconds / 60, margin > "/dev/stderr"
            exit 1
        }
        printf "%.2f\n", left
    }'
}
