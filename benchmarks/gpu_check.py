"""The GPU check's command line: the stages of ``benchmarks/gpu_check.sh`` in order (one module each under
``benchmarks/gpu_stages/``, one process per stage), one stage, and the summary.

    python -m benchmarks.gpu_check plan    --device cuda --work W --out O data.root=...   # "name timeout" lines
    python -m benchmarks.gpu_check NAME    --device cuda --work W --out O data.root=...   # run one stage
    python -m benchmarks.gpu_check summary --device cuda --work W --out O data.root=...

A stage records checks (pass or fail: they decide the exit status), measurements and speed targets
(reported, never folded into the exit status) in ``W/stages/NAME.json``, saved after every entry so a
stage stopped by its timeout still shows what it did. ``summary`` merges them into ``O/summary.json``.
``--device cpu`` is the CPU mode: the same code on tiny sizes, so CI keeps it from rotting.
"""

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_stages.cpu_vs_device import cpu_vs_device
from benchmarks.gpu_stages.ddp import ddp_gloo, ddp_worker
from benchmarks.gpu_stages.evaluate_sample import evaluate_and_sample
from benchmarks.gpu_stages.matrix import matrix
from benchmarks.gpu_stages.mode import SIZES, Mode
from benchmarks.gpu_stages.preflight import preflight
from benchmarks.gpu_stages.report import Report, guarded
from benchmarks.gpu_stages.resume import resume
from benchmarks.gpu_stages.spectral_norm import spectral_norm
from benchmarks.gpu_stages.throughput import batch_sweep, rgb_throughput, throughput
from gan_dist import evaluate


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Mode, Report], None]
    timeout_s: int
    speed: bool = False
    """A speed stage's timeout or skip is reported, not failed; its checks (did it run) still count."""


def bench_stage(compile_mode: str | None, timeout_s: int) -> Stage:
    return Stage(f"throughput_{compile_mode or 'eager'}", functools.partial(throughput, compile_mode=compile_mode),
                 timeout_s, speed=True)


def rgb_stage(arch: str, batch: int, timeout_s: int) -> Stage:
    return Stage(f"throughput_rgb32_{arch}_b{batch}", functools.partial(rgb_throughput, arch=arch), timeout_s,
                 speed=True)


def plan(device: str) -> list[Stage]:
    """The stages in order of importance: when the time budget runs out, the last ones are skipped."""
    cuda = device == "cuda"
    checks = [
        Stage("preflight", preflight, 45 if cuda else 90),
        Stage("matrix", matrix, 75 if cuda else 150),
        Stage("spectral_norm", spectral_norm, 30 if cuda else 90),
        Stage("cpu_vs_device", cpu_vs_device, 30 if cuda else 90),
        Stage("resume", resume, 100 if cuda else 180),
        Stage("evaluate_sample", evaluate_and_sample, 45 if cuda else 150),
        Stage("ddp_gloo", ddp_gloo, 75 if cuda else 150),
    ]
    sweep = Stage("batch_sweep", batch_sweep, 40 if cuda else 90, speed=True)
    rgb = [rgb_stage(arch, SIZES[device].rgb_batch, 75 if cuda else 150) for arch in ("dcgan", "resnet")]
    if not cuda:  # compiling on a small CPU takes minutes; the eager bench keeps the stage's code alive
        return [*checks, sweep, bench_stage(None, 150), *rgb]
    return [*checks, sweep, *rgb, bench_stage("reduce-overhead", 90), bench_stage("default", 75),
            bench_stage("max-autotune", 120)]


def stage_status(entry: dict[str, Any] | None, rc: str | None) -> str:
    """passed | failed | crashed | timed out | skipped (out of time) | not run."""
    if rc is None:
        return "not run"
    if rc == "skipped":
        return "skipped (out of time)"
    if rc in ("124", "137"):
        return "timed out"
    if entry is not None and not all(c["ok"] for c in entry["checks"]):
        return "failed"
    return "passed" if rc == "0" and entry is not None else "crashed"


