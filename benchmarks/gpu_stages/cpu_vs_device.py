"""Stage ``cpu_vs_device``: one float32 step on the CPU and on the device, from the same state."""

from typing import Any

import torch

from benchmarks.gpu_stages.mode import RECIPES, Mode
from benchmarks.gpu_stages.report import Report, guarded
from benchmarks.gpu_stages.run import differences
from gan_dist.config import DatasetInfo
from gan_dist.dist import setup
from gan_dist.training.trainer import build

DROPOUT_OFF = {"mlp": ("model.mlp.d_dropout=0",), "dcgan": ()}  # the DCGAN's D has no dropout
CPU_VS_DEVICE = {"loss_rtol": 1e-5, "grad_rtol": 1e-4}  # the gradient one's is relative to the tensor's max


def fixed_inputs(n: int, z_dim: int, info: DatasetInfo) -> list[torch.Tensor]:
    """Real images and labels, D-step latents and labels, G-step latents and labels; the same on any device."""
    g = torch.Generator().manual_seed(1234)
    real = torch.rand(n, *info.shape, generator=g) * 2 - 1
    z_d, z_g = (torch.randn(n, z_dim, generator=g) for _ in range(2))
    labels, y_d, y_g = (torch.randint(0, max(info.num_classes, 1), (n,), generator=g) for _ in range(3))
    return [real, labels, z_d, y_d, z_g, y_g]


def fixed_step(mode: Mode, recipe: str, device: str) -> dict[str, Any]:
    """One D step and one G step in float32 on fixed inputs, dropout off; losses, gradients and weights."""
    cfg = mode.config(recipe, "amp.dtype=float32", *DROPOUT_OFF[RECIPES[recipe].arch], f"dist.device={device}")
    env = setup(cfg.dist)
    built = build(cfg, env)
    engine = built.engine
    if env.device.type == "cuda":  # after the engine, whatever it sets: this compares true float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    inputs = fixed_inputs(cfg.train.batch_size, cfg.model.z_dim, built.info)
    real, labels, z_d, y_d, z_g, y_g = (t.to(env.device) for t in inputs)
    metrics = engine.d_step(real, labels, z_d, y_d, 0)
    metrics |= engine.g_step(z_g, y_g, 0, (real, labels))  # D is frozen here: its .grad stays the D step's
    names = [n for n in engine.metric_names if n in metrics]
    named = [*(("G." + k, p) for k, p in engine.generator.named_parameters()),
             *(("D." + k, p) for k, p in engine.discriminator.named_parameters())]
    return {"names": names, "losses": torch.stack([metrics[n].float() for n in names]).cpu(), "lr": cfg.optim.d_lr,
            "grads": {k: p.grad.cpu() for k, p in named if p.grad is not None},
            "params": {k: p.detach().cpu() for k, p in named}}


def compare_step(mode: Mode, report: Report, recipe: str) -> None:
    """``fixed_step`` on the CPU (a) against the device (b), from the same seeded initial state."""
    a, b = fixed_step(mode, recipe, "cpu"), fixed_step(mode, recipe, mode.device)
    if not report.check(f"{recipe}: the same metrics reported", a["names"] == b["names"],
                        f"{', '.join(a['names'])} on cpu; {', '.join(b['names'])} on {mode.device}"):
        return
    errors = (a["losses"] - b["losses"]).abs() / a["losses"].abs().clamp_min(1)
    worst = int(errors.argmax())
    report.check(f"{recipe}: losses agree (rtol {CPU_VS_DEVICE['loss_rtol']:g})",
                 float(errors[worst]) <= CPU_VS_DEVICE["loss_rtol"],
                 f"largest relative difference {float(errors[worst]):.2e} in {a['names'][worst]}")
    if not report.check(f"{recipe}: the same gradients exist", a["grads"].keys() == b["grads"].keys(),
                        f"{len(a['grads'])} on cpu, {len(b['grads'])} on {mode.device}"):
        return
    grad_err = {k: float((a["grads"][k] - b["grads"][k]).abs().max() / a["grads"][k].abs().max().clamp_min(1e-30))
                for k in a["grads"]}
    worst = max(grad_err, key=grad_err.get)
    report.check(f"{recipe}: gradients agree ({CPU_VS_DEVICE['grad_rtol']:g} of each tensor's largest)",
                 grad_err[worst] <= CPU_VS_DEVICE["grad_rtol"], f"worst {worst}: {grad_err[worst]:.2e}")
    moved = max(differences(a["params"], b["params"]).values()) / a["lr"]
    report.measure(f"{recipe}: largest weight difference after the Adam steps, in units of lr", round(moved, 4))


def cpu_vs_device(mode: Mode, report: Report) -> None:
    """The same step on the CPU and on the device, fp32, TF32 off, for the MLP and the DCGAN. Checked: the same
    metrics, losses within 1e-5, the same gradients within 1e-4 of each tensor's largest.
    Adam's first update is about lr * sign(grad), so a weight whose gradient is at rounding level may
    move either way: the weights' largest difference is reported, in units of lr."""
    if not mode.cuda:
        report.note("CPU mode: both sides run on the CPU, which only keeps this stage's code alive")
    for recipe in ("mlp", "dcgan"):
        guarded(report, f"{recipe}: ran", compare_step, mode, report, recipe)
