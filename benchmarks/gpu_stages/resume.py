"""Stage ``resume``: the trainer's entry points, and a run stopped by SIGTERM and resumed against one that
was not."""

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_stages.cli_run import TRAIN, logged, train_args
from benchmarks.gpu_stages.mode import PY, REPO, Mode
from benchmarks.gpu_stages.report import Report, guarded, line_with, outcome, run_cmd, tail, torchrun
from benchmarks.gpu_stages.run import differences


def final_checkpoint(mode: Mode, run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{mode.sizes.run_steps}.pt"


def logged_step(run_dir: Path) -> int:
    """The highest step in ``run_dir/metrics.jsonl`` so far."""
    return max([0, *(r["step"] for r in logged(run_dir))])


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by dotted path."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    return {k: v for key, sub in items for k, v in flat_tensors(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def signalled_run(cmd: list[str], run_dir: Path, after: int) -> tuple[int, str, bool]:
    """Run ``cmd``, SIGTERM it once it logged step ``after``; (exit status, output, whether it was signalled)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and logged_step(run_dir) < after:
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
    proc = run_cmd([*torchrun(1), *TRAIN, *train_args(mode, recipe, straight)])
    ok = proc.returncode == 0 and final_checkpoint(mode, straight).exists()
    if not report.check(f"{recipe}: torchrun world 1, {mode.backend} group and DDP (dist.force_ddp)", ok,
                        outcome(proc, ok, "done:")):
        return
    rc, out, signalled = signalled_run([PY, *TRAIN, *train_args(mode, recipe, broken)], broken,
                                       mode.sizes.signal_after)
    evidence = line_with(out, "stopped by signal") if rc == 75 else f"signalled {signalled}, exit {rc}: {tail(out)}"
    if not report.check(f"{recipe}: SIGTERM -> exit 75 with a checkpoint",
                        signalled and rc == 75 and "stopped by signal" in out, evidence):
        return
    proc = run_cmd([PY, *TRAIN, *train_args(mode, recipe, broken)])
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
    """Per recipe of the mode's ``resumed`` (the MLP on CUDA). Checked: ``gan_dist.train`` under torchrun at
    world size 1 with the process group and DDP ends with its checkpoint; SIGTERM gives exit 75 with a
    checkpoint; plain ``python -m`` resumes it to the end; the MLP's resumed run equals the uninterrupted one
    bitwise. Measured: another recipe's largest difference (GPU kernels may differ)."""
    for recipe in mode.sizes.resumed:
        guarded(report, f"{recipe}: ran", resume_case, mode, report, recipe)
