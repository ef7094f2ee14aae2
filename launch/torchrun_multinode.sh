#!/usr/bin/env bash
# Multi-node training without Slurm: run this on every node, with the same settings.
#
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0:29500 RUN_ID=mnist-1 \
#       launch/torchrun_multinode.sh --config configs/mnist_cgan.yaml train.batch_size=128
#
# NNODES         nodes taking part (MIN:MAX lets torchrun start with fewer)
# RDZV_ENDPOINT  host:port that every node reaches; the agent on that host serves the c10d rendezvous
# RUN_ID         the rendezvous id: the same on every node, new for each launch (default gan_dist)
# NPROC_PER_NODE ranks per node (default "gpu": one per visible GPU; give a number on CPUs)
# MAX_RESTARTS   torchrun restarts of the whole group after a failure (default 0); a restart resumes
#                from run_dir's newest checkpoint, as any relaunch does
# PYTHON         interpreter with gan_dist installed (default python)
# GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                the interface for the ranks' traffic; default: the one that routes to the
#                rendezvous host (launch/netif.py). Set either (even empty) to choose yourself.
#
# Arguments go to gan_dist.train unchanged. run_dir must be one shared folder (rank 0 writes it).
# SIGTERM to torchrun on every node stops the ranks at the next step with a checkpoint saved
# (exit 75); launching again with the same run_dir resumes. On a node cut off from the rendezvous
# host, torchrun is killed a minute after its ranks have all exited 4 (lost a peer), saying why.
set -euo pipefail

: "${NNODES:?set NNODES: the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"

# One store per attempt: restart counts are per node, so they cannot scope a shared store's keys
# across nodes, and a restarted rank could read the address a dead peer left in it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# Waiting OpenMP threads sleep rather than spin, unless the caller chose: on a node whose cores the
# ranks, gloo and other jobs share, spinning threads take cores from the work.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# The interface that reaches the rendezvous host carries gloo's and NCCL's traffic: by default gloo
# binds the address the hostname resolves to, which on many nodes (a management network, Debian's
# 127.0.1.1) the peers cannot reach. For the same reason torchrun may not see that the rendezvous
# address is this host's own (on a second interface, say), and then no agent serves the rendezvous:
# for such an address (not loopback, which torchrun recognises) this agent is told to serve it.
host=${RDZV_ENDPOINT%:*}
host=${host#[}
rdzv_conf=()
if route=$("${PYTHON:-python}" "$(dirname "$0")/netif.py" "${host%]}"); then
    read -r ifname where <<<"$route"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME-$ifname}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME-$ifname}"
    [[ $where == local ]] && rdzv_conf=(--rdzv-conf=is_host=true)
fi

# torchrun's agent on a node cut off from the rendezvous host blocks in a read from the store, which
# ends only when the kernel gives the connection up (net.ipv4.tcp_retries2: about 15 minutes), long
# after its ranks have exited 4 (lost a peer). An agent that is not blocked reaps an exited rank within
# its monitor interval (0.1 s), so ranks that all exited 4 and stay unreaped for STUCK_S (beyond the
# store's own 60 s read timeout) mean a blocked agent, and the watchdog below kills it: SIGTERM would
# not end it, as Python runs the handler only once the read returns.
STUCK_S=60
LOST_PEER=4
agent=$$  # torchrun, which keeps this script's PID

# Whether torchrun has children, and every one has exited with LOST_PEER and is still unreaped.
ranks_lost_a_peer() {
    local file stat fields ranks=0
    for file in /proc/[0-9]*/stat; do
        read -r stat 2>/dev/null <"$file" || continue
        fields=(${stat##*) })  # the fields after the command name, which may hold spaces: state, ppid, ...
        [[ ${fields[1]} == "$agent" ]] || continue
        # Field 52, exit_code, is the status as waitpid reports it.
        [[ ${fields[0]} == Z ]] && ((fields[49] == LOST_PEER << 8)) || return 1
        ranks=$((ranks + 1))
    done
    ((ranks > 0))
}

watch_agent() {
    local stuck_since=
    while true; do
        read -r -t 5 && continue
        (($? > 128)) || return 0  # not a timeout but the end of the pipe: torchrun has ended
        if ! ranks_lost_a_peer; then
            stuck_since=
        elif ((SECONDS - ${stuck_since:=$SECONDS} >= STUCK_S)); then
            echo "torchrun_multinode.sh: every rank on $HOSTNAME exited $LOST_PEER (lost a peer), and torchrun," \
                "blocked on the rendezvous store that this node cannot reach, has not noticed in ${STUCK_S}s:" \
                "killing it" >&2
            kill -KILL "$agent"
            return 0
        fi
    done
}
# The watchdog reads a pipe whose only writer is torchrun (fd 9), so it ends with torchrun. It is
# detached (its subshell ends at once), so that torchrun's only children are its ranks.
pipe=$(mktemp -d)
mkfifo "$pipe/agent"
exec 9<>"$pipe/agent" 8<"$pipe/agent"
rm -r "$pipe"
(watch_agent <&8 8<&- 9>&- >/dev/null &)
exec 8<&-

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc-per-node="${NPROC_PER_NODE:-gpu}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_ENDPOINT" \
    --rdzv-id="${RUN_ID:-gan_dist}" \
    "${rdzv_conf[@]}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m gan_dist.train "$@"
