#!/usr/bin/env bash
# A real single-node Slurm cluster (with accounting) on a Debian machine, for tests and CI.
#
#   .ci/local_slurm.sh start    install what is missing, configure, start what is not running
#   .ci/local_slurm.sh stop     cancel the jobs, stop only the daemons that `start` started
#   .ci/local_slurm.sh status   daemons, node state, queue
#
#   .ci/local_slurm.sh hosts-start NAME=NETNS@ADDR...   a multi-host cluster in network namespaces
#   .ci/local_slurm.sh hosts-stop                        cancel its jobs, stop the daemons it started
#   .ci/local_slurm.sh hosts-status
#
# Root only; works without systemd or cgroups. Partitions: `debug` (default, preemptable by
# requeue after a 30 s grace time) and `urgent` (preempts `debug`). Accounting (slurmdbd on
# MariaDB) is not optional: without it `sacct` fails and submitit waits forever on a dead job.
# Daemons this script starts are recorded in $STATE; `stop` ends those PIDs and nothing else.
#
# The hosts cluster is a second, separate cluster (ClusterName=hosts) whose hosts are network
# namespaces that someone else made (tests/hosts.py): `hosts-start node1=NS1@10.231.0.1
# node2=NS2@10.231.0.2` runs slurmdbd and slurmctld on the first host (head and compute node) and a
# slurmd on every host, each under its host's name (its own UTS namespace) and address. munged and
# mariadbd stay in the root namespace: their unix sockets reach every namespace, TCP to the root's
# localhost does not. Its own configuration, state, spool, logs, pid files and accounting
# database; daemons recorded in $HOSTS_STATE. On every host, $HOSTS_ETC is bind-mounted over
# /etc/slurm (in a private mount namespace), so that every process there, jobs included, sees the
# hosts cluster's configuration at the default path, as on a real node: submitit drops SLURM_CONF
# from the environment of the sbatch it runs. `hosts-start` writes into $HOSTS_BIN:
#   run-on NAME CMD...   run CMD on host NAME (its netns, hostname, /etc/hosts, /etc/slurm);
#   sbatch, squeue, sacct, scontrol, scancel, sinfo, sacctmgr: the real ones, run on the head
#   (put $HOSTS_BIN first on PATH to use the hosts cluster from the root namespace).
set -euo pipefail

STATE=/run/gan_dist-slurm/started
RECORD=$STATE
MARK="# written by gan_dist .ci/local_slurm.sh"
# First lines of the files this script wrote when it lived at launch/local_slurm.sh: still its own,
# so `start` rewrites them (with $MARK) instead of keeping them as someone else's configuration.
OLD_MARKS=("# written by gan_dist launch/local_slurm.sh")
DB_PASS=gan_dist_local_slurm  # the database only listens on a root-owned local socket
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop goes backwards
declare -A PIDFILE=(
    [munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mysqld.pid [slurmdbd]=/run/slurm/slurmdbd.pid
    [slurmctld]=/run/slurm/slurmctld.pid [slurmd]=/run/slurm/slurmd.pid
)

HOSTS_ETC=/etc/slurm-hosts
HOSTS_RUN=/run/gan_dist-slurm-hosts
HOSTS_STATE=$HOSTS_RUN/started
HOSTS_BIN=$HOSTS_RUN/bin
HOSTS_LIB=/var/lib/slurm-hosts
HOSTS_LOG=/var/log/slurm-hosts
HOSTS_DB=gan_dist_hosts_acct_db
HOSTS_CLIENTS=(sbatch squeue sacct scontrol scancel sinfo sacctmgr)
EXIT_NO_PACKAGES=3  # hosts-start: Slurm is not installed and could not be

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }

# Poll a command until it succeeds, for at most $1 seconds.
wait_for() {
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "timed out after ${limit}s waiting for $what"
    return 1
}

