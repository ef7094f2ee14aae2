"""R3GAN's parts on one process: the relativistic pairing loss, R2 beside R1, the normalisation-free residual
networks built from the data's description, the ramps over the images seen, and labels in the data's proportions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CPU
from shapes import DIGITS, RGB32, batch, info

from gan_dist.config import ConfigError
from gan_dist.configio import load_config
from gan_dist.models.base import Discriminator, build_generator
from gan_dist.models.r3gan import Block, Resample
from gan_dist.seeds import NoiseStream
from gan_dist.training.engine import GANEngine
from gan_dist.training.objectives import RpGAN
from gan_dist.training.ramps import Ramps, ema_decay, ema_half_life_kimg, run_steps

R3GAN = ["model.arch=r3gan", "model.r3gan.widths=[32,16]", "model.r3gan.group_size=8",
         "model.conditioning=projection"]


def engine(*overrides: str, described=DIGITS, **kwargs) -> GANEngine:
    return GANEngine(load_config(None, ["amp.enabled=false", *overrides]), CPU, described, **kwargs)


def test_rpgan_values_on_known_logits():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    d, metrics = RpGAN(None).d(real, fake)
    assert d.item() == pytest.approx(F.softplus(-(real - fake)).mean().item())
    assert metrics["margin"].item() == pytest.approx(-0.25)
    assert RpGAN(None).g(fake, real).item() == pytest.approx(F.softplus(real - fake).mean().item())


def test_rpgan_g_phase_scores_the_real_batch_and_moves_only_g():
    eng = engine(*R3GAN, "loss.kind=rpgan")
    real, labels = batch(6)
    d_before = [p.detach().clone() for p in eng.discriminator.parameters()]
    metrics = eng.g_step(*eng.noise.draw(0, 1, 6), 0, (real, labels))
    assert torch.isfinite(metrics["g_loss"])
    assert all(torch.equal(a, b) for a, b in zip(d_before, eng.discriminator.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs a real batch"):
        eng.g_step(*eng.noise.draw(0, 1, 6), 0)


def test_r1_and_r2_penalties_match_a_direct_computation():
    """γ/2·every·E‖∇ₓD(x)‖² on reals (R1) and on fakes (R2), each on its own lazy interval."""
    eng = engine(*R3GAN, "loss.kind=rpgan", "loss.r1.gamma=2", "loss.r1.every=2", "loss.r2.gamma=3",
                 "loss.r2.every=3")
    real, labels = batch(6)
    z, fake_labels = eng.noise.draw(0, 0, 6)
    with torch.no_grad():
        fake = eng.nets.G.no_grad(z, fake_labels)

    def direct(x: torch.Tensor, y: torch.Tensor) -> float:
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(eng.discriminator(x, y).sum(), x)
        return grad.square().flatten(1).sum(1).mean().item()

    phases = {step: eng.loss.d_phase(eng.nets, real, labels, z, fake_labels, step, torch.Generator())
              for step in (6, 4, 3, 1)}
    assert phases[6]["r1_penalty"].item() == pytest.approx(direct(real, labels), rel=1e-5)
    assert phases[6]["r2_penalty"].item() == pytest.approx(direct(fake, fake_labels), rel=1e-5)
    assert "r1_penalty" in phases[4] and "r2_penalty" not in phases[4]
    assert "r2_penalty" in phases[3] and "r1_penalty" not in phases[3]
    assert not {"r1_penalty", "r2_penalty"} & set(phases[1])
    assert eng.loss.summary == "rpgan + R1 γ=2 every 2 + R2 γ=3 every 3"


def test_the_penalty_gradient_scales_the_mean_so_float16_cannot_overflow():
    """The scaled sum of a batch's logits would give each logit a gradient of the whole scale (65,536), past
    float16's range after a few layers; the mean gives it scale / batch."""
    from gan_dist.amp import Amp
    from gan_dist.config import AmpConfig

    amp = Amp(AmpConfig(enabled=False), torch.device("cpu"))
    x = torch.randn(8, 3, requires_grad=True)
    grad = amp.input_grad((x * torch.tensor([1.0, 2.0, 3.0])).sum(1), x)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 2.0, 3.0]]).expand(8, 3))


