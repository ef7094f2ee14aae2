"""``gan_dist.train`` run from a stage as a user runs it: the arguments of a short run, the run, what it logged,
and the checks every such run shares (it ended, its losses are finite)."""

import contextlib
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.gpu_stages.mode import PY, Mode
from benchmarks.gpu_stages.report import Report, outcome, run_cmd

TRAIN = ("-m", "gan_dist.train")


def train_args(mode: Mode, recipe: str, run_dir: Path, *extra: str, steps: int | None = None) -> list[str]:
    """gan_dist.train's arguments for a short run (``steps``, default the mode's ``run_steps``) with the process
    group and DDP at world size 1, then ``extra``."""
    sizes = mode.sizes
    return [*mode.config_args(recipe), *mode.overrides(recipe), f"run_dir={run_dir}",
            f"train.max_steps={steps or sizes.run_steps}", "checkpoint.every_steps=0",
            f"log.every_steps={sizes.log_every}", "log.wandb.mode=disabled", "log.progress=false",
            "dist.force_ddp=true", f"dist.backend={mode.backend}", *extra]


def logged(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` so far (a line being written is skipped)."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def short_run(mode: Mode, recipe: str, run_dir: Path, steps: int, *extra: str, env: dict[str, str] | None = None,
              timeout_s: float | None = None) -> tuple[subprocess.CompletedProcess, list[dict[str, Any]]]:
    """``python -m gan_dist.train`` for ``steps`` steps in a fresh ``run_dir`` (``env`` and ``timeout_s`` as
    ``run_cmd`` takes them); the process and what it logged."""
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = run_cmd([PY, *TRAIN, *train_args(mode, recipe, run_dir, *extra, steps=steps)], env=env,
                   timeout_s=timeout_s)
    return proc, logged(run_dir)


def losses(record: dict[str, Any]) -> dict[str, float]:
    """The losses and penalties of one ``metrics.jsonl`` record."""
    return {k: v for k, v in record.items() if k.endswith(("_loss", "_penalty")) and isinstance(v, float | int)}


def check_ran(report: Report, label: str, proc: subprocess.CompletedProcess, records: list[dict[str, Any]]) -> bool:
    """Checked: the run exited 0 having logged, and every logged loss and penalty is finite."""
    ok = proc.returncode == 0 and bool(records)
    if not report.check(f"{label}: exit 0", ok, outcome(proc, ok, "done:")):
        return False
    bad = [f"step {r['step']} {k} {v}" for r in records for k, v in losses(r).items() if not math.isfinite(v)]
    return report.check(f"{label}: losses finite in metrics.jsonl", not bad, "; ".join(bad[:5]) or "last " + ", ".join(
        f"{k} {v:.4f}" for k, v in losses(records[-1]).items()))