# PID 1 may not reap orphans (in a container, say): a zombie named like the daemon does not count
# as running. Only this network namespace counts: the hosts cluster's daemons run in others.
running() { pgrep -x -r D,I,R,S --ns $$ --nslist net "$1" >/dev/null; }
# Pid file $1 names a live process called $2.
names_process() { [[ "$(ps -o comm= -p "$(cat "$1")")" == "$2" ]]; }
gone() { local s; s=$(ps -o stat= -p "$1") || return 0; [[ $s == Z* ]]; }
# Stop daemon $1 at PID $2 (on host $3, if given) unless that PID is no longer it; fails if it
# outlives 30 s.
end_daemon() {
    [[ "$(ps -o comm= -p "$2" 2>/dev/null)" == "$1" ]] || return 0
    kill "$2"
    wait_for 30 "$1 ($2)${3:+ on $3} to exit" gone "$2" || return 1
    say "stopped $1 ($2)${3:+ on $3}"
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || return
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Whether file $1 was written by this script: its first line is $MARK or an earlier mark.
ours() {
    local first m
    first=$(head -n1 "$1")
    for m in "$MARK" "${OLD_MARKS[@]}"; do
        [[ $first == "$m" ]] && return 0
    done
    return 1
}

# Write $1 from stdin unless it holds someone else's configuration; keep it when unchanged.
write_config() {
    local path=$1 new
    new=$(cat)
    if [[ -e $path ]] && ! ours "$path"; then
        say "keeping $path: not written by this script"
        return
    fi
    [[ -e $path && "$(cat "$path")" == "$new" ]] || printf '%s\n' "$new" >"$path"
}

# The settings both clusters share; $1 is AccountingStorageHost (where slurmdbd listens).
policy_conf() {
    cat <<EOF
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it starts again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$1
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=5
MinJobAge=300
MailProg=/bin/true
EOF
}

# debug (the default) is preempted by urgent: requeued after a 30 s grace time.
partitions_conf() {
    cat <<EOF
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

configure() {
    local host mem_kb node
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.1.1 $host" >>/etc/hosts
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    node=$(slurmd -C | head -n1 | sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem_kb * 9 / 10 / 1024))/")
    install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
    prepare_shared
    write_config /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=ci
SlurmctldHost=$host
$(policy_conf localhost)
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node State=UNKNOWN
$(partitions_conf)
EOF
    write_config /etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
}

# What both clusters share: munge's key and directories, MariaDB's data and directories.
prepare_shared() {
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    install -d -o mysql -g mysql /run/mysqld /var/log/mysql
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
}

slurmdbd_listening() { (exec 3<>/dev/tcp/127.0.0.1/6819); }
queue_empty() { [[ -z "$(squeue -h)" ]]; }
node_up() { sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)$'; }

# Start daemon $1 of the root namespace unless it runs; record it in $RECORD (default $STATE).
start_daemon() {
    local name=$1
    if running "$name"; then
        say "$name already running"
        return
    fi
    case $name in
        munged) runuser -u munge -- /usr/sbin/munged ;;
        mariadbd)
            setsid mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
                --pid-file=/run/mysqld/mysqld.pid --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
            wait_for 60 "mariadbd's socket" mariadb -u root -e "SELECT 1"
            mariadb -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
            ;;
        slurmdbd) slurmdbd && wait_for 60 "slurmdbd on port 6819" slurmdbd_listening ;;
        slurmctld) slurmctld && wait_for 60 "slurmctld" scontrol ping ;;
        slurmd) slurmd ;;
    esac
    # The daemons fork: the PID that counts is the one in the pid file, once it names a live $name.
    wait_for 30 "$name's pid file" names_process "${PIDFILE[$name]}" "$name"
    sed -i "/^$name /d" "$RECORD"
    echo "$name $(cat "${PIDFILE[$name]}")" >>"$RECORD"
    say "started $name"
}

start() {
    [[ $EUID -eq 0 ]] || die "run me as root"
    install_packages
    configure
    mkdir -p "$(dirname "$STATE")"
    touch "$STATE"
    local d
    for d in "${DAEMONS[@]}"; do start_daemon "$d"; done
    # A node left down or drained by an earlier unclean stop is put back into service.
    if ! node_up; then
        sleep 2
        node_up || scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
    fi
    wait_for 60 "the node to be idle" node_up
    sinfo
}

stop() {
    [[ -s $STATE ]] || { say "nothing to stop: this script started no daemon"; return; }
    if grep -q '^slurmctld ' "$STATE"; then
        # Job steps outlive slurmd under proctrack/linuxproc: cancel them while slurmd still runs.
        scancel --full --user=root 2>/dev/null || true
        wait_for 60 "the queue to empty" queue_empty || true
    fi
    local i name pid
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        read -r name pid < <(grep "^${DAEMONS[i]} " "$STATE") || continue
        end_daemon "$name" "$pid"
    done
    rm -f "$STATE"
}

