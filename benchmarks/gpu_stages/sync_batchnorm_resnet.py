"""Stage ``sync_batchnorm_resnet``: the ResNet G's class-conditional BatchNorms as SyncBatchNorm, over NCCL."""

from torch import nn

from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report
from benchmarks.gpu_stages.run import Run, last_values
from gan_dist.dist import setup, teardown
from gan_dist.models.layers import ConditionalBatchNorm2d

SMALL = ("model.resnet.g_width=16", "model.resnet.d_width=16")


def sync_batchnorm_resnet(mode: Mode, report: Report) -> None:
    """``dist.sync_batchnorm=true dist.force_ddp=true`` on the ResNet recipe (projection D), small widths, one
    GPU in an NCCL group of one. Checked: every BatchNorm of G became a SyncBatchNorm and its class conditioning
    stayed (before a fix in gan_dist the conversion dropped it: TypeError at step 0); the steps' losses and
    all weights finite. CUDA only."""
    if not mode.cuda:
        return report.skip("SyncBatchNorm needs CUDA (gan_dist refuses dist.sync_batchnorm on the CPU)")
    cfg = mode.config("resnet", *SMALL, "dist.sync_batchnorm=true", "dist.force_ddp=true", "dist.backend=nccl")
    env = setup(cfg.dist)
    try:
        run = Run(cfg, env)
        g = run.engine.generator.modules()
        norms = [type(m).__name__ for m in g if isinstance(m, nn.modules.batchnorm._BatchNorm | ConditionalBatchNorm2d)]
        plain = [n for n in norms if n not in ("SyncBatchNorm", ConditionalBatchNorm2d.__name__)]
        report.check("G: every BatchNorm a SyncBatchNorm, the conditional ones kept",
                     "SyncBatchNorm" in norms and ConditionalBatchNorm2d.__name__ in norms and not plain,
                     f"{norms.count('SyncBatchNorm')} SyncBatchNorm, {norms.count(ConditionalBatchNorm2d.__name__)} "
                     f"conditional; not converted: {', '.join(plain) or 'none'}")
        values = run.read(run.train(mode.sizes.warmup + mode.sizes.steps))
        report.check(f"{run.step} steps: losses and weights finite", run.finite(values), last_values(values))
    finally:
        teardown(env)
