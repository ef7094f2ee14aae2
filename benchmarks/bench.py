"""Benchmark gan_dist against the tutorial's training loop: images/s, step-time split, memory, FLOP/s.

Usage (from the repository root; trailing key=value are config overrides, as for gan_dist.train;
``python -m benchmarks.bench`` is the same command):
    python benchmarks/bench.py data.name=fashion_mnist data.root=/usr/share/datasets/fashion-mnist
    python benchmarks/bench.py --steps 300 --warmup 30 --rounds 5 --nproc 2 --batch 64 --json runs/bench.json
    python benchmarks/bench.py --compare amp.enabled=false     # also time (b) and (c) with this override
    python benchmarks/bench.py --compare-env OMP_WAIT_POLICY=PASSIVE --load 2   # a twin with this variable,
                                                                # all cases beside 2 busy processes
    python benchmarks/bench.py --device cuda --nproc 1 --batch 4096     # one GPU: (a) and (b) only

    python benchmarks/bench.py --config configs/folder_small.yaml --reference plain data.root=/data/emoji

Cases, each in a fresh process (so that peak memory is its own), alternating A B C A B C for --rounds:
  (a) reference, one of two (``--reference``; auto: tutorial for the tutorial's MLP on data it fits, else plain):
      tutorial: the tutorial's loop as written (``benchmarks/tutorial.py``), fixed only so that G learns.
        It keeps the tutorial's models, BCELoss and Adam(lr=1e-4) whatever the config says.
      plain: the config's own G and D trained by a hand-written PyTorch loop at the same precision
        (``benchmarks/plain.py``): no DDP, checkpoints or logging. Its bar is like for like.
      Either shares the data, the batch and the thread count with (b).
  (b) gan_dist on one process: dist.setup, then ``gan_dist.training.trainer.build`` (config -> env -> data -> engine),
      the trainer's own wiring (``--compare data.resident=off`` times streamed batches beside resident ones).
  (c) gan_dist on --nproc ranks under torchrun, the same batch per rank (skipped when --nproc is 1).
Every process runs one step under a FLOP counter, drops --warmup steps, then times --steps. A step is
split into data, forward/backward (the rest), optimizer (hooks on Adam.step) and communication (a DDP
comm hook timing each bucket's all-reduce, plus the loop's per-step stop-flag agreement; gloo only).
On CUDA the split comes from a second, synchronised pass and images/s from a pass without syncs.
Each process also times a large matmul right before its timed steps, with its own threads and beside
its peer ranks: that ceiling shares the case's layout and the machine's load of the moment.
Ratios are taken per round, between cases run side by side, and their median is reported, so a noisy
machine moves both sides of a ratio together.
Exit status: 0 done (targets are reported, not enforced); 1 a case failed; 2 bad arguments, config or data.
"""

import sys
from pathlib import Path

# Run by path (python benchmarks/bench.py), Python puts benchmarks/ on sys.path, not the repository root:
# putting the root first makes ``benchmarks.bench_worker`` and its siblings (and this checkout's gan_dist)
# import either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from benchmarks.bench_report import Case, check_targets, compare_tag, model_flops, render, summarise, twin_ratios
from benchmarks.bench_worker import ALONE_ON_CPU, MATMUL_SIZE, run_worker, worker_config
from benchmarks.plain import plain_misfit
from benchmarks.tutorial import tutorial_misfit
from gan_dist import cli
from gan_dist.amp import native_bf16
from gan_dist.config import Config, DatasetInfo
from gan_dist.data.cache import load_split
from gan_dist.dist import usable_cores

REPO = Path(__file__).resolve().parents[1]
PROG = "python benchmarks/bench.py"
SCRIPT = Path(__file__).resolve()
"""What the workers run: this file by path, whichever way the parent was started and from any folder."""
DEFAULT_CONFIG = REPO / "configs" / "mnist_cgan.yaml"
EXIT_FAILED = 1


def reference_of(args: argparse.Namespace, cfg: Config, info: DatasetInfo) -> str:
    """``--reference``, with auto resolved: the tutorial's loop for its own MLP on data it takes, else plain."""
    if args.reference != "auto":
        return args.reference
    return "tutorial" if cfg.model.arch == "mlp" and not tutorial_misfit(info) else "plain"


def reference_misfit(reference: str, cfg: Config, info: DatasetInfo) -> str | None:
    """Why the reference (a) cannot run on this config and data, or None."""
    return plain_misfit(cfg) if reference == "plain" else tutorial_misfit(info)


def plan(args: argparse.Namespace, cfg: Config, info: DatasetInfo) -> list[Case]:
    """(a) when the reference can run, (b), (c) with --nproc > 1, then the twins."""
    reference = reference_of(args, cfg, info)
    kind, label = ("plain", "plain PyTorch loop") if reference == "plain" else ("ref", "tutorial loop")
    cases = [] if reference_misfit(reference, cfg, info) else [Case("a", f"(a) reference: {label}", kind, 1)]
    cases.append(Case("b", "(b) gan_dist, 1 process", "gan", 1))
    if args.nproc > 1:
        cases.append(Case("c", f"(c) gan_dist, {args.nproc} ranks", "gan", args.nproc))
    if args.compare or args.compare_env:
        tag = compare_tag(args.compare_env, args.compare)
        cases += [Case(f"{c.key}'", f"{c.label} [{tag}]", "gan", c.nproc, tuple(args.compare),
                       tuple(args.compare_env)) for c in cases if c.kind == "gan"]
    return cases


