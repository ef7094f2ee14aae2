#!/usr/bin/env bash
# Smoke test of docker/Dockerfile that needs no Docker daemon and pulls nothing from an image registry.
# It builds the image with podman, then runs three containers:
#   1. `id -u` and `python -m gan_dist.train --help`;
#   2. the default entry point with NPROC=1: 20 training steps on the CPU;
#   3. 20 DDP steps over 2 CPU ranks (gloo), started by hand with env:// variables.
# The training data is a tiny made-up MNIST, mounted read-only; nothing in the runs uses the network.
#
# Nothing is pulled, so BASE_IMAGE is a local stand-in for the pinned CUDA base, with the same contract
# (Python >= 3.11, pip, torch, torchvision): Debian trixie made with debootstrap, with Debian's CPU
# builds of torch 2.6 and torchvision 0.21. The alternatives fail: bookworm's torch (1.13) is older than
# pyproject's torch>=2.4; PyPI's x86_64 torch is a CUDA build of several GB, and PyPI's torchvision does
# not import beside a CPU-only torch wheel.
# What this base cannot check: the entry point's torchrun path (NPROC > 1). Debian builds torch without
# libuv, and torchrun's rendezvous store insists on it, so run 3 starts its ranks without torchrun.
#
# Run as root: bash docker/smoke.sh. Root because debootstrap, podman's vfs storage and its chroot
# isolation need it; vfs and chroot are used because they need neither a daemon nor an overlay file
# system. The first run needs Debian's mirror and PyPI, and installs podman, runc and debootstrap when
# missing. The base image is kept in $GAN_DIST_SMOKE_DIR (default /var/tmp/gan_dist-smoke) for later
# runs; delete that folder to rebuild it.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${GAN_DIST_SMOKE_DIR:-/var/tmp/gan_dist-smoke}
suite=trixie
base=localhost/gan_dist-smoke-base:$suite
image=localhost/gan_dist:smoke
# pip comes with python3-pip; `python` comes from the image's venv.
base_packages=python3,python3-pip,python3-torch,python3-torchvision

if [[ $EUID -ne 0 ]]; then
    echo "smoke.sh: run as root (debootstrap and podman's vfs storage need it)" >&2
    exit 1
fi

started=$SECONDS
say() { printf '[smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    # The lock timeout: wait for another apt-get or dpkg holding the lock instead of failing at once.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        "${missing[@]}" uidmap >/dev/null
fi

# A store of our own keeps these multi-GB vfs images apart from any other podman storage on the host,
# and goes away with $state.
mkdir -p "$state"
pm() { podman --root "$state/storage" --runroot "$state/run" --storage-driver vfs "$@"; }

if pm image exists "$base"; then
    say "base image $base: cached"
else
    say "base image $base: debootstrap $suite with $base_packages"
    rootfs=$state/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" http://deb.debian.org/debian \
        >"$state/debootstrap.log" || { tail -n 20 "$state/debootstrap.log" >&2; exit 1; }
    # The package lists and the downloaded .debs are of no use in an image.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    say "base image $base: importing"
    tar -C "$rootfs" -c . | pm import - "$base" >/dev/null
    rm -rf "$rootfs"
fi

say "building $image from docker/Dockerfile with BASE_IMAGE=$base"
# --pull=never: the base is local; the build never asks a registry.
# --layers=false: with vfs every intermediate image is a full copy of the root file system, so one
#   commit at the end copies it once rather than once per step (and the layer cache is Docker's
#   business, not this test's).
# --force-rm: a failed build leaves no multi-GB container behind.
# The volume: the RUN steps trust the CAs the host trusts (a TLS-intercepting proxy's, say) by
#   borrowing the host's CA bundle, mounted rather than copied, so it stays out of the image.
pm build --isolation chroot --pull=never --layers=false --force-rm \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg BASE_IMAGE="$base" -f "$repo/docker/Dockerfile" -t "$image" "$repo" >"$state/build.log" 2>&1 \
    || { tail -n 40 "$state/build.log" >&2; echo "smoke.sh: build failed, log in $state/build.log" >&2; exit 1; }
grep -E '^(STEP|Successfully installed)' "$state/build.log" | cut -c1-160

tmp=$(mktemp -d)
cleanup() {
    rm -rf "$tmp"
    pm rmi --force "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 256 random 28x28 images with labels, in MNIST's IDX format, as the test split.
mkdir -p "$tmp/data" "$tmp/runs"
python3 - "$tmp/data" <<'EOF'
import os
import random
import struct
import sys

n, rng = 256, random.Random(0)
with open(os.path.join(sys.argv[1], "t10k-images-idx3-ubyte"), "wb") as f:
    f.write(struct.pack(">IIII", 0x00000803, n, 28, 28) + rng.randbytes(n * 28 * 28))
with open(os.path.join(sys.argv[1], "t10k-labels-idx1-ubyte"), "wb") as f:
    f.write(struct.pack(">II", 0x00000801, n) + bytes(rng.randrange(10) for _ in range(n)))
EOF
# The image runs as uid 1000, not as the root who made this folder.
chmod 0777 "$tmp/runs"

# --runtime runc and fixed ulimits: the containers depend neither on the host's default OCI runtime
# nor on the host's own rlimits. --network none: training needs no network, and the DDP rendezvous
# stays on the container's loopback.
run=(pm run --rm --runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --network none
    -v "$tmp/data:/workspace/data:ro" -v "$tmp/runs:/workspace/runs")
train=(data.root=/workspace/data data.name=mnist data.split=test data.download=false
    log.wandb.mode=disabled train.max_steps=20 train.batch_size=16)

say "run 1: id -u, then python -m gan_dist.train --help"
"${run[@]}" "$image" bash -c 'id -u && python -m gan_dist.train --help' >"$tmp/help.txt"
uid=$(head -n 1 "$tmp/help.txt")
echo "uid in the container: $uid"
sed -n '2,4p' "$tmp/help.txt"
echo "... ($(($(wc -l <"$tmp/help.txt") - 1)) lines of help)"
if [[ $uid != 1000 ]]; then
    echo "smoke.sh: the image runs as uid $uid, not 1000" >&2
    exit 1
fi

say "run 2: default entry point, NPROC=1, 20 steps"
"${run[@]}" -e NPROC=1 "$image" "${train[@]}" run_dir=/workspace/runs/one
ls -l "$tmp/runs/one/checkpoints/step_20.pt"

say "run 3: 2 ranks over gloo, 20 steps"
# USE_LIBUV=0: Debian's torch has no libuv for the env:// store either. `wait -n` twice: the run fails
# as soon as either rank does. The single quotes are meant: the container's bash expands them.
# shellcheck disable=SC2016
"${run[@]}" -e USE_LIBUV=0 -e WORLD_SIZE=2 -e LOCAL_WORLD_SIZE=2 -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT=29500 \
    "$image" bash -c 'for rank in 0 1; do
            RANK=$rank LOCAL_RANK=$rank python -m gan_dist.train --config "$CONFIG" "$@" &
        done
        wait -n && wait -n' ranks "${train[@]}" run_dir=/workspace/runs/two
ls -l "$tmp/runs/two/checkpoints/step_20.pt"

say "removing $image"
trap - EXIT
cleanup
say "passed"
