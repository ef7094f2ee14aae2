#!/usr/bin/env bash
# Every GPU check of gan_dist in one call: correctness on the device, the entry points, ranks sharing
# the GPU, and throughput. The stages live in benchmarks/gpu_stages/, in the order and with the timeouts
# of benchmarks/gpu_check.py; this script runs each in its own process under its own timeout, so a crash
# or a hang costs one stage, and then summarises.
#
# Data: the stages read DATA_ROOT (default .bench_data, inside the working tree, so a copy of the tree
# carries it to the GPU machine; .gitignore keeps it out of git). Fill it once, e.g. from Debian's
# dataset-fashion-mnist package:
#   mkdir -p .bench_data && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .bench_data/
# (train-* for training and the judge, t10k-* as the evaluation reference.) Then, on the GPU machine:
#   bash benchmarks/gpu_check.sh      # under an outer timeout of 7 minutes: the budget below plus slack
# The stages share a time budget (GPU_CHECK_BUDGET_S, default 360 s on CUDA, of which RESERVE_S=10 is kept
# for the summary): a stage starts with the smaller of its own timeout and what is left, and is skipped when
# under 15 s are left. On CUDA the check and speed stages' timeouts add up to less than the budget, so none
# is cut short by it; the spare speed stages after them run only on what the others left unused.
# Correctness stages come first, in order of value, the throughput stages after them;
# `python -m benchmarks.gpu_check plan --work W --out O` lists them (name, timeout, kind), and each stage
# function's docstring says what it checks and measures.
# The summary is printed in every case: after the last stage, when the budget ran out, and when this script
# gets SIGTERM or SIGINT (it stops the running stage, which is then reported interrupted, and summarises
# what the stages recorded).
#
# CPU mode: `bash benchmarks/gpu_check.sh --cpu` (or GPU_CHECK_DEVICE=cpu) runs the same stages, on tiny
# sizes; a CUDA-only stage records why it cannot run and is reported skipped. tests/test_gpu_check.py runs
# it on a dataset it writes.
#
# Environment: OUT (default runs/gpu_check), DATA_ROOT (.bench_data), DATA_NAME (fashion_mnist),
# DATA_SPLIT (train), PYTHON (python3), GPU_CHECK_WORK (scratch; default a temporary folder, removed).
#
# Writes under $OUT: gpu_check.log (everything printed), summary.json (every stage's status, checks,
# measurements and speed targets), bench.json (the bench reports and the batch sweep), samples_grid.png
# (sampled on the CPU from the GPU checkpoint).
# Exit status: 0 every correctness check passed; 1 a check failed, or a correctness stage crashed, timed
# out, was interrupted or did not run. A stage skipped (out of time, or not runnable on this device) is
# reported and does not fail. Speed targets are reported beside the checks and never change the exit
# status; a throughput stage that times out or is skipped is reported, one that crashes counts as a failed
# check.
set -uo pipefail

cd "$(dirname "$0")/.."
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
[[ "${1:-}" == --cpu ]] && DEVICE=cpu
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"
if [[ "$DEVICE" == cuda ]]; then BUDGET="${GPU_CHECK_BUDGET_S:-360}"; else BUDGET="${GPU_CHECK_BUDGET_S:-1200}"; fi
RESERVE=10  # for the summary: benchmarks/gpu_check.py's RESERVE_S
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
    WORK="$GPU_CHECK_WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$OUT" "$WORK/stages"
rm -f "$WORK"/stages/*
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# tee ignores SIGINT and SIGTERM (an ignored signal stays ignored across exec): a signal sent to this
# script's process group must not take the log, and the summary written to it, down with it.
exec > >(trap '' INT TERM; exec tee "$OUT/gpu_check.log") 2>&1
TEE=$!

ARGS=(--device "$DEVICE" --work "$WORK" --out "$OUT" "data.name=${DATA_NAME:-fashion_mnist}"
      "data.root=${DATA_ROOT:-.bench_data}" "data.split=${DATA_SPLIT:-train}" "data.download=false")
STAGE="" STAGE_PID="" STAGE_START=0

summarise() {  # the summary of what the stages recorded, then exit with its status
    trap '' INT TERM
    echo "== summary"
    (trap '' INT TERM; exec "$PY" -m benchmarks.gpu_check summary "${ARGS[@]}")
    local status=$?
    exec >&- 2>&-  # let tee finish the log before the results are collected
    wait "$TEE"
    exit "$status"
}

interrupted() {  # SIGINT or SIGTERM: stop the running stage (timeout passes the signal on), then summarise
    trap '' INT TERM
    echo "== got SIG$1: stopping${STAGE:+ $STAGE}, then the summary"
    if [[ -n "$STAGE_PID" ]]; then
        kill -TERM "$STAGE_PID" 2>/dev/null
        wait "$STAGE_PID"
        echo "interrupted $((SECONDS - STAGE_START))" >"$WORK/stages/$STAGE.rc"
    fi
    summarise
}
trap 'interrupted INT' INT
trap 'interrupted TERM' TERM

echo "gpu_check on $DEVICE: budget ${BUDGET} s (${RESERVE} s of it for the summary), results in $OUT"
while read -r name timeout kind; do
    left=$((BUDGET - RESERVE - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped, ${left} s left of the budget"
        echo "skipped 0" >"$WORK/stages/$name.rc"
        continue
    fi
    ((timeout > left)) && timeout=$left
    echo "== $name (timeout ${timeout} s, $kind)"
    # In the background, so that a signal reaches the trap at once rather than when the stage has ended.
    STAGE="$name" STAGE_START=$SECONDS
    timeout --kill-after=10 "$timeout" "$PY" -m benchmarks.gpu_check "$name" "${ARGS[@]}" </dev/null &
    STAGE_PID=$!
    wait "$STAGE_PID"
    rc=$?
    STAGE="" STAGE_PID=""
    echo "$rc $((SECONDS - STAGE_START))" >"$WORK/stages/$name.rc"
    ((rc == 124 || rc == 137)) && echo "   $name: TIMED OUT after ${timeout} s"
done < <("$PY" -m benchmarks.gpu_check plan "${ARGS[@]}")

summarise
