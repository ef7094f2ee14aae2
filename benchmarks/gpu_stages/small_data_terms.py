"""Stage ``small_data_terms``: the small-data terms together (ADA, LeCam, bCR) on the device."""

from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report
from benchmarks.gpu_stages.run import Run, last_values
from gan_dist.dist import setup

TERMS = ("augment.kind=ada", "augment.ada_p=0.3", "loss.lecam.weight=0.1", "loss.bcr.weight=10")
REPORTED = ("lecam_penalty", "bcr_penalty", "augment_p", "ada_rt")  # the metrics the terms add


def small_data_terms(mode: Mode, report: Report) -> None:
    """The DCGAN recipe (projection D under spectral norm, hinge, EMA) on the stage's data with ADA from p 0.3,
    LeCam 0.1 and bCR 10, trained as the trainer steps it. Checked: each term reports its metric, and the
    losses, penalties and all weights are finite after the steps. Measured on CUDA: images/s of the timed
    steps. Runs in the CPU mode too, on tiny sizes."""
    cfg = mode.config("dcgan", *TERMS)
    run = Run(cfg, setup(cfg.dist))
    run.train(mode.sizes.warmup)
    metrics, seconds = run.timed(mode.sizes.steps)
    values = run.read(metrics)
    missing = [name for name in REPORTED if name not in values]
    report.check("every term reports its metric", not missing, f"missing {', '.join(missing)}" if missing else
                 ", ".join(REPORTED))
    report.check(f"{run.step} steps: losses and weights finite", run.finite(values), last_values(values))
    if mode.cuda:
        images = mode.sizes.steps * cfg.train.n_critic * cfg.train.batch_size
        report.measure(f"images/s at batch {cfg.train.batch_size}", round(images / seconds))
