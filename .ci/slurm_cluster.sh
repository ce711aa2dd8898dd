#!/usr/bin/env bash
# A private one-node slurm cluster for the tests that run examples/pretrain_*.sh through sbatch.
#
#   .ci/slurm_cluster.sh start DIR [OWNER_PID]   install slurm-wlm + munge when absent (root + apt), then
#                                                munged, slurmctld and slurmd with everything under DIR;
#                                                prints SLURM_CONF=DIR/slurm.conf when the node is idle
#   .ci/slurm_cluster.sh stop DIR                cancel its jobs, stop every daemon it started
#
# Nothing outside DIR is used: the munge socket, the ports (free ones), state, spool, logs and pids are
# private, so the cluster neither needs nor touches a system slurm; commands reach it through
# SLURM_CONF. With OWNER_PID a watcher stops the cluster when that process ends (a test session killed
# before its teardown). A cluster that cannot be had (not root, no apt-get, a daemon that fails) exits 1
# with the reason as the last line of stderr; whatever had started is stopped again.
set -euo pipefail

die() {
    echo "slurm cluster: $*" >&2
    exit 1
}

install_packages() {
    command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v munged > /dev/null \
        && command -v sbatch > /dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get > /dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    # the packages' services must not start: this cluster is the only slurm the tests run
    local policy=/usr/sbin/policy-rc.d added=
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy && added=1; fi
    local status=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        > "$DIR/apt.log" 2>&1 || status=$?
    [ -n "$added" ] && rm -f $policy
    [ $status = 0 ] || die "apt-get install slurm-wlm munge failed: $(tail -1 "$DIR/apt.log")"
}

free_ports() {
    python3 -c '
import socket
probes = [socket.socket() for _ in range(2)]
for p in probes:
    p.bind(("127.0.0.1", 0))
print(*(p.getsockname()[1] for p in probes))'
}

write_conf() {
    local node ctld_port slurmd_port hardware memory
    node=$(hostname -s)
    getent hosts "$node" > /dev/null || die "this machine's name ($node) does not resolve: jobs could not reach it"
    read -r ctld_port slurmd_port <<< "$(free_ports)"
    # this machine's CPUs, sockets, cores and threads as slurmd sees them; RealMemory a little lower, so a
    # fluctuation never drains the node
    hardware=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    memory=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    cat > "$DIR/slurm.conf" << EOF
ClusterName=megatron-unix-ci
SlurmctldHost=$node
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
# no slurmdbd, so no sacct: each finished job is a line of JobCompLoc (state, exit code, times). A short
# MinJobAge also keeps sbatch --wait's polls short (it waits at most MinJobAge/2 between them)
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=10
ReturnToService=2
InactiveLimit=0
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=$node $hardware RealMemory=$(( memory * 9 / 10 )) State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$node"
}

start_munge() {
    mkdir -p "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 711 "$DIR/munge" # the socket needs execute for all; the key stays the munge user's
    chmod 400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start: $(tail -1 "$DIR/munge/munged.log" 2> /dev/null)"
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
}

wait_for() { # SECONDS COMMAND...: poll COMMAND every half second until it succeeds
    local seconds=$1 deadline
    shift
    deadline=$(( $(date +%s) + seconds ))
    until "$@" > /dev/null 2>&1; do
        [ "$(date +%s)" -lt $deadline ] || return 1
        sleep 0.5
    done
}

node_idle() { [ "$(sinfo -h -n "$1" -o %T)" = idle ]; }
no_jobs() { [ -z "$(squeue -h -o %i)" ]; }
gone() { ! kill -0 "$1" 2> /dev/null; }

start() {
    [ "$(id -u)" = 0 ] || die "its daemons run as root (SlurmUser=root) and this is not root"
    chmod 755 "$DIR" # munged (the munge user) reaches its socket folder through it
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    local node
    started=
    trap '[ -n "$started" ] || stop > /dev/null 2>&1' EXIT # a failed start leaves nothing running
    node=$(write_conf)
    export SLURM_CONF=$DIR/slurm.conf
    start_munge
    slurmctld || die "slurmctld did not start: $(tail -1 "$DIR/log/slurmctld.log" 2> /dev/null)"
    slurmd -N "$node" || die "slurmd did not start: $(tail -1 "$DIR/log/slurmd.log" 2> /dev/null)"
    if ! wait_for 90 node_idle "$node"; then
        die "node $node is not idle after 90 s (state: $(sinfo -h -n "$node" -o '%T %E' 2>&1 | head -1)); logs in $DIR/log"
    fi
    if [ -n "$OWNER" ]; then
        # stops the cluster when the owner ends without calling stop; detached from our output
        (
            while kill -0 "$OWNER" 2> /dev/null; do sleep 2; done
            rm -f "$DIR/watcher.pid"
            "$0" stop "$DIR"
        ) > /dev/null 2>&1 < /dev/null &
        echo $! > "$DIR/watcher.pid"
    fi
    started=1
    echo "SLURM_CONF=$SLURM_CONF"
}

stop_pid_file() { # NAME: SIGTERM the process in DIR/NAME.pid, SIGKILL it after 20 s
    local file=$DIR/$1.pid pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then
        kill "$pid" 2> /dev/null || true
        wait_for 20 gone "$pid" || kill -9 "$pid" 2> /dev/null || true
    fi
    rm -f "$file"
}

stop() {
    export SLURM_CONF=$DIR/slurm.conf
    if [ -f "$DIR/slurmctld.pid" ] && [ -f "$DIR/slurmd.pid" ]; then
        # jobs first, so that no training process outlives the cluster
        scancel --quiet --user root 2> /dev/null || true
        wait_for 60 no_jobs || true
    fi
    stop_pid_file slurmd
    stop_pid_file slurmctld
    stop_pid_file munged
    stop_pid_file watcher
}

[ $# -ge 2 ] || { echo "usage: $0 start|stop DIR [OWNER_PID]" >&2; exit 2; }
DIR=$(cd "$2" 2> /dev/null && pwd) || { echo "slurm cluster: $2 is not a directory" >&2; exit 2; }
OWNER=${3:-}
case $1 in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR [OWNER_PID]" >&2; exit 2 ;;
esac
