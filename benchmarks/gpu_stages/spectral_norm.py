"""Stage ``spectral_norm``: the power iteration's estimate of D's largest singular values after training."""

import torch

from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report
from benchmarks.gpu_stages.run import Run
from gan_dist.dist import setup

SN_TOLERANCE = 0.05  # relative error of the power-iteration estimate after the stage's steps


def spectral_norm(mode: Mode, report: Report) -> None:
    """The DCGAN recipe trained a few steps. Checked: in each spectrally normalised layer of D, torch's
    power-iteration estimate of the largest singular value within 5% of the exact one."""
    cfg = mode.config("dcgan")
    run = Run(cfg, setup(cfg.dist))
    run.train(mode.sizes.warmup + mode.sizes.steps)
    d = run.engine.discriminator.eval()  # eval: reading the weight runs no further power iteration
    with torch.no_grad():
        for name, module in d.named_modules():
            if not hasattr(module, "parametrizations"):
                continue
            parametrization = module.parametrizations.weight
            original = parametrization.original
            estimate = original.norm() / module.weight.norm()  # the weight used is original / estimate
            exact = torch.linalg.matrix_norm(original.movedim(parametrization[0].dim, 0).flatten(1).float(), 2)
            error = float(estimate / exact - 1)
            report.check(f"D.{name}: sigma estimate within {SN_TOLERANCE:.0%}", abs(error) <= SN_TOLERANCE,
                         f"estimate {estimate:.4f}, exact {exact:.4f}, relative error {error:+.2e}")
