"""The GPU check's command line: the stages of ``benchmarks/gpu_check.sh`` in order (one module each under
``benchmarks/gpu_stages/``, one process per stage), one stage, and the summary.

    python -m benchmarks.gpu_check plan    --device cuda --work W --out O data.root=...   # "name timeout kind"
    python -m benchmarks.gpu_check NAME    --device cuda --work W --out O data.root=...   # run one stage
    python -m benchmarks.gpu_check summary --device cuda --work W --out O data.root=...

A stage records checks (pass or fail: they decide the exit status), measurements and speed targets
(reported, never folded into the exit status) in ``W/stages/NAME.json``, saved after every entry so a
stage stopped by its timeout still shows what it did. ``summary`` merges them into ``O/summary.json``, from
whatever the stages recorded (gpu_check.sh runs it at the end, also when the budget ran out or the script got
SIGTERM or SIGINT). A stage that cannot run on this device records why and is reported skipped; one the budget
left no time for is reported skipped (out of time); neither fails the exit status. ``--device cpu`` is the CPU
mode: the same code on tiny sizes, so CI keeps it from rotting. A stage's module is imported only by the
process that runs it, so the plan and the summary never depend on one.
"""

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_stages.mode import SIZES, Mode
from benchmarks.gpu_stages.report import Report, guarded

RESERVE_S = 10
"""Seconds of the budget kept for the summary (gpu_check.sh's RESERVE)."""
CUDA_BUDGET_S = 360
"""gpu_check.sh's default budget on CUDA: the stages' reserved timeouts and RESERVE_S fit in it."""


@dataclass(frozen=True)
class Stage:
    """One stage: ``target`` is ``module:function`` in ``benchmarks/gpu_stages/``, imported only by the process
    that runs it (a module that fails to import costs its stage, never the plan or the summary)."""

    name: str
    target: str
    timeout_s: int
    speed: bool = False
    """A speed stage's timeout or skip is reported, not failed; its checks (did it run) still count."""
    spare: bool = False
    """Runs on the time the stages before it left unused: its timeout is a cap, not part of the reserved budget,
    and it is skipped (reported, never failed) when too little is left. Speed stages only, after all others."""
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, mode: Mode, report: Report) -> None:
        """Import the stage's module and run it (an import error is the stage's failure, as any other)."""
        module, function = self.target.split(":")
        getattr(importlib.import_module(f"benchmarks.gpu_stages.{module}"), function)(mode, report, **self.kwargs)


def bench_stage(compile_mode: str | None, timeout_s: int, spare: bool = False) -> Stage:
    return Stage(f"throughput_{compile_mode or 'eager'}", "throughput:throughput", timeout_s, speed=True,
                 spare=spare, kwargs={"compile_mode": compile_mode})


def rgb_stage(arch: str, batch: int, timeout_s: int, spare: bool = False) -> Stage:
    return Stage(f"throughput_rgb32_{arch}_b{batch}", "throughput:rgb_throughput", timeout_s, speed=True,
                 spare=spare, kwargs={"arch": arch})


def plan(device: str) -> list[Stage]:
    """The stages in order of value: first the checks that catch what a first run on a GPU breaks, then speed.
    On CUDA the reserved timeouts add up to at most ``CUDA_BUDGET_S - RESERVE_S``, so no check is ever cut
    short by the budget; the spare speed stages after them share what the others left unused."""
    cuda = device == "cuda"

    def check(name: str, cuda_s: int, cpu_s: int) -> Stage:
        return Stage(name, f"{name}:{name}", cuda_s if cuda else cpu_s)

    checks = [
        check("preflight", 25, 90),  # CUDA visible, versions, data present: nothing else runs without them
        check("matrix", 30, 150),  # every recipe in every dtype on the device, no host sync
        check("nccl_shared_gpu", 15, 60),  # two NCCL ranks on one GPU refused (CUDA only)
        check("cpu_vs_device", 15, 90),
        check("sync_batchnorm_resnet", 20, 60),  # CUDA only
        check("fp16_r1", 25, 60),  # CUDA only
        check("small_data_terms", 15, 90),
        check("spectral_norm", 15, 90),
        check("resume", 40, 180),
        Stage("evaluate_sample", "evaluate_sample:evaluate_and_sample", 25 if cuda else 150),
        Stage("ddp_gloo", "ddp:ddp_gloo", 25 if cuda else 150),
        check("compile_ddp", 75, 60),  # compiling is most of it (CUDA only)
    ]
    sweep = Stage("batch_sweep", "throughput:batch_sweep", 20 if cuda else 90, speed=True)
    rgb = SIZES[device].rgb_batch
    if not cuda:  # compiling on a small CPU takes minutes; the eager bench keeps the stage's code alive
        return [*checks, sweep, bench_stage(None, 150), rgb_stage("dcgan", rgb, 150), rgb_stage("resnet", rgb, 150)]
    # max-autotune is left out: its autotuning alone outlasts any budget that fits one call.
    return [*checks, sweep, bench_stage("reduce-overhead", 90, spare=True), rgb_stage("dcgan", rgb, 45, spare=True),
            rgb_stage("resnet", rgb, 50, spare=True), bench_stage("default", 75, spare=True)]