class CaseFailed(RuntimeError):
    """A worker exited non-zero or wrote no result."""


def worker_argv(args: argparse.Namespace, case: Case, out: Path) -> list[str]:
    shared = ["--config", str(args.config), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--device", args.device]
    worker = [str(SCRIPT), "--worker", case.kind, "--out", str(out), *shared, *args.overrides, *case.overrides]
    if case.nproc == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
            *worker]


def launch(args: argparse.Namespace, case: Case) -> list[dict[str, Any]]:
    """Run one case in fresh process(es); returns the per-rank results, in rank order."""
    with tempfile.TemporaryDirectory(prefix="gan_dist_bench_") as out:
        env = os.environ | dict(item.split("=", 1) for item in case.env)
        proc = subprocess.run(worker_argv(args, case, Path(out)), capture_output=True, text=True, env=env)
        files = sorted(Path(out).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        if proc.returncode != 0 or len(files) != case.nproc:
            tail = (proc.stdout + proc.stderr)[-4000:]
            got = f"exit {proc.returncode}, {len(files)}/{case.nproc} results"
            raise CaseFailed(f"{case.label}: {got}\n{tail}")
        return [json.loads(f.read_text()) for f in files]

def _thread_env() -> list[str]:
    """The OpenMP/MKL variables this run was given: they change CPU results, so the command shows them."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "KMP_", "MKL_"))]


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _capability(device: str) -> str:
    """What decides the CPU results: the vector ISA torch dispatches to, and whether bf16 is native."""
    if device == "cuda":
        return f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
    return f"{torch.backends.cpu.get_cpu_capability()}; {native_bf16(torch.device('cpu'))[1]}"


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """``n`` processes that spin on a core each for the duration: other jobs sharing the node."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_parent(args: argparse.Namespace) -> int:
    cfg = worker_config(args)
    info = load_split(cfg.data, ALONE_ON_CPU).info  # fail fast here, and download and convert only once
    reference = reference_of(args, cfg, info)
    cases = plan(args, cfg, info)
    misfit = reference_misfit(reference, cfg, info)
    if misfit:
        print(f"(a) skipped: {misfit}", file=sys.stderr)
    load_before = os.getloadavg()
    results: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    with busy_processes(args.load):
        for round_no in range(args.rounds):
            for case in cases:
                print(f"round {round_no + 1}/{args.rounds}: {case.label}", file=sys.stderr, flush=True)
                results[case.key].append(launch(args, case))
    report = {
        "command": shlex.join([*_thread_env(), *shlex.split(PROG), *sys.argv[1:]]),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device_name": _device_name(args.device), "capability": _capability(args.device),
                    "cores": usable_cores(),
                    "torch": torch.__version__, "load_before": [round(x, 1) for x in load_before],
                    "load_after": [round(x, 1) for x in os.getloadavg()]},
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch": args.batch,
                     "nproc": args.nproc, "device": args.device, "config": str(args.config),
                     "reference": reference,
                     "matmul_size": MATMUL_SIZE[args.device],
                     "overrides": args.overrides, "compare": args.compare, "compare_env": args.compare_env,
                     "background_load": args.load,
                     "data": f"{cfg.data.name} {cfg.data.split} ({cfg.data.root})"},
        "model_flops_per_image": model_flops(cfg, info),
        "cases": [{"key": c.key, "label": c.label, "overrides": list(c.overrides),
                   "summary": summarise(c, results[c.key], results.get("a")), "rounds": results[c.key]}
                  for c in cases],
        "targets": check_targets(reference, args.device, results),
        "twins": twin_ratios(cases, results),
    }
    table = render(report)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report | {"table": table}, indent=1) + "\n")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config of (b) and (c)")
    parser.add_argument("--steps", type=cli.integer(1), default=150, help="timed steps per case and round")
    parser.add_argument("--warmup", type=cli.integer(0), default=20, help="steps dropped before timing")
    parser.add_argument("--rounds", type=cli.integer(1), default=3, help="A B C rounds")
    parser.add_argument("--batch", type=cli.integer(1), default=64, help="batch per rank (train.batch_size)")
    parser.add_argument("--nproc", type=cli.integer(1), default=None,
                        help="ranks of (c); default: GPUs, else cores")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compare", action="append", default=[], metavar="key=value",
                        help="also run (b) and (c) with this override (repeatable: one twin gets them all)")
    parser.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE",
                        help="the twin's processes also get this environment variable (repeatable)")
    parser.add_argument("--load", type=cli.integer(0), default=0, metavar="N",
                        help="run every case beside N busy-looping processes: a loaded machine")
    parser.add_argument("--json", default="runs/bench.json", help="report file ('' for none)")
    parser.add_argument("--reference", choices=("auto", "tutorial", "plain"), default="auto",
                        help="case (a): the tutorial's loop, or the config's networks in a plain PyTorch loop; "
                             "auto: the tutorial for its own MLP on data it takes, else plain")
    parser.add_argument("--worker", choices=("ref", "plain", "gan"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    for item in args.compare_env:
        if not item.partition("=")[0] or "=" not in item:
            parser.error(f"--compare-env {item!r}: expected NAME=VALUE")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else usable_cores()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        try:
            return run_worker(args) if args.worker else run_parent(args)
        except CaseFailed as e:
            print(cli.error_line(e), file=sys.stderr)
            return EXIT_FAILED

    return cli.run(body)  # a bad config or missing data: one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