def fails_exit(stage: Stage, status: str) -> bool:
    return status != "passed" and (not stage.speed or status in ("failed", "crashed"))


def read_stage(mode: Mode, name: str) -> tuple[dict[str, Any] | None, str | None, float]:
    """A stage's report, its exit status and seconds as the shell recorded them ("skipped" when not started)."""
    path, rc_path = mode.work / "stages" / f"{name}.json", mode.work / "stages" / f"{name}.rc"
    entry = json.loads(path.read_text()) if path.exists() else None
    if not rc_path.exists():
        return entry, None, 0.0
    rc, seconds = rc_path.read_text().split()
    return entry, rc, float(seconds)


def summary(mode: Mode) -> int:
    """Merge the stages into ``summary.json`` and ``bench.json`` under OUT; exit 1 if a check failed."""
    rows, failed, targets, ok = [], [], [], True
    for stage in plan(mode.device):
        entry, rc, seconds = read_stage(mode, stage.name)
        status = stage_status(entry, rc)
        ok &= not fails_exit(stage, status)
        checks = (entry or {}).get("checks", [])
        rows.append((entry or {}) | {"stage": stage.name, "kind": "speed" if stage.speed else "check",
                                     "status": status, "seconds": seconds, "timeout_s": stage.timeout_s})
        failed += [f"  {stage.name}: {c['name']}: {c['detail']}" for c in checks if not c["ok"]]
        targets += [t | {"stage": stage.name} for t in (entry or {}).get("targets", [])]
        print(f"{stage.name:<28} {status:<22} {sum(c['ok'] for c in checks):>3}/{len(checks):<3} checks "
              f"{seconds:>5.0f} s")
    if failed:
        print("\n".join(["", "failed checks:", *failed]))
    if targets:
        print("\n".join(["", "speed targets (reported, not part of the exit status):",
                         *(f"  {t['stage']}: {t['name']} = {t['value']:.2f} (bar >= {t['bar']}): "
                           f"{'met' if t['met'] else 'NOT met'}" for t in targets)]))
    (mode.out / "summary.json").write_text(json.dumps({"device": mode.device, "all_checks_passed": ok,
                                                       "stages": rows, "targets": targets}, indent=1) + "\n")
    benches = {p.stem: json.loads(p.read_text()) for p in sorted(mode.work.glob("bench_*.json"))}
    if benches:
        (mode.out / "bench.json").write_text(json.dumps(benches, indent=1) + "\n")
    print(f"\n{'every correctness check passed' if ok else 'SOME CHECKS FAILED'}; results in {mode.out}")
    return 0 if ok else 1


def run_stage(mode: Mode, name: str) -> int:
    """One stage in this process; an exception is a failed check, with its traceback in the log."""
    stage = next(s for s in plan(mode.device) if s.name == name)
    report = Report(name, mode.work / "stages" / f"{name}.json")
    guarded(report, "stage ran to the end", stage.run, mode, report)
    return 0 if report.passed else 1


def parse_args(argv: Sequence[str] | None) -> tuple[str, Mode]:
    stages = sorted({s.name for device in SIZES for s in plan(device)})
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "summary", "ddp-worker", *stages), help="or a stage to run")
    parser.add_argument("--device", choices=tuple(SIZES), default="cuda")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder of the stages")
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    parser.add_argument("data", nargs="*", metavar="key=value", help="data.* overrides")
    args = parser.parse_intermixed_args(argv)
    return args.command, Mode(args.device, args.work, args.out, tuple(args.data))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tiny-evaluate"]:  # gan_dist.evaluate's CLI with the CPU mode's judge recipe
        return evaluate.main(argv[1:], SIZES["cpu"].judge)
    command, mode = parse_args(argv)
    if command == "plan":
        print("\n".join(f"{s.name} {s.timeout_s}" for s in plan(mode.device)))
        return 0
    if command == "summary":
        return summary(mode)
    return ddp_worker(mode) if command == "ddp-worker" else run_stage(mode, command)


if __name__ == "__main__":
    sys.exit(main())