def kind(stage: Stage) -> str:
    """check | speed | spare (a speed stage on the time left unused)."""
    return "spare" if stage.spare else "speed" if stage.speed else "check"


def reserved_s(stages: Sequence[Stage]) -> int:
    """The seconds the stages reserve of the budget: every timeout but the spare stages'."""
    return sum(s.timeout_s for s in stages if not s.spare)


def stage_status(entry: dict[str, Any] | None, rc: str | None) -> str:
    """passed | failed | crashed | timed out | interrupted (the script got SIGTERM or SIGINT while it ran) |
    skipped (the stage cannot run here, its report says why) | skipped (out of time) | not run."""
    if rc is None:
        return "not run"
    if rc == "skipped":
        return "skipped (out of time)"
    if rc in ("124", "137"):
        return "timed out"
    if rc == "interrupted":
        return "interrupted"
    if entry is not None and not all(c["ok"] for c in entry["checks"]):
        return "failed"
    if rc == "0" and entry is not None:
        return "skipped" if entry.get("skipped") else "passed"
    return "crashed"


def fails_exit(stage: Stage, status: str) -> bool:
    """Whether ``status`` fails the exit status: any check stage that did not pass, unless skipped (out of time,
    or not runnable here); a speed stage only when it failed a check or crashed."""
    if status == "passed" or status.startswith("skipped"):
        return False
    return not stage.speed or status in ("failed", "crashed")


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
    rows, failed, skipped, targets, ok = [], [], [], [], True
    for stage in plan(mode.device):
        entry, rc, seconds = read_stage(mode, stage.name)
        status = stage_status(entry, rc)
        ok &= not fails_exit(stage, status)
        checks = (entry or {}).get("checks", [])
        rows.append((entry or {}) | {"stage": stage.name, "kind": kind(stage), "status": status, "seconds": seconds,
                                     "timeout_s": stage.timeout_s})
        failed += [f"  {stage.name}: {c['name']}: {c['detail']}" for c in checks if not c["ok"]]
        skipped += [f"  {stage.name}: {entry['skipped']}"] if status == "skipped" else []
        targets += [t | {"stage": stage.name} for t in (entry or {}).get("targets", [])]
        print(f"{stage.name:<28} {status:<22} {sum(c['ok'] for c in checks):>3}/{len(checks):<3} checks "
              f"{seconds:>5.0f} s")
    if failed:
        print("\n".join(["", "failed checks:", *failed]))
    if skipped:
        print("\n".join(["", "skipped here:", *skipped]))
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
        from gan_dist import evaluate

        return evaluate.main(argv[1:], SIZES["cpu"].judge)
    command, mode = parse_args(argv)
    if command == "plan":
        print("\n".join(f"{s.name} {s.timeout_s} {kind(s)}" for s in plan(mode.device)))
        return 0
    if command == "summary":
        return summary(mode)
    if command == "ddp-worker":
        from benchmarks.gpu_stages.ddp import ddp_worker

        return ddp_worker(mode)
    return run_stage(mode, command)


if __name__ == "__main__":
    sys.exit(main())
