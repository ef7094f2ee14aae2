"""Stage ``evaluate_sample``: ``gan_dist.evaluate`` and ``gan_dist.sample`` on the resume stage's checkpoint."""

import json
import math

import numpy as np

from benchmarks.gpu_stages.mode import PY, Mode
from benchmarks.gpu_stages.report import Report, outcome, run_cmd
from benchmarks.gpu_stages.resume import final_checkpoint
from gan_dist.evaluation.evaluator import METRICS


def evaluate_cmd(mode: Mode) -> list[str]:
    """gan_dist.evaluate's CLI; the CPU mode's judge is a tiny recipe (the default one trains for minutes)."""
    return [PY, "-m", "gan_dist.evaluate"] if mode.cuda else [PY, "-m", "benchmarks.gpu_check", "tiny-evaluate"]


def evaluate_and_sample(mode: Mode, report: Report) -> None:
    """The last resumed recipe's checkpoint, scored on the device and sampled on the CPU. Checked: it exists;
    ``gan_dist.evaluate`` exits 0 with finite scores; ``gan_dist.sample --device cpu`` exits 0 with 100 uint8
    images and labels. Measured: the judge's accuracy."""
    checkpoint = final_checkpoint(mode, mode.work / f"{mode.sizes.resumed[-1]}_straight")
    if not report.check("checkpoint from the resume stage", checkpoint.exists(), str(checkpoint)):
        return
    scores = mode.work / "eval.json"
    proc = run_cmd([*evaluate_cmd(mode), "--checkpoint", checkpoint, "--n-per-class", mode.sizes.n_per_class,
                    "--out", scores, f"eval.judge_dir={mode.work / 'judges'}", f"dist.device={mode.device}",
                    "dist.force_ddp=false", "dist.backend=auto"])
    ok = proc.returncode == 0 and scores.exists()
    if report.check(f"evaluate on {mode.device}", ok, outcome(proc, ok, "")):
        record = json.loads(scores.read_text())
        sane = all(math.isfinite(record[k]) for k in METRICS) and 0 <= record["cond_acc"] <= 1
        report.check("evaluate: finite scores", sane, ", ".join(f"{k} {record[k]:.3f}" for k in METRICS))
        report.measure("judge accuracy", record["judge_accuracy"])
    grid, npz = mode.out / "samples_grid.png", mode.work / "samples.npz"
    proc = run_cmd([PY, "-m", "gan_dist.sample", "--checkpoint", checkpoint, "--grid", grid, "--npz", npz,
                    "--n-per-class", "10", "--device", "cpu"])
    if report.check(f"sample on the CPU from the {mode.device} checkpoint", proc.returncode == 0,
                    outcome(proc, proc.returncode == 0, "sampling")):
        with np.load(npz) as samples:
            shapes = (samples["images"].shape, samples["images"].dtype, samples["labels"].shape)
        report.check("sample: 100 uint8 images and labels", shapes == ((100, 28, 28), np.uint8, (100,)), str(shapes))
