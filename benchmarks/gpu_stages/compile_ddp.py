"""Stage ``compile_ddp``: ``train.compile=reduce-overhead`` under DDP on a conv recipe, and what CUDA graphs skip."""

import re
from collections import Counter

from benchmarks.gpu_stages.cli_run import check_ran, short_run
from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report, line_with

SKIP = re.compile(r"skipping cudagraphs due to (.*?)\.?\s*(?:Found from.*)?$", re.MULTILINE)
INSTANCES = re.compile(r"\s*\(\d+ instances?\)")  # "mutated inputs (2 instances)": the reason, less the count
WARNING = "train.compile=reduce-overhead:"  # the trainer's own warning about what blocks the graphs
TRAIN_S = 60  # of the stage's 75 s: a run still compiling then is killed, and what it logged is still reported


def skip_reasons(output: str) -> Counter:
    """Each distinct reason of the "skipping cudagraphs" lines that ``TORCH_LOGS=cudagraphs`` prints, and how many
    lines gave it."""
    return Counter(INSTANCES.sub("", m.group(1)).strip()[:160] for m in SKIP.finditer(output))


def compile_ddp(mode: Mode, report: Report) -> None:
    """``python -m gan_dist.train`` on configs/mnist_dcgan.yaml (spectral norm in D, BatchNorm in G) with
    ``train.compile=reduce-overhead dist.force_ddp=true``, NCCL at world size 1, under ``TORCH_LOGS=cudagraphs``.
    Checked: it runs to the end (within 60 s) and its losses are finite. Measured: how many "skipping cudagraphs"
    lines it logged and their reasons (e.g. mutated inputs), also from a run killed at 60 s, the trainer's warning
    about them, and images/s of the last log window (after compiling). CUDA only."""
    if not mode.cuda:
        return report.skip("reduce-overhead's CUDA graphs need CUDA, and compiling on a small CPU takes minutes")
    proc, records = short_run(mode, "dcgan", mode.work / "compile_ddp", 4 * mode.sizes.log_every,
                              "train.compile=reduce-overhead", env={"TORCH_LOGS": "cudagraphs"}, timeout_s=TRAIN_S)
    reasons = skip_reasons(proc.stdout)
    report.measure('"skipping cudagraphs" lines', sum(reasons.values()))
    report.measure("their reasons (lines)", dict(reasons.most_common()))
    if WARNING in proc.stdout:
        report.measure("the trainer's warning", line_with(proc.stdout, WARNING).strip())
    if check_ran(report, "dcgan, reduce-overhead, DDP", proc, records):
        report.measure(f"images/s, steps {records[-2]['step'] if len(records) > 1 else 0}-{records[-1]['step']}",
                       round(records[-1]["images_per_s"]))
