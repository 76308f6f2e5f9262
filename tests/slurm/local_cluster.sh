#!/usr/bin/env bash
# A real one-machine Slurm cluster (munge + slurmctld + slurmd) for the tests of slurm/.
#   local_cluster.sh start STATE_DIR   install (apt) if needed, configure, start, wait for an idle node
#   local_cluster.sh stop STATE_DIR    stop the daemons this script started (by pid file)
# Prints `export SLURM_CONF=...` on success. Idempotent; tolerant of stale pid files.
set -euo pipefail

command_name="${1:?usage: local_cluster.sh start|stop STATE_DIR}"
state="${2:?usage: local_cluster.sh start|stop STATE_DIR}"
conf="$state/slurm.conf"

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    [[ -f /etc/munge/munge.key ]] || mungekey -c -f 2>/dev/null || create-munge-key -f
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    if ! pgrep -x munged >/dev/null; then munged --force; fi
}

write_conf() {
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

start() {
    install_packages
    start_munge
    write_conf
    export SLURM_CONF="$conf"
    running "$state/slurmctld.pid" || slurmctld -f "$conf"
    running "$state/slurmd.pid" || slurmd -f "$conf"
    for _ in $(seq 1 60); do
        if sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix)"; then
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "node never became idle; sinfo: $(sinfo 2>&1)" >&2
    tail -n 30 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
    return 1
}

stop() {
    for daemon in slurmd slurmctld; do
        if running "$state/$daemon.pid"; then kill "$(cat "$state/$daemon.pid")"; fi
        rm -f "$state/$daemon.pid"
    done
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    *) echo "unknown command $command_name" >&2; exit 2 ;;
esac