@pytest.mark.parametrize("described", [info(1, 28, 10), RGB32, info(3, 64, 10), info(3, 128, 5), info(3, 32, 0)])
def test_r3gan_is_built_from_the_description(described):
    conditioning = "projection" if described.num_classes else "none"
    cfg = load_config(None, ["model.arch=r3gan", "model.r3gan.widths=[16,16,8]", "model.r3gan.group_size=8",
                             f"model.conditioning={conditioning}"]).model
    g, d = build_generator(cfg, described), Discriminator(cfg, described)
    images, labels = batch(3, described)
    with torch.no_grad():
        assert g(torch.randn(3, cfg.z_dim), labels).shape == images.shape
        assert d(images, labels).shape == (3,)
    assert not [m for m in (*g.modules(), *d.modules()) if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_a_fresh_block_is_the_identity_and_the_filters_keep_the_mean():
    cfg = load_config(None, R3GAN).model
    block = Block(16, cfg.options, depth=4)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)  # its last layer starts at zero
    flat = torch.ones(1, 4, 8, 8)
    torch.testing.assert_close(Resample(4, up=True)(flat)[..., 1:-1, 1:-1], torch.ones(1, 4, 14, 14))
    torch.testing.assert_close(Resample(4, up=False)(flat)[..., 1:, 1:], torch.ones(1, 4, 3, 3))


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.r3gan.widths=[20]", "model.r3gan.group_size=16"],
     r"model.r3gan.group_size: 16 does not divide a block's 20 × 2 \(model.r3gan.expansion\) = 40 channels"),
    (["model.r3gan.widths=[8,8,8,8,8]"], "model.r3gan.widths: this resolution has 4 stages"),
])
def test_r3gan_options_that_do_not_fit_name_their_key(overrides, message):
    cfg = load_config(None, ["model.arch=r3gan", *overrides]).model
    with pytest.raises(ConfigError, match=message):
        build_generator(cfg, RGB32)


def test_ramps_follow_their_shapes_over_the_run():
    cfg = load_config(None, ["loss.r1.gamma=1", "schedule.g_lr.shape=cosine", "schedule.g_lr.end=1e-5",
                             "schedule.r1_gamma.shape=linear", "schedule.r1_gamma.end=0.1",
                             "schedule.d_lr.start=3e-4"])
    ramps = Ramps(cfg, global_batch=64, total_steps=100)
    start, mid, end, after = (ramps.at(s) for s in (0, 50, 100, 500))
    assert start == {"g_lr": 1e-4, "r1_gamma": 1.0, "d_lr": 3e-4}
    assert mid["g_lr"] == pytest.approx((1e-4 + 1e-5) / 2) and mid["r1_gamma"] == pytest.approx(0.55)
    assert end == after == {"g_lr": pytest.approx(1e-5), "r1_gamma": pytest.approx(0.1), "d_lr": 3e-4}
    assert str(ramps) == "g_lr cosine 0.0001 → 1e-05, d_lr constant 0.0003 → 0.0003, r1_gamma linear 1 → 0.1 " \
                         "over 100 steps"
    kimg = Ramps(load_config(None, ["schedule.kimg=6.4", "schedule.g_lr.shape=linear", "schedule.g_lr.end=2e-4"]), 64,
                 total_steps=10**6)
    assert kimg.length == 100 and kimg.at(50)["g_lr"] == pytest.approx(1.5e-4)


