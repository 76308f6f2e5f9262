#!/usr/bin/env bash
# A real one-machine Slurm cluster (munge + slurmctld + slurmd) for the tests of slurm/ (needs root).
#   local_cluster.sh start STATE_DIR   install slurm-wlm + munge (apt) if missing, configure, start,
#                                      wait until the node is idle; prints `export SLURM_CONF=...`
#   local_cluster.sh stop STATE_DIR    stop exactly the daemons this script started (pid files)
# Idempotent while up; stale pid files from a crashed run are ignored.
set -euo pipefail

action="${1:?usage: local_cluster.sh start|stop STATE_DIR}"
state="$(mkdir -p "${2:?usage: local_cluster.sh start|stop STATE_DIR}" && cd "$2" && pwd)"
conf="$state/slurm.conf"
export SLURM_CONF="$conf"

# running PIDFILE NAME: the pid file names a live process called NAME (not a recycled pid).
running() { [[ -f "$1" ]] && [[ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" == "$2" ]]; }

fail() {
    echo "local slurm: $*" >&2
    sinfo >&2 2>&1 || true
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
    if pgrep -x munged >/dev/null; then return; fi  # a munged we did not start: use it, never stop it
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
    pgrep -x "$1" >/dev/null && fail "a $1 not started from $state is running (stop it first)"
    "$1" -f "$conf" || fail "$1 did not start"
}

start() {
    install_packages
    start_munge
    write_conf
    start_daemon slurmctld
    start_daemon slurmd
    local host
    host="$(hostname -s)"
    for _ in $(seq 1 60); do
        if sinfo -h -n "$host" -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true  # drained by an old state
        sleep 1
    done
    fail "node $host never became idle within 60 s"
}

stop() {
    for daemon in slurmd slurmctld munged; do
        if running "$state/$daemon.pid" "$daemon"; then
            local pid
            pid="$(cat "$state/$daemon.pid")"
            kill "$pid"
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$state/$daemon.pid"
    done
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) echo "unknown action $action (start|stop)" >&2; exit 2 ;;
esac
