"""Stage ``fp16_r1``: the R1 penalty under float16 and its loss scaler, in a run of the trainer."""

from benchmarks.gpu_stages.cli_run import check_ran, short_run
from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report
from gan_dist.amp import SKIPPED

R1_EVERY_STEP = ("amp.dtype=float16", "loss.r1.gamma=1", "loss.r1.every=1")


def fp16_r1(mode: Mode, report: Report) -> None:
    """``python -m gan_dist.train`` on the DCGAN recipe with ``amp.dtype=float16 loss.r1.gamma=1
    loss.r1.every=1``, NCCL and DDP at world size 1, for a few log windows. Checked: it exits 0 (before a fix in
    gan_dist it always exited 3, "diverged") and every logged loss and penalty is finite. Measured: the steps
    float16's loss scaler skipped (``amp_skipped`` in metrics.jsonl) per log window, also from a run that failed.
    CUDA only."""
    if not mode.cuda:
        return report.skip("float16 autocast and its loss scaler are CUDA only")
    proc, records = short_run(mode, "dcgan", mode.work / "fp16_r1", 6 * mode.sizes.log_every, *R1_EVERY_STEP)
    check_ran(report, "dcgan, float16, R1 every step", proc, records)
    if not records:
        return
    skipped = [r.get(SKIPPED) for r in records]
    report.measure(f"{SKIPPED} per window of {mode.sizes.log_every} steps", skipped)
    report.measure(f"{SKIPPED}, total over {records[-1]['step']} steps", sum(s or 0 for s in skipped))
