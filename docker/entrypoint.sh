#!/usr/bin/env bash
# Entry point of the gan_dist image.
#   no arguments, or trainer arguments (key=value, --help, --dry-run): train, over NPROC ranks on this
#       host (default: one per visible GPU), with --config "$CONFIG" when CONFIG is set;
#   a program as first argument (python, bash, ...): that command, run as given.
set -euo pipefail
# Waiting OpenMP threads sleep rather than spin, unless the caller chose: containers share their
# host's cores, and spinning threads take cores from the work.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# `docker run IMAGE python -m gan_dist.train --help` or `... bash` must reach the program itself,
# while `docker run IMAGE train.max_steps=20` only adds overrides to the default training command.
if [[ $# -gt 0 ]] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi

config=()
if [[ -n "${CONFIG:-}" ]]; then
    config=(--config "$CONFIG")
fi

# exec, in both cases: the trainer (or torchrun, which forwards signals to the ranks) becomes the
# container's main process, so `docker stop`'s SIGTERM reaches it and a checkpoint is saved.
nproc=${NPROC:-gpu}
if [[ $nproc == 1 ]]; then
    # One rank needs no rendezvous, hence no torchrun.
    exec python3 -m gan_dist.train "${config[@]}" "$@"
fi
# `python3 -m torch.distributed.run` is torchrun, minus the console script that some torch packagings
# (Debian's) leave out. --standalone: the rendezvous stays on this host, on a free port, so two runs
# sharing the host's network (Apptainer, `docker run --network host`) do not collide. Runs over
# several nodes start through launch.slurm instead (docs/SLURM.md).
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    -m gan_dist.train "${config[@]}" "$@"
