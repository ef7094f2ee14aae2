"""The GAN step on one process: phases touch only their own network, losses and EMA are right."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU
from shapes import DIGITS, RGB32, arch_overrides, batch, info, model_config
from torch.utils._python_dispatch import TorchDispatchMode

from gan_dist.config import AugmentConfig, Config, ConfigError, ModelConfig
from gan_dist.configio import load_config
from gan_dist.models.base import Discriminator, build_generator, dcgan_stages, label_count
from gan_dist.models.ema import EMA
from gan_dist.seeds import NoiseStream, Stream
from gan_dist.training.augment import Augment
from gan_dist.training.engine import GANEngine
from gan_dist.training.objectives import BCE, BCEOptions, Hinge


def engine(*overrides: str) -> GANEngine:
    return GANEngine(load_config(None, list(overrides)), CPU, DIGITS)


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_each_phase_updates_only_its_network(arch):
    eng = engine(*arch_overrides(arch))
    g0, d0 = snapshot(eng.generator), snapshot(eng.discriminator)
    eng.d_step(*batch(8), *eng.noise.draw(0, 0, 8), 0)
    assert changed(d0, eng.discriminator) and not changed(g0, eng.generator)
    d1 = snapshot(eng.discriminator)
    eng.g_step(*eng.noise.draw(0, 1, 8), 0)
    assert changed(g0, eng.generator) and not changed(d1, eng.discriminator)
    assert all(p.requires_grad for p in eng.discriminator.parameters())  # D is unfrozen again


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_losses_finite_under_bf16_autocast(loss):
    eng = engine("amp.enabled=true", "amp.dtype=bfloat16", f"loss.kind={loss}")
    m = eng.iteration(0, [batch(8)])
    assert set(m) == set(eng.loss.names) and all(math.isfinite(v.item()) for v in m.values())
    if loss == "bce":  # D's mean probabilities
        assert 0 < m["d_real"].item() < 1 and 0 < m["d_fake"].item() < 1


def test_float16_on_cpu_is_refused():
    from gan_dist.config import ConfigError

    with pytest.raises(ConfigError, match="amp.dtype"):
        engine("amp.dtype=float16")


def test_noise_is_a_function_of_seed_rank_step():
    a, b = NoiseStream(1, 0, 4, 10, torch.device("cpu")), NoiseStream(1, 1, 4, 10, torch.device("cpu"))
    z0, y0 = a.draw(5, 0, 3)
    assert torch.equal(z0, a.draw(5, 0, 3)[0]) and torch.equal(y0, a.draw(5, 0, 3)[1])
    assert not torch.equal(z0, b.draw(5, 0, 3)[0])  # per-rank streams differ
    assert not torch.equal(z0, a.draw(6, 0, 3)[0])


def test_hinge_and_bce_values_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    hinge = Hinge(None)
    assert hinge.d(real, fake)[0].item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert hinge.g(fake).item() == pytest.approx(-(-2 + 0 + 1.5) / 3)
    bce = BCE(BCEOptions(label_smoothing=0.1))
    sp = torch.nn.functional.softplus
    expected = (0.9 * sp(-real) + 0.1 * sp(real)).mean() + sp(fake).mean()
    assert bce.d(real, fake)[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ema_update_is_the_running_average():
    g = build_generator(ModelConfig(), DIGITS)
    ema = EMA(g, decay=0.9, rampup=0.0, z_dim=100, num_classes=10)
    start = snapshot(ema.module)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update(g, step=1)
    for e, s, p in zip(ema.module.parameters(), start, g.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_rampup_starts_as_a_copy_and_reaches_the_configured_decay():
    g = build_generator(ModelConfig(), DIGITS)
    ema = EMA(g, decay=0.999, rampup=0.05, z_dim=100, num_classes=10)
    assert ema.decay_at(1) < 1e-5  # the first update all but copies G
    half_lives = [math.log(0.5) / math.log(ema.decay_at(step)) for step in (100, 500, 2000)]
    assert half_lives == pytest.approx([5.0, 25.0, 100.0])  # at most 5% of the steps done
    assert ema.decay_at(13_863) == 0.999 and ema.decay_at(10**6) == 0.999  # half-life 693 steps from there on
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    ema.update(g, step=1)
    for e, p in zip(ema.module.parameters(), g.parameters(), strict=True):
        torch.testing.assert_close(e, p)


def test_ema_batchnorm_statistics_are_measured_for_the_averaged_weights():
    g = build_generator(model_config("dcgan"), DIGITS)
    ema = EMA(g, decay=0.5, rampup=0.0, z_dim=100, num_classes=10, calibration_samples=512)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(1.5)
    g.train()(torch.randn(64, 100), torch.randint(0, 10, (64,)))  # the live G's statistics: other weights, inputs
    ema.update(g, step=1)
    module = ema.calibrated()
    assert not module.training
    # One calibration batch: eval mode now normalises like train mode on that batch.
    latents = torch.Generator().manual_seed(int(Stream.CALIBRATION))
    z, labels = torch.randn(512, 100, generator=latents), torch.arange(512) % 10
    with torch.no_grad():
        evaluated = module(z, labels)
        trained = module.train()(z, labels)
    module.eval()
    torch.testing.assert_close(evaluated, trained, atol=5e-3, rtol=0)
    live = dict(g.named_buffers())
    assert any(not torch.equal(b, live[name]) for name, b in module.named_buffers() if b.is_floating_point())
    before = [b.clone() for b in module.buffers()]
    assert ema.calibrated() is module  # not stale: nothing measured again
    assert all(torch.equal(a, b) for a, b in zip(before, module.buffers(), strict=True))


def test_ema_checkpoints_and_old_checkpoints_without_it_load():
    with_ema = engine("ema.enabled=true")
    state = with_ema.state_dict()
    assert "generator_ema" in state
    without = engine().state_dict()
    assert "generator_ema" not in without
    for weight in without["generator"].values():  # G moved on: a fresh EMA (a copy of G at start) differs
        weight.add_(1.0)
    with_ema.load_state_dict(without)  # an old checkpoint: EMA restarts from the loaded G
    for e, p in zip(with_ema.ema.module.state_dict().values(), without["generator"].values(), strict=True):
        assert torch.equal(e, p)


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("conditioning", ["concat", "projection"])
def test_spectral_norm_keeps_top_singular_value_near_one(arch, conditioning):
    d = Discriminator(model_config(arch, d_depth=2, conditioning=conditioning, spectral_norm=True), DIGITS)
    d.train()
    x, y = batch(4)
    for _ in range(30):  # power iterations run in training-mode forwards
        d(x, y)
    d.eval()
    for name, m in d.named_modules():
        if hasattr(m, "parametrizations"):
            w = m.weight.flatten(1) if m.weight.dim() > 2 else m.weight
            assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.05), name


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_deeper_discriminator_adds_3x3_convs_per_resolution(depth):
    d = Discriminator(model_config("dcgan", d_depth=depth, conditioning="projection"), DIGITS)
    convs = [m for m in d.trunk if isinstance(m, torch.nn.Conv2d)]
    assert [m.stride[0] for m in convs] == ([1] * (depth - 1) + [2]) * 2
    x, y = batch(4)
    assert d(x, y).shape == (4,)


def test_config_defaults_build():
    GANEngine(Config(), CPU, DIGITS)


class HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value back to Python (``.item()``, ``float(t)``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_iteration_reads_nothing_back_to_the_host(arch):
    """On CUDA a host read waits for the GPU; the step must never do one (checked here on CPU)."""
    eng = engine(*arch_overrides(arch), "ema.enabled=true")
    eng.iteration(0, [batch(8)])  # the first step may initialise lazily
    with HostReads() as reads:
        for step in range(1, 3):
            torch.stack(list(eng.iteration(step, [batch(8)]).values()))
    assert reads.seen == []


# ------------------------------------------------------------------------------- built from the description


@pytest.mark.parametrize(("described", "arch", "conditioning"), [
    (RGB32, "dcgan", "projection"), (RGB32, "mlp", "concat"), (info(3, 64, 0), "dcgan", "none"),
    (info(1, 16, 100), "dcgan", "concat"), (info(3, 48, 2), "dcgan", "projection"),
])
def test_networks_follow_the_description(described, arch, conditioning):
    cfg = model_config(arch, conditioning=conditioning)
    g, d = build_generator(cfg, described), Discriminator(cfg, described)
    images, labels = batch(3, described)
    assert g(torch.randn(3, cfg.z_dim), labels).shape == images.shape
    assert d(images, labels).shape == (3,)
    assert (g.embed is None) == (conditioning == "none")


def test_dcgan_stages_follow_the_resolution():
    assert [dcgan_stages(r) for r in (28, 32, 64, 48, 8)] == [(7, 2), (4, 3), (4, 4), (6, 3), (4, 1)]
    for bad in (27, 7, 4, 2):
        with pytest.raises(ConfigError, match="data.resolution"):
            dcgan_stages(bad)


def test_a_conditional_recipe_on_unlabelled_data_names_the_fix():
    with pytest.raises(ConfigError, match="model.conditioning=none"):
        label_count(ModelConfig(conditioning="projection"), info(3, 32, 0))
    assert label_count(ModelConfig(conditioning="none"), RGB32) == 0


def test_an_unconditional_engine_trains_with_zero_labels():
    engine = GANEngine(load_config(None, ["model.arch=dcgan", "model.dcgan.width=8", "model.conditioning=none"]), CPU,
                       info(3, 16, 0))
    images, _ = batch(4, info(3, 16, 0))
    metrics = engine.iteration(0, [(images, torch.zeros(4, dtype=torch.long))])
    assert all(torch.isfinite(v) for v in metrics.values())
    assert engine.noise.draw(0, 0, 5)[1].tolist() == [0] * 5


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_r1_penalty_matches_a_direct_computation(arch):
    """γ/2·every·E‖∇ₓD(x)‖² added to D's loss on due steps only, and reported as ``r1_penalty``."""
    eng = engine(*arch_overrides(arch), "loss.r1.gamma=3", "loss.r1.every=4", "amp.enabled=false",
                 "model.mlp.d_dropout=0" if arch == "mlp" else "model.conditioning=concat")
    real, labels = batch(6)
    z, fake_labels = eng.noise.draw(0, 0, 6)
    gen = torch.Generator()
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(eng.discriminator(x, labels).sum(), x)
    expected = grad.square().flatten(1).sum(1).mean()

    def d_grads(d_step: int) -> tuple[dict, list[torch.Tensor]]:
        eng.discriminator.zero_grad(set_to_none=True)
        metrics = eng.loss.d_phase(eng.nets, real, labels, z, fake_labels, d_step, gen)
        return metrics, [p.grad.clone() for p in eng.discriminator.parameters()]

    metrics, penalized = d_grads(8)
    assert metrics["r1_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)
    skipped, plain = d_grads(9)
    assert "r1_penalty" not in skipped and eng.loss.names[-1] == "r1_penalty"
    # the penalty is differentiable with respect to D's weights, and adds to their gradient
    assert any(not torch.allclose(a, b) for a, b in zip(penalized, plain, strict=True))


def test_bcr_penalty_matches_a_direct_computation():
    """λ·[E(D(x) - D(T(x)))² + E(D(G(z)) - D(T(G(z))))²], T drawn from the step's stream: real first, then fake."""
    eng = engine("loss.bcr.weight=10", "loss.bcr.policy=[translation,cutout]", "amp.enabled=false",
                 "model.mlp.d_dropout=0")
    real, labels = batch(6)
    z, fake_labels = eng.noise.draw(0, 0, 6)
    with torch.no_grad():
        fake = eng.nets.G.no_grad(z, fake_labels)
        gen, augment, D = torch.Generator().manual_seed(3), Augment(AugmentConfig(), CPU, 6), eng.discriminator
        expected = sum((D(x, y) - D(augment.transform(x, ("translation", "cutout"), gen), y)).square().mean()
                       for x, y in ((real, labels), (fake, fake_labels)))
    metrics = eng.loss.d_phase(eng.nets, real, labels, z, fake_labels, 0, torch.Generator().manual_seed(3))
    assert metrics["bcr_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "bcr_penalty" in eng.loss.names and expected.item() > 0
    with torch.no_grad():
        plain, _ = BCE(BCEOptions()).d(eng.discriminator(real, labels), eng.discriminator(fake, fake_labels))
    assert metrics["d_loss"].item() == pytest.approx(plain.item(), rel=1e-5)  # the objective alone, as before


def test_r1_composes_with_autocast():
    eng = engine("loss.r1.gamma=1", "loss.r1.every=1", "amp.enabled=true", "amp.dtype=bfloat16")
    metrics = eng.iteration(0, [batch(8)])
    assert set(metrics) == set(eng.loss.names) and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(("described", "extra"), [
    (info(1, 28, 10), ["model.resnet.attention=14"]),
    (info(3, 32, 10), ["model.resnet.z_chunks=true", "model.resnet.attention=16"]),
    (info(3, 64, 10), ["model.resnet.attention=32"]),
    (info(3, 128, 10), ["model.resnet.z_chunks=true"]),
    (info(3, 32, 0), []),
])
def test_resnet_is_built_from_the_description(described, extra):
    """Any stage layout; class-conditional BatchNorm with classes, plain BatchNorm without them."""
    from gan_dist.models.layers import ConditionalBatchNorm2d

    conditioning = "projection" if described.num_classes else "none"
    cfg = load_config(None, ["model.arch=resnet", "model.resnet.g_width=8", "model.resnet.d_width=8",
                             f"model.conditioning={conditioning}", "model.spectral_norm=true", *extra]).model
    g, d = build_generator(cfg, described), Discriminator(cfg, described)
    images, labels = batch(4, described)
    with torch.no_grad():
        assert g(torch.randn(4, cfg.z_dim), labels).shape == images.shape
        assert d(images, labels).shape == (4,)
    norms = [m for m in g.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert norms and all((m.to_gain is not None) == bool(described.num_classes) for m in norms)
    assert all(m.norm.affine != bool(described.num_classes) for m in norms)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.resnet.attention=32"], "model.resnet.attention: 32 is not a stage of this resolution; use one of 8, 16"),
    (["model.resnet.z_chunks=true", "model.z_dim=3"], "model.z_dim: 3 cannot be split into 4 chunks"),
])
def test_resnet_options_that_do_not_fit_the_data_name_their_key(overrides, message):
    cfg = load_config(None, ["model.arch=resnet", *overrides]).model
    with pytest.raises(ConfigError, match=message):
        build_generator(cfg, RGB32)


def test_dcgan_orthogonal_init_gives_unit_class_embeddings_and_orthonormal_weights():
    cfg = load_config(None, ["model.arch=dcgan", "model.dcgan.width=8", "model.dcgan.g_init=orthogonal",
                             "model.embed_dim=16"]).model
    g = build_generator(cfg, RGB32)
    torch.testing.assert_close(g.embed.weight.norm(dim=1), torch.ones(10))
    w = g.project[0].weight  # [8·8·4·4, z + embedding]: orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(w.shape[1]), atol=1e-5, rtol=0)
