#!/usr/bin/env bash
# A real one-machine Slurm cluster (munge + slurmctld + slurmd) for the tests of slurm/ (needs root).
#   local_cluster.sh start STATE_DIR [USER_PID]  install slurm-wlm + munge (apt) if missing, configure,
#                     start, wait until the node is idle; prints `export SLURM_CONF=...`
#   local_cluster.sh stop STATE_DIR [USER_PID]   cancel its jobs and stop exactly the daemons this
#                     script started (pid files), unless another live USER_PID still uses the cluster
# Idempotent while up; stale pid files from a crashed run are ignored. USER_PID (e.g. a pytest
# session) lets two sessions on one machine share the cluster: the last one out stops it.
set -euo pipefail

action="${1:?usage: local_cluster.sh start|stop STATE_DIR}"
state="$(mkdir -p "${2:?usage: local_cluster.sh start|stop STATE_DIR}" && cd "$2" && pwd)"
conf="$state/slurm.conf"
user="${3:-}"
export SLURM_CONF="$conf"

# running PIDFILE NAME: the pid file names a live process called NAME (not a recycled pid, not a
# zombie: a daemon killed a moment ago lingers as one until it is reaped).
running() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$(ps -o comm= -p "$pid")" == "$2" && "$(ps -o stat= -p "$pid")" != Z* ]]
}

# any_running NAME: some process called NAME is alive (zombies aside), whoever started it.
any_running() { ps -C "$1" -o stat= | grep -qv '^Z'; }

fail() {
    echo "local slurm: $*" >&2
    timeout 5 sinfo >&2 2>&1 || true
    ps -C slurmctld,slurmd,munged -o pid,stat,args >&2 || true
    tail -n 40 "$state"/log/*.log >&2 2>/dev/null || true
    exit 1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    [[ -f /etc/munge/munge.key ]] || mungekey -c -f 2>/dev/null || create-munge-key -f
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    if any_running munged; then return; fi  # a munged we did not start: use it, never stop it
    munged --force
    cp /run/munge/munged.pid "$state/munged.pid"
}

write_conf() {
    # RealMemory below what the machine has, or slurmd registers less and the node is drained.
    local host memory
    host="$(hostname -s)"
    memory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 8 / 10 ))
    mkdir -p "$state"/{state,spool,log}
    cat > "$conf" <<CONF
ClusterName=stepwise-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start_daemon() {
    # start_daemon NAME: start slurmctld/slurmd unless ours is already up; refuse to fight a foreign one.
    running "$state/$1.pid" "$1" && return
    any_running "$1" && fail "a $1 not started from $state is running (stop it first)"
    "$1" -f "$conf" || fail "$1 did not start"
}

start() {
    install_packages
    start_munge
    write_conf
    start_daemon slurmctld
    start_daemon slurmd
    if [[ -n "$user" ]]; then mkdir -p "$state/users" && touch "$state/users/$user"; fi
    local host
    host="$(hostname -s)"
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        # slurmd answers, and the node is usable ("idle*" = not responding: a state restored from disk)
        if timeout 5 scontrol show slurmd >/dev/null 2>&1 &&
            timeout 5 sinfo -h -n "$host" -o "%t" 2>/dev/null | grep -qxE "idle|mix|alloc"; then
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        timeout 5 scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true  # drained by an old state
        sleep 1
    done
    fail "node $host never became idle within 60 s"
}

stop() {
    if [[ -n "$user" ]]; then rm -f "$state/users/$user"; fi
    local other
    for other in "$state"/users/*; do
        [[ -e "$other" ]] || continue
        if kill -0 "$(basename "$other")" 2>/dev/null; then echo "local slurm: still used by pid ${other##*/}"; return; fi
        rm -f "$other"  # a crashed session
    done
    if running "$state/slurmctld.pid" slurmctld; then timeout 10 squeue -h -o %i | xargs -r scancel || true; fi
    for daemon in slurmd slurmctld munged; do
        if running "$state/$daemon.pid" "$daemon"; then
            local pid
            pid="$(cat "$state/$daemon.pid")"
            kill "$pid"
            for _ in $(seq 1 20); do running "$state/$daemon.pid" "$daemon" || break; sleep 0.5; done
        fi
        rm -f "$state/$daemon.pid"
    done
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) echo "unknown action $action (start|stop)" >&2; exit 2 ;;
esac