def test_ramps_set_the_optimizers_penalties_augmentation_and_ema_at_each_step():
    eng = engine(*R3GAN, "loss.kind=rpgan", "loss.r2.gamma=1", "ema.enabled=true", "augment.kind=diffaug",
                 "augment.policy=[translation]", "train.batch_size=8", "schedule.g_lr.shape=linear",
                 "schedule.g_lr.end=0", "schedule.d_beta2.shape=linear", "schedule.d_beta2.end=0.99",
                 "schedule.r2_gamma.shape=linear", "schedule.r2_gamma.end=0", "schedule.augment_p.start=0",
                 "schedule.augment_p.end=1", "schedule.augment_p.shape=linear", "schedule.ema_half_life.start=0",
                 "schedule.ema_half_life.end=0.8", "schedule.ema_half_life.shape=linear", total_steps=10)
    eng.apply_ramps(5)
    assert eng.opt_g.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert eng.opt_d.param_groups[0]["betas"] == (0.9, pytest.approx((0.999 + 0.99) / 2))
    assert eng.loss.term("r2").gamma == pytest.approx(0.5) and eng.loss.augment.p == pytest.approx(0.5)
    assert eng.ema.decay == pytest.approx(ema_decay(0.4, 8)) and ema_half_life_kimg(eng.ema.decay, 8) == \
        pytest.approx(0.4)
    metrics = eng.iteration(5, [batch(8)])
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(("overrides", "message"), [
    (["schedule.g_lr.shape=cosine"], "schedule.g_lr.end: shape cosine goes from the start to an end value"),
    (["schedule.g_lr.end=1e-5"], "schedule.g_lr.end: shape constant has no end"),
    (["schedule.d_beta2.shape=linear", "schedule.d_beta2.end=1"],
     r"schedule.d_beta2.end: expected a value in \(0, 1\)"),
    (["schedule.g_lr.start=-1"], r"schedule.g_lr.start: expected a value in \[0, inf\)"),
    (["schedule.r1_gamma.shape=linear", "schedule.r1_gamma.end=0"], "schedule.r1_gamma: loss.r1.gamma is 0"),
    (["schedule.augment_p.start=0.5"], "schedule.augment_p: augment.kind=none applies no operations"),
    (["augment.kind=ada", "schedule.augment_p.start=0.5"], "schedule.augment_p: augment.kind=ada steers p itself"),
    (["schedule.ema_half_life.start=1"], "schedule.ema_half_life: ema.enabled is false"),
    (["schedule.kimg=0"], "schedule.kimg: expected values > 0"),
    (["train.kimg=-1"], "train.kimg: expected values > 0"),
    (["loss.r2.gamma=1", "train.compile=default"], "loss.r2.gamma: R2 differentiates D's gradient"),
])
def test_bad_ramps_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_run_length_is_the_first_limit_to_end_it():
    cfg = load_config(None, ["train.epochs=10", "train.max_steps=500", "train.kimg=19.2"]).train
    assert run_steps(cfg, 100, 64) == 300  # 19,200 images of 64
    assert run_steps(load_config(None, ["train.epochs=2"]).train, 100, 64) == 200


def test_fake_labels_follow_the_data_when_asked():
    counts = torch.tensor([1, 0, 3])
    stream = NoiseStream(0, 0, 4, 3, torch.device("cpu"), counts)
    labels = torch.cat([stream.draw(step, 0, 1000)[1] for step in range(4)])
    share = torch.bincount(labels, minlength=3) / labels.numel()
    assert share[1] == 0 and math.isclose(share[0].item(), 0.25, abs_tol=0.02)
    uniform = NoiseStream(0, 0, 4, 3, torch.device("cpu")).draw(0, 0, 3000)[1]
    assert abs((uniform == 1).float().mean().item() - 1 / 3) < 0.03
    with pytest.raises(ValueError, match="class counts"):
        engine("train.labels=data")


def test_evaluation_labels_follow_the_reference_with_two_of_each_at_least():
    from gan_dist.evaluation.evaluator import eval_labels

    labels = eval_labels(np.array([600, 300, 98, 2]), 1000, "data")
    assert torch.bincount(labels).tolist() == [597, 300, 99, 4]  # 2 each, then 992 by share
    assert labels[:4].tolist() != sorted(labels[:4].tolist()) or labels[:8].unique().numel() > 1  # interleaved
    assert torch.bincount(eval_labels(np.array([600, 300, 98, 2]), 1000, "uniform")).tolist() == [250] * 4
    assert eval_labels(np.array([5]), 7, "data").tolist() == [0] * 7
