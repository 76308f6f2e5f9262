#!/usr/bin/env bash
# A real Slurm cluster of two "nodes" on one machine (munge + slurmctld + two slurmd, node1 and node2,
# both NodeAddr=127.0.0.1 on ports of their own) for the tests of slurm/ (needs root). Single-node jobs
# run on either node; `sbatch -N 2` allocates both, and srun starts one task on each (SLURM_NODEID 0/1).
#   local_cluster.sh start STATE_DIR [USER_PID]  install slurm-wlm + munge (apt) if missing, configure,
#                     start, wait until both nodes are idle; prints `export SLURM_CONF=...`
#   local_cluster.sh stop STATE_DIR [USER_PID]   cancel its jobs and stop exactly the daemons this
#                     script started (pid files), unless another live USER_PID still uses the cluster
# Idempotent while up; stale pid files from a crashed run are ignored; daemons running an older
# configuration (e.g. the former one-node cluster) are restarted when nobody else uses them. USER_PID
# (e.g. a pytest session) lets two sessions on one machine share the cluster: the last one out stops it.
# Ports: slurmctld 16817, slurmd 16818 (node1) and 16819 (node2); everything listens on loopback names.
set -euo pipefail

action="${1:?usage: local_cluster.sh start|stop STATE_DIR}"
state="$(mkdir -p "${2:?usage: local_cluster.sh start|stop STATE_DIR}" && cd "$2" && pwd)"
conf="$state/slurm.conf"
user="${3:-}"
export SLURM_CONF="$conf"
NODES=(node1 node2)
CTLD_PORT=16817
declare -A NODE_PORT=([node1]=16818 [node2]=16819)

# running PIDFILE NAME: the pid file names a live process called NAME (not a recycled pid, not a
# zombie: a daemon killed a moment ago lingers as one until it is reaped).
running() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$(ps -o comm= -p "$pid")" == "$2" && "$(ps -o stat= -p "$pid")" != Z* ]]
}

# any_running NAME: some process called NAME is alive (zombies aside), whoever started it.
any_running() { ps -C "$1" -o stat= | grep -qv '^Z'; }

# foreign NAME: a live process called NAME that none of our pid files names (someone else's daemon).
foreign() {
    local pid ours
    ours=" $(for f in "$state"/*.pid; do cat "$f" 2>/dev/null; echo; done | tr '\n' ' ') "
    for pid in $(ps -C "$1" -o pid=,stat= | awk '$2 !~ /^Z/ {print $1}'); do
        [[ "$ours" == *" $pid "* ]] || return 0
    done
    return 1
}

# Our pid files: one slurmd per node (slurmd.pid: the former one-node cluster's), slurmctld, munged.
pid_files() {
    local node
    for node in "${NODES[@]}"; do echo "slurmd.$node.pid slurmd"; done
    echo "slurmd.pid slurmd"
    echo "slurmctld.pid slurmctld"
}

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
    # write_conf FILE. RealMemory below what the machine has, or slurmd registers less and the node is
    # drained; both nodes describe the same machine (jobs request no memory, so nothing is overbooked).
    local host memory cpus node
    host="$(hostname -s)"
    memory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 8 / 10 ))
    cpus="$(nproc)"
    mkdir -p "$state"/{state,log} "${NODES[@]/#/$state/spool}"
    {
        cat <<CONF
ClusterName=stepwise-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.%n.log
CONF
        for node in "${NODES[@]}"; do
            echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORT[$node]} CPUs=$cpus RealMemory=$memory State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } > "$1"
}

stop_daemons() {
    # Our slurmd's and slurmctld, by pid file (munged stays: the next start uses it).
    local file name pid
    while read -r file name; do
        if running "$state/$file" "$name"; then
            pid="$(cat "$state/$file")"
            kill "$pid"
            for _ in $(seq 1 20); do running "$state/$file" "$name" || break; sleep 0.5; done
        fi
        rm -f "$state/$file"
    done < <(pid_files)
}

others_alive() {
    # others_alive: another live USER_PID is registered (crashed sessions are forgotten on the way).
    local other
    for other in "$state"/users/*; do
        [[ -e "$other" ]] || continue
        [[ "$(basename "$other")" == "$user" ]] && continue
        if kill -0 "$(basename "$other")" 2>/dev/null; then echo "${other##*/}"; return 0; fi
        rm -f "$other"
    done
    return 1
}

any_ours_running() {
    local file name
    while read -r file name; do running "$state/$file" "$name" && return 0; done < <(pid_files)
    return 1
}

start_daemon() {
    # start_daemon NAME PIDFILE [ARGS...]: start slurmctld/slurmd unless ours is already up.
    local name="$1" file="$2"
    shift 2
    running "$state/$file" "$name" && return
    "$name" -f "$conf" "$@" || fail "$name $* did not start"
}

start() {
    install_packages
    start_munge
    local fresh="$state/slurm.conf.new" other
    write_conf "$fresh"
    if ! cmp -s "$fresh" "$conf" && any_ours_running; then  # daemons of another configuration
        if other="$(others_alive)"; then
            rm -f "$fresh"
            fail "the running cluster in $state has another configuration and pid $other still uses it"
        fi
        stop_daemons
    fi
    mv "$fresh" "$conf"
    local node
    for name in slurmctld slurmd; do
        foreign "$name" && fail "a $name not started from $state is running (stop it first)"
    done
    start_daemon slurmctld slurmctld.pid
    for node in "${NODES[@]}"; do start_daemon slurmd "slurmd.$node.pid" -N "$node"; done
    if [[ -n "$user" ]]; then mkdir -p "$state/users" && touch "$state/users/$user"; fi
    local deadline=$((SECONDS + 60)) states
    while ((SECONDS < deadline)); do
        # both nodes usable ("idle*" = not responding yet: a state restored from disk)
        states="$(timeout 5 sinfo -h -N -n "$(IFS=,; echo "${NODES[*]}")" -o "%t" 2>/dev/null || true)"
        if [[ "$(grep -cxE "idle|mix|alloc" <<<"$states")" == "${#NODES[@]}" ]]; then
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        for node in "${NODES[@]}"; do  # drained by an old state
            timeout 5 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        done
        sleep 1
    done
    fail "nodes ${NODES[*]} never became idle within 60 s"
}

stop() {
    if [[ -n "$user" ]]; then rm -f "$state/users/$user"; fi
    local other
    if other="$(others_alive)"; then echo "local slurm: still used by pid $other"; return; fi
    if running "$state/slurmctld.pid" slurmctld; then timeout 10 squeue -h -o %i | xargs -r scancel || true; fi
    stop_daemons
    if running "$state/munged.pid" munged; then
        local pid
        pid="$(cat "$state/munged.pid")"
        kill "$pid"
        for _ in $(seq 1 20); do running "$state/munged.pid" munged || break; sleep 0.5; done
    fi
    rm -f "$state/munged.pid"
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) echo "unknown action $action (start|stop)" >&2; exit 2 ;;
esac
