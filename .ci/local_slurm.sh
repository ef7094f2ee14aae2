#!/usr/bin/env bash
# A real single-node Slurm cluster (with accounting) on a Debian machine, for tests and CI.
#
#   .ci/local_slurm.sh start    install what is missing, configure, start what is not running
#   .ci/local_slurm.sh stop     cancel the jobs, stop only the daemons that `start` started
#   .ci/local_slurm.sh status   daemons, node state, queue
#
# Root only; works without systemd or cgroups. Partitions: `debug` (default, preemptable by
# requeue after a 30 s grace time) and `urgent` (preempts `debug`). Accounting (slurmdbd on
# MariaDB) is not optional: without it `sacct` fails and submitit waits forever on a dead job.
# Daemons this script starts are recorded in $STATE; `stop` ends those PIDs and nothing else.
set -euo pipefail

STATE=/run/gan_dist-slurm/started
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
# as running.
running() { pgrep -x -r D,I,R,S "$1" >/dev/null; }
owns_pidfile() { [[ "$(ps -o comm= -p "$(cat "${PIDFILE[$1]}")")" == "$1" ]]; }
gone() { local s; s=$(ps -o stat= -p "$1") || return 0; [[ $s == Z* ]]; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
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

configure() {
    local host mem_kb node
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.1.1 $host" >>/etc/hosts
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    node=$(slurmd -C | head -n1 | sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem_kb * 9 / 10 / 1024))/")
    install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    install -d -o mysql -g mysql /run/mysqld /var/log/mysql
    write_config /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=ci
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it starts again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
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
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
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
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
}

slurmdbd_listening() { (exec 3<>/dev/tcp/127.0.0.1/6819); }
queue_empty() { [[ -z "$(squeue -h)" ]]; }
node_up() { sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)$'; }

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
    wait_for 30 "$name's pid file" owns_pidfile "$name"
    sed -i "/^$name /d" "$STATE"
    echo "$name $(cat "${PIDFILE[$name]}")" >>"$STATE"
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
        if [[ "$(ps -o comm= -p "$pid" 2>/dev/null)" == "$name" ]]; then
            kill "$pid"
            wait_for 30 "$name ($pid) to exit" gone "$pid"
            say "stopped $name ($pid)"
        fi
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

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 {start|stop|status}" ;;
esac
