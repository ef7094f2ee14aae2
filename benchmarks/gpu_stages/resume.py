"""Stage ``resume``: the trainer's entry points, and a run stopped by SIGTERM and resumed against one that
was not."""

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_stages.mode import PY, REPO, Mode
from benchmarks.gpu_stages.report import Report, guarded, line_with, outcome, run_cmd, tail, torchrun
from benchmarks.gpu_stages.run import differences


def train_args(mode: Mode, recipe: str, run_dir: Path) -> list[str]:
    """gan_dist.train's arguments for a short run with the process group and DDP at world size 1."""
    sizes = mode.sizes
    return [*mode.config_args(recipe), *mode.overrides(recipe), f"run_dir={run_dir}",
            f"train.max_steps={sizes.run_steps}", "checkpoint.every_steps=0", f"log.every_steps={sizes.log_every}",
            "log.wandb.mode=disabled", "log.progress=false", "dist.force_ddp=true", f"dist.backend={mode.backend}"]


def final_checkpoint(mode: Mode, run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{mode.sizes.run_steps}.pt"


def logged_step(metrics: Path) -> int:
    """The highest step in ``metrics.jsonl`` so far (a line being written is skipped)."""
    steps = [0]
    with contextlib.suppress(FileNotFoundError):
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                steps.append(json.loads(line)["step"])
    return max(steps)


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by dotted path."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {k: v for key, sub in items for k, v in flat_tensors(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def signalled_run(cmd: list[str], metrics: Path, after: int) -> tuple[int, str, bool]:
    """Run ``cmd``, SIGTERM it once it logged step ``after``; (exit status, output, whether it was signalled)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and logged_step(metrics) < after:
            time.sleep(0.01)
        signalled = proc.poll() is None
        if signalled:
            proc.send_signal(signal.SIGTERM)
        proc.wait()
        log.seek(0)
        return proc.returncode, log.read(), signalled


def resume_case(mode: Mode, report: Report, recipe: str) -> None:
    """Uninterrupted under torchrun, against SIGTERM -> 75 -> resume with plain ``python -m``."""
    straight, broken = mode.work / f"{recipe}_straight", mode.work / f"{recipe}_resumed"
    for run_dir in (straight, broken):
        shutil.rmtree(run_dir, ignore_errors=True)
    train = ["-m", "gan_dist.train"]
    proc = run_cmd([*torchrun(1), *train, *train_args(mode, recipe, straight)])
    ok = proc.returncode == 0 and final_checkpoint(mode, straight).exists()
    if not report.check(f"{recipe}: torchrun world 1, {mode.backend} group and DDP (dist.force_ddp)", ok,
                        outcome(proc, ok, "done:")):
        return
    rc, out, signalled = signalled_run([PY, *train, *train_args(mode, recipe, broken)], broken / "metrics.jsonl",
                                       mode.sizes.signal_after)
    evidence = line_with(out, "stopped by signal") if rc == 75 else f"signalled {signalled}, exit {rc}: {tail(out)}"
    if not report.check(f"{recipe}: SIGTERM -> exit 75 with a checkpoint",
                        signalled and rc == 75 and "stopped by signal" in out, evidence):
        return
    proc = run_cmd([PY, *train, *train_args(mode, recipe, broken)])
    ok = proc.returncode == 0 and "resuming from" in proc.stdout
    if not report.check(f"{recipe}: resumed to the end", ok, outcome(proc, ok, "resuming from")):
        return
    diffs = differences(*(flat_tensors(torch.load(final_checkpoint(mode, d), weights_only=True)["engine"], "engine")
                          for d in (straight, broken)))  # format 3: every tensor of a run is its engine's
    unequal = sorted(k for k, v in diffs.items() if v != 0.0)
    worst = max(diffs, key=diffs.get)
    summary = (f"{len(unequal)} of {len(diffs)} tensors differ; largest {diffs[worst]:.3g} in {worst}" if unequal
               else f"all {len(diffs)} tensors equal")
    if recipe == "mlp":
        report.check("mlp: resumed run bitwise equal (torch.equal) to the uninterrupted one", not unequal, summary)
    else:
        report.measure(f"{recipe}: resumed vs uninterrupted", summary)


def resume(mode: Mode, report: Report) -> None:
    """The MLP bitwise; the recommended DCGAN's largest difference is reported (GPU kernels may differ)."""
    for recipe in mode.sizes.resumed:
        guarded(report, f"{recipe}: ran", resume_case, mode, report, recipe)
