"""Communication share of training across two hosts, on a clean link and a slow one, side by side.

Usage (root: the hosts are network namespaces, see tests/hosts.py; trailing key=value are config overrides):
    python benchmarks/multihost.py --rate 200mbit --steps 40 --rounds 3
    python benchmarks/multihost.py --rate 50mbit model.arch=dcgan model.dcgan.width=16

Each round runs one rank on each of two hosts, node1 and node2, first on a clean link, then with
everything node2 sends throttled to --rate (a tc token bucket). The ranks are the benchmark's own gan_dist
workers (``benchmarks/bench.py``: the trainer's wiring, with a DDP comm hook that times every all-reduce),
under torchrun with the c10d rendezvous at node1, one thread each. The table gives per link the step
time, the time all-reduces were in flight and their share of the step, medians over rounds, and the
ratio of the slow link's step time to the clean one's, taken per round.
Exit status: 0 done; 1 a run failed; 2 bad arguments, config or data, or no hosts can be made here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Run by path (python benchmarks/multihost.py), Python puts benchmarks/ on sys.path, not the repository root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hosts as netns  # noqa: E402  (tests/hosts.py)

from benchmarks import bench  # noqa: E402
from gan_dist import cli  # noqa: E402
from gan_dist.dist import usable_cores  # noqa: E402

PROG = "python benchmarks/multihost.py"
RDZV = f"{netns.CLUSTER_NET}.1:29400"


def rank_argv(args: argparse.Namespace, out: Path, run_id: str, serves: bool) -> list[str]:
    """torchrun for one host; ``serves``: this host's agent serves the rendezvous (node1)."""
    worker = [str(bench.SCRIPT), "--worker", "gan", "--out", str(out), "--config", args.config,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--device", "cpu", "dist.threads=1", *args.overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={RDZV}", f"--rdzv-id={run_id}",
            *(["--rdzv-conf=is_host=true"] if serves else []), *worker]


def one_run(args: argparse.Namespace, hosts: Sequence[netns.Host], tag: str) -> list[dict]:
    """Both ranks' results of one run; the launcher's choices (interface, rendezvous host) made by hand."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": "eth0",
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with tempfile.TemporaryDirectory(prefix="gan_dist_multihost_") as out:
        logs = [Path(out, f"{h.name}.log") for h in hosts]
        procs = []
        for i, (h, log) in enumerate(zip(hosts, logs, strict=True)):
            with open(log, "wb") as f:  # a file, not a pipe: a full pipe would stall its rank, and then both
                procs.append(h.popen(rank_argv(args, Path(out), tag, serves=i == 0), env=env, cwd=ROOT,
                                     stdout=f, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=args.timeout) for p in procs]
        except subprocess.TimeoutExpired:
            for h in hosts:
                h.kill()
            raise bench.CaseFailed(f"{tag}: not done after {args.timeout}s") from None
        files = sorted(Path(out).glob("rank*.json"))
        if any(codes) or len(files) != 2:
            raise bench.CaseFailed(f"{tag}: exit codes {codes}\n{logs[0].read_text(errors='replace')[-3000:]}")
        return [json.loads(f.read_text()) for f in files]


def summary(results: list[list[dict]]) -> dict[str, float]:
    """Medians over rounds of the slower rank's step and comm times (a step waits for the slowest)."""
    step = [max(r["step_ms"] for r in ranks) for ranks in results]
    comm = [max(r["phases_ms"]["comm"] for r in ranks) for ranks in results]
    return {"step_ms": statistics.median(step), "comm_ms": statistics.median(comm),
            "comm_share": statistics.median(c / s for c, s in zip(comm, step, strict=True))}


def run(args: argparse.Namespace) -> int:
    why = netns.unavailable()
    if why:
        print(f"error: no hosts can be made here: {why}", file=sys.stderr)
        return cli.EXIT_USAGE
    results: dict[str, list[list[dict]]] = {"clean": [], "slow": []}
    with netns.Hosts(2) as hosts:
        for round_no in range(args.rounds):
            for link in results:
                print(f"round {round_no + 1}/{args.rounds}: {link} link", file=sys.stderr, flush=True)
                hosts[1].throttle(args.rate if link == "slow" else "10gbit")
                results[link].append(one_run(args, hosts, f"{link}{round_no}"))
    rows = {link: summary(r) for link, r in results.items()}
    ratios = [max(r["step_ms"] for r in s) / max(r["step_ms"] for r in c)
              for c, s in zip(results["clean"], results["slow"], strict=True)]
    print(f"$ {shlex.join([*shlex.split(PROG), *sys.argv[1:]])}")
    print(f"CPU: {bench._device_name('cpu')} ({bench._capability('cpu')}), {usable_cores()} cores; "
          f"2 hosts x 1 rank, 1 thread each, batch {args.batch} per rank; "
          f"{args.steps} timed steps, {args.rounds} rounds")
    print(f"{'link':<22} {'step ms':>8} {'comm ms':>8} {'comm share':>10}")
    for link, row in rows.items():
        label = f"slow ({args.rate})" if link == "slow" else "clean (10gbit bucket)"
        print(f"{label:<22} {row['step_ms']:8.1f} {row['comm_ms']:8.1f} {row['comm_share']:10.1%}")
    print(f"slow / clean step time: {statistics.median(ratios):.2f}x (median of per-round ratios)")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(bench.DEFAULT_CONFIG), help="YAML config of the ranks")
    parser.add_argument("--rate", default="200mbit", help="node2's send rate on the slow link (tc: 200mbit, 1gbit)")
    parser.add_argument("--steps", type=cli.integer(1), default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=cli.integer(0), default=5, help="steps dropped before timing")
    parser.add_argument("--rounds", type=cli.integer(1), default=3, help="clean, slow rounds")
    parser.add_argument("--batch", type=cli.integer(1), default=64, help="batch per rank")
    parser.add_argument("--timeout", type=cli.integer(10), default=600, help="seconds one run may take")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        try:
            return run(args)
        except bench.CaseFailed as e:
            print(cli.error_line(e), file=sys.stderr)
            return bench.EXIT_FAILED

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