status() {
    local d
    for d in "${DAEMONS[@]}"; do
        printf '%-10s %s\n' "$d" "$(running "$d" && echo running || echo stopped)"
    done
    [[ -s $STATE ]] && echo "started by this script (name pid):" && cat "$STATE"
    if running slurmctld; then sinfo && squeue; fi
}

# ------------------------------------------------------------------------- the hosts cluster
# Hosts are given as NAME=NETNS@ADDR; the first is the head. H_NAME[i], H_NS[i], H_ADDR[i].
H_NAME=() H_NS=() H_ADDR=()

parse_hosts() {
    local spec
    H_NAME=() H_NS=() H_ADDR=()
    for spec in "$@"; do
        [[ $spec =~ ^([A-Za-z][A-Za-z0-9-]*)=([A-Za-z0-9_.-]+)@([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)$ ]] ||
            die "bad host '$spec': expected NAME=NETNS@ADDR (node1=ns1@10.231.0.1)"
        H_NAME+=("${BASH_REMATCH[1]}") H_NS+=("${BASH_REMATCH[2]}") H_ADDR+=("${BASH_REMATCH[3]}")
    done
    ((${#H_NAME[@]} > 0)) || die "name the hosts: NAME=NETNS@ADDR..., the head first"
}

# Run "$@" on host $1 (an index), through $HOSTS_BIN/run-on: in its network namespace, under its own
# hostname (a UTS namespace), with /etc/netns/<netns>/* over /etc/* (as `ip netns exec` does) and
# $HOSTS_ETC over /etc/slurm, in a private mount namespace. Not `ip netns exec` itself: it mounts a
# fresh /sys, which hides /sys/fs/cgroup, and slurmd 22.05 does not start without a cgroup plugin
# ("No filesystem mounted on /sys/fs/cgroup") even with proctrack/linuxproc and task/none.
on_host() { "$HOSTS_BIN/run-on" "${H_NAME[$1]}" "${@:2}"; }
# What run-on's sh runs: $0 the host's name, $1 its netns, then the command.
# shellcheck disable=SC2016  # expanded by that sh
ON_HOST='ns=$1; shift
for f in /etc/netns/"$ns"/*; do
    if [ -f "$f" ]; then mount --bind "$f" "/etc/${f##*/}" || exit 1; fi
done
mount --bind '"$HOSTS_ETC"' /etc/slurm && hostname "$0" && exec "$@"'

on_head() { on_host 0 "$@"; }

hosts_pidfile() {
    case $1 in
        slurmdbd | slurmctld) echo "$HOSTS_RUN/pid/$1.pid" ;;
        slurmd) echo "$HOSTS_RUN/pid/slurmd-$2.pid" ;;
    esac
}

# The PID recorded for daemon $1 of host $2 in $HOSTS_STATE, if it still runs.
hosts_running() {
    local pid
    pid=$(awk -v d="$1" -v h="$2" '$1 == d && $2 == h {print $3}' "$HOSTS_STATE" 2>/dev/null)
    [[ -n $pid && "$(ps -o comm= -p "$pid" 2>/dev/null)" == "$1" ]] && ! gone "$pid" && echo "$pid"
}

hosts_dbd_listening() { on_head bash -c 'exec 3<>"/dev/tcp/$0/6819"' "${H_ADDR[0]}"; }
hosts_queue_empty() { [[ -z "$(on_head squeue -h)" ]]; }
# Every host is a node in service.
hosts_nodes_up() {
    local up
    up=$(on_head sinfo -h -N -p debug -o %t | grep -cE '^(idle|mix|alloc)$') || true
    ((up == ${#H_NAME[@]}))
}

hosts_configure() {
    local head=${H_NAME[0]} mem_kb hw nodes="" i
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # Every host is this machine: its cores, and a share of its memory.
    hw=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+ //; s/RealMemory=[0-9]+/RealMemory=$((mem_kb * 9 / 10 / 1024 / ${#H_NAME[@]}))/")
    for i in "${!H_NAME[@]}"; do
        nodes+="NodeName=${H_NAME[i]} NodeAddr=${H_ADDR[i]} $hw State=UNKNOWN"$'\n'
    done
    install -d "$HOSTS_ETC" "$HOSTS_BIN"
    install -d -o slurm -g slurm "$HOSTS_RUN/pid" "$HOSTS_LIB/slurmctld" "$HOSTS_LOG"
    for i in "${!H_NAME[@]}"; do install -d -o slurm -g slurm "$HOSTS_LIB/slurmd-${H_NAME[i]}"; done
    prepare_shared
    write_config "$HOSTS_ETC/slurm.conf" <<EOF
$MARK
ClusterName=hosts
SlurmctldHost=$head(${H_ADDR[0]})
$(policy_conf "$head")
StateSaveLocation=$HOSTS_LIB/slurmctld
SlurmdSpoolDir=$HOSTS_LIB/slurmd-%n
SlurmctldPidFile=$(hosts_pidfile slurmctld)
SlurmdPidFile=$HOSTS_RUN/pid/slurmd-%n.pid
SlurmctldLogFile=$HOSTS_LOG/slurmctld.log
SlurmdLogFile=$HOSTS_LOG/slurmd-%n.log
${nodes%$'\n'}
$(partitions_conf)
EOF
    write_config "$HOSTS_ETC/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$head
DbdPort=6819
SlurmUser=slurm
PidFile=$(hosts_pidfile slurmdbd)
LogFile=$HOSTS_LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=$HOSTS_DB
EOF
    chown slurm:slurm "$HOSTS_ETC/slurmdbd.conf"
    chmod 600 "$HOSTS_ETC/slurmdbd.conf"
}

# $HOSTS_BIN/run-on NAME CMD..., and the client commands for the root namespace (run on the head).
hosts_wrappers() {
    local c real i cases=""
    for i in "${!H_NAME[@]}"; do cases+="    ${H_NAME[i]}) ns=${H_NS[i]} ;;"$'\n'; done
    cat >"$HOSTS_BIN/run-on" <<EOF
#!/bin/sh
# written by gan_dist .ci/local_slurm.sh hosts-start: run-on NAME CMD [ARG...] runs CMD on host NAME
case \$1 in
$cases    *) echo "run-on: no host '\$1' (hosts: ${H_NAME[*]})" >&2; exit 2 ;;
esac
name=\$1
shift
exec nsenter --net="/run/netns/\$ns" unshare --mount --propagation private --uts sh -c '$ON_HOST' "\$name" "\$ns" "\$@"
EOF
    chmod 755 "$HOSTS_BIN/run-on"
    for c in "${HOSTS_CLIENTS[@]}"; do
        real=$(command -v "$c") || continue
        cat >"$HOSTS_BIN/$c" <<EOF
#!/bin/sh
# written by gan_dist .ci/local_slurm.sh hosts-start: $c of the hosts cluster, run on ${H_NAME[0]}
exec $HOSTS_BIN/run-on ${H_NAME[0]} $real "\$@"
EOF
        chmod 755 "$HOSTS_BIN/$c"
    done
}

# Start daemon $1 on host $2 (an index) unless this script's record says it runs there.
hosts_start_daemon() {
    local name=$1 i=$2 host=${H_NAME[$2]} pidfile
    pidfile=$(hosts_pidfile "$name" "$host")
    if hosts_running "$name" "$host" >/dev/null; then
        say "$name on $host already running"
        return
    fi
    rm -f "$pidfile"
    on_host "$i" "$(command -v "$name")" </dev/null >>"$HOSTS_LOG/$name-$host.out" 2>&1
    case $name in
        slurmdbd) wait_for 60 "slurmdbd on ${H_ADDR[i]}:6819" hosts_dbd_listening ;;
        slurmctld) wait_for 60 "slurmctld on $host" on_head scontrol ping ;;
    esac
    wait_for 30 "$name's pid file on $host" names_process "$pidfile" "$name"
    sed -i "/^$name $host /d" "$HOSTS_STATE"
    echo "$name $host $(cat "$pidfile")" >>"$HOSTS_STATE"
    say "started $name on $host (${H_ADDR[i]}, netns ${H_NS[i]})"
}

hosts_start() {
    [[ $EUID -eq 0 ]] || die "run me as root"
    parse_hosts "$@"
    command -v nsenter >/dev/null && command -v unshare >/dev/null || die "needs nsenter and unshare (util-linux)"
    local i
    for i in "${!H_NAME[@]}"; do
        [[ -e /run/netns/${H_NS[i]} ]] || die "no network namespace ${H_NS[i]} (make the hosts first)"
    done
    mkdir -p "$HOSTS_RUN"
    touch "$HOSTS_STATE"
    if [[ -s $HOSTS_RUN/hosts && "$(cat "$HOSTS_RUN/hosts")" != "$*" ]] && grep -q '^slurm' "$HOSTS_STATE"; then
        die "the hosts cluster already runs on other hosts ($(cat "$HOSTS_RUN/hosts")): hosts-stop first"
    fi
    install_packages || { say "cannot install ${PACKAGES[*]}"; exit "$EXIT_NO_PACKAGES"; }
    hosts_configure
    hosts_wrappers
    echo "$*" >"$HOSTS_RUN/hosts"
    # munged and mariadbd are shared with the single-node cluster: whichever started one owns it.
    RECORD=$HOSTS_STATE
    start_daemon munged
    start_daemon mariadbd
    mariadb -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON $HOSTS_DB.* TO 'slurm'@'localhost';"
    hosts_start_daemon slurmdbd 0
    hosts_start_daemon slurmctld 0
    for i in "${!H_NAME[@]}"; do hosts_start_daemon slurmd "$i"; done
    # Jobs left by an unclean stop would hold the nodes: cancel them.
    if [[ -n "$(on_head squeue -h)" ]]; then
        on_head scancel --full --user=root || true
        wait_for 60 "old jobs to leave the queue" hosts_queue_empty
    fi
    if ! hosts_nodes_up; then
        sleep 2
        hosts_nodes_up || on_head scontrol update NodeName="$(IFS=,; echo "${H_NAME[*]}")" State=RESUME 2>/dev/null || true
    fi
    wait_for 60 "every host to be an idle node" hosts_nodes_up
    on_head sinfo -N
}

hosts_stop() {
    [[ -s $HOSTS_STATE ]] || { say "nothing to stop: hosts-start started no daemon"; return; }
    # shellcheck disable=SC2046  # the recorded specs are single words
    parse_hosts $(cat "$HOSTS_RUN/hosts")
    # Job steps outlive slurmd under proctrack/linuxproc: cancel them while slurmd still runs.
    if hosts_running slurmctld "${H_NAME[0]}" >/dev/null && [[ -e /run/netns/${H_NS[0]} ]]; then
        on_head scancel --full --user=root 2>/dev/null || true
        wait_for 60 "the queue to empty" hosts_queue_empty || true
    fi
    local name host pid
    for name in slurmd slurmctld slurmdbd; do
        while read -r host pid; do
            end_daemon "$name" "$pid" "$host" || kill -9 "$pid"
        done < <(awk -v d="$name" '$1 == d && NF == 3 {print $2, $3}' "$HOSTS_STATE")
    done
    # The shared daemons go only when they were started for this cluster and no Slurm daemon is left.
    for name in mariadbd munged; do
        read -r _ pid < <(grep "^$name " "$HOSTS_STATE") || continue
        if running slurmdbd || running slurmctld || running slurmd; then
            say "leaving $name ($pid) running: another Slurm daemon still uses it"
            # The single-node cluster's `stop` ends it, then.
            [[ -s $STATE ]] && ! grep -q "^$name " "$STATE" && echo "$name $pid" >>"$STATE"
            continue
        fi
        end_daemon "$name" "$pid"
    done
    rm -rf "$HOSTS_STATE" "$HOSTS_RUN/hosts" "$HOSTS_BIN"
}

hosts_status() {
    [[ -s $HOSTS_STATE ]] || { echo "hosts cluster: not started"; return; }
    echo "hosts: $(cat "$HOSTS_RUN/hosts")"
    echo "started by hosts-start (name [host] pid):" && cat "$HOSTS_STATE"
    # shellcheck disable=SC2046
    parse_hosts $(cat "$HOSTS_RUN/hosts")
    if hosts_running slurmctld "${H_NAME[0]}" >/dev/null; then on_head sinfo -N && on_head squeue; fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    hosts-start) shift; hosts_start "$@" ;;
    hosts-stop) hosts_stop ;;
    hosts-status) hosts_status ;;
    *) die "usage: $0 {start|stop|status} | hosts-start NAME=NETNS@ADDR... | {hosts-stop|hosts-status}" ;;
esac
