#!/bin/bash
# How long this slurm job may run, so that --exit-duration-in-mins follows #SBATCH --time instead of a
# second number kept in step by hand. Sourced by pretrain_common.sh.

# A slurm time limit ([D-]HH:MM:SS, HH:MM:SS or MM:SS, as squeue prints it) -> whole minutes.
limit_to_minutes() {
    local t=$1 days=0 a b c
    if [[ $t == *-* ]]; then days=${t%%-*}; t=${t#*-}; fi
    IFS=: read -r a b c <<< "$t"
    if [ -n "${c:-}" ]; then echo $(( days * 1440 + 10#$a * 60 + 10#$b )); else echo $(( days * 1440 + 10#$a )); fi
}

# Minutes this job may run: slurm's start and end times when it exports them, else squeue's limit;
# nothing for a job without a limit.
job_minutes() {
    if [ -n "${SLURM_JOB_END_TIME:-}" ] && [ -n "${SLURM_JOB_START_TIME:-}" ]; then
        echo $(( (SLURM_JOB_END_TIME - SLURM_JOB_START_TIME) / 60 ))
        return
    fi
    local limit
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l)
    if [[ $limit =~ ^[0-9] ]]; then limit_to_minutes "$limit"; fi   # not UNLIMITED / NOT_SET
}

# --exit-duration-in-mins: the job's minutes less a margin for the final save (empty without a limit).
exit_minutes() {
    local margin=$1 minutes
    minutes=$(job_minutes)
    [ -z "$minutes" ] && return
    if (( minutes <= margin )); then
        echo "the job's time limit ($minutes min) leaves no time after EXIT_MARGIN_MINUTES=$margin" >&2
        return 1
    fi
    echo $(( minutes - margin ))
}
