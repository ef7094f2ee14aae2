"""The speed stages: ``benchmarks/bench.py`` on the device (the MLP recipe, eager and compiled, and the RGB
recipes against the plain loop), and a sweep of (b)'s batch against the matmul ceiling."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_report import fmt
from benchmarks.bench_worker import EngineWorkload, measure
from benchmarks.gpu_stages.mode import PY, REPO, Mode
from benchmarks.gpu_stages.report import Report, outcome, run_cmd
from gan_dist.configio import load_config
from gan_dist.data.sources import IdxSource
from tools.colour_fashion import write_split

SPEED_BARS = {"x_ref": 30.0, "pct_of_ceiling": 40.0}


def case_line(summary: dict[str, Any]) -> str:
    return (f"{summary['images_per_s']:.0f} img/s, x(a) {fmt(summary['x_ref'], '.2f')}, "
            f"{summary['step_ms']:.3f} ms/step, {summary['gflop_per_s'] / 1e3:.3g} TFLOP/s ({summary['precision']}), "
            f"first step {summary['first_step_s']:.1f} s")


def run_bench(mode: Mode, report: Report, tag: str, *args: str | Path | int) -> list[dict[str, Any]]:
    """benchmarks/bench.py on one process with the mode's step counts; its cases, each also measured."""
    path = mode.work / f"bench_{tag}.json"
    proc = run_cmd([PY, REPO / "benchmarks" / "bench.py", "--device", mode.device, "--nproc", "1",
                    *mode.sizes.bench, "--rounds", "1", "--json", path, *args])
    ok = proc.returncode == 0 and path.exists()
    if not report.check("bench ran", ok, outcome(proc, ok, "target")):
        return []
    found = json.loads(path.read_text())
    print(found["table"], flush=True)
    for case in found["cases"]:
        report.measure(case["label"], case_line(case["summary"]))
    return found["cases"]


def throughput(mode: Mode, report: Report, compile_mode: str | None = None) -> None:
    """``benchmarks/bench.py`` on the MLP recipe at the tutorial's batch: (a) the tutorial's loop against (b),
    eager, and (b)'s twin with ``train.compile`` (its FLOPs counted on an eager step). Checked: the bench ran.
    Measured: each case's img/s, x(a), ms/step, TFLOP/s and first step. Target (CUDA): gan_dist's x(a)."""
    compare = ["--compare", f"train.compile={compile_mode}"] if compile_mode else []
    cases = run_bench(mode, report, compile_mode or "eager", "--batch", mode.sizes.batch, *compare, *mode.data,
                      *mode.model("mlp"))  # the bench's default config: the MLP recipe
    for case in cases:
        if mode.cuda and case["key"] != "a":
            report.target(f"{case['label']}: x(a)", case["summary"]["x_ref"], SPEED_BARS["x_ref"])


def rgb_throughput(mode: Mode, report: Report, arch: str) -> None:
    """The 32x32 RGB recipe of ``arch`` (configs/cifar10_<arch>.yaml: projection D under spectral norm, hinge,
    EMA) at ``rgb_batch``, on an image folder the stage colours from the mode's data, against the same
    networks in the bench's plain PyTorch loop. Checked: the bench ran. Measured: img/s, x(a), ms/step, FLOP/s."""
    data = load_config(None, list(mode.data)).data
    folder = mode.work / f"rgb_{arch}"
    n = write_split(IdxSource(data), data.split, 8 * mode.sizes.rgb_batch, np.random.default_rng(0), folder)
    report.note(f"{n} images of {data.name} {data.split}, padded to 32x32 and coloured, in {folder}")
    run_bench(mode, report, f"rgb32_{arch}", "--config", REPO / "configs" / f"cifar10_{arch}.yaml", "--batch",
              mode.sizes.rgb_batch, "--reference", "plain", "data.name=folder", f"data.root={folder}",
              "data.split=train", "data.download=false", *mode.model(arch))



def batch_sweep(mode: Mode, report: Report) -> None:
    """(b) at the mode's ``sweep`` batches, in this process. Measured: img/s and TFLOP/s against the matmul
    ceiling the same process times in the same dtype. Target (CUDA): the best % of that ceiling."""
    rows, best = [], 0.0
    for batch in mode.sizes.sweep:
        work = EngineWorkload(mode.config("mlp", f"train.batch_size={batch}"))
        try:
            r = measure(work, steps=max(2, mode.sizes.steps), warmup=mode.sizes.warmup)
        except torch.cuda.OutOfMemoryError:
            report.note(f"batch {batch}: out of GPU memory; the sweep stops here")
            break
        finally:
            work.close()
        flops, ceiling = r["flops_per_image"] * r["images_per_s"], r["matmul_ceiling_flop_per_s"][r["precision"]]
        rows.append({"batch": batch, "images_per_s": r["images_per_s"], "tflop_per_s": flops / 1e12,
                     "ceiling_tflop_per_s": ceiling / 1e12, "pct_of_ceiling": 100 * flops / ceiling,
                     "precision": r["precision"], "step_ms": r["step_ms"]})
        best = max(best, rows[-1]["pct_of_ceiling"])
        report.measure(f"batch {batch}", f"{r['images_per_s']:.0f} img/s, {flops / 1e12:.3g} TFLOP/s = "
                                         f"{100 * flops / ceiling:.1f}% of {ceiling / 1e12:.3g} ({r['precision']})")
    (mode.work / "bench_sweep.json").write_text(json.dumps(rows, indent=1))
    if mode.cuda and rows:
        report.target("best % of the matmul ceiling", best, SPEED_BARS["pct_of_ceiling"])
