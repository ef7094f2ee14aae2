"""Augmentation of D's inputs: differentiable, the same draws for an image at any world size, and ADA's
controller moving p the right way."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU

from gan_dist.config import AugmentConfig, ConfigError
from gan_dist.configio import load_config
from gan_dist.dist import DistEnv
from gan_dist.seeds import NoiseStream, Stream
from gan_dist.training.augment import OPERATIONS, Augment, Draws


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_is_differentiable_and_applied_with_probability_p(name):
    x = images(256).requires_grad_(True)
    y = OPERATIONS[name](x, Draws(torch.Generator().manual_seed(1)))
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    half = Augment(AugmentConfig(kind="ada", policy=(name,), ada_p=0.5), CPU, 256)
    y = half(x.detach(), torch.Generator().manual_seed(2))
    same = torch.tensor([torch.equal(a, b) for a, b in zip(y, x.detach(), strict=True)])
    assert 0.4 < same.float().mean() < 0.6  # the others pass through bit for bit


@pytest.mark.parametrize("kind", ["diffaug", "ada"])
def test_two_ranks_augment_their_halves_of_the_global_batch_as_one_rank_does(kind):
    """Every image of the global batch takes its own row of draws seeded alike on all ranks (``NoiseStream.shared``)."""
    cfg = AugmentConfig(kind=kind, ada_p=0.5)
    x = images(8)

    def augmented(env: DistEnv, rows: slice) -> torch.Tensor:
        gen = NoiseStream(0, env.rank, 8, 1, CPU.device).shared(Stream.AUGMENT_D, 5)
        return Augment(cfg, env, 8)(x[rows], gen)

    whole = augmented(CPU, slice(0, 8))
    halves = [augmented(DistEnv(rank=r, local_rank=r, world_size=2, local_world_size=2, device=CPU.device),
                        slice(4 * r, 4 * r + 4)) for r in (0, 1)]
    assert not torch.equal(whole, x)
    assert torch.equal(torch.cat(halves), whole)


def controller(target: float, p: float) -> Augment:
    cfg = AugmentConfig(kind="ada", ada_target=target, ada_interval=2, ada_kimg=1.0, ada_p=p)
    return Augment(cfg, CPU, global_batch=50)  # p moves by 50·2/1000 = 0.1 per adjustment


def observe(ada: Augment, real_logits: torch.Tensor) -> None:
    """One D step's signs on one rank, as the loss hands them over."""
    ada.absorb(ada.local_stats(real_logits, -real_logits))


def test_ada_raises_p_for_a_d_that_is_always_sure_of_the_reals_and_lowers_it_for_one_never_sure():
    sure, unsure = controller(0.6, 0.5), controller(0.6, 0.5)
    for step in range(6):
        observe(sure, torch.full((50,), 3.0))
        observe(unsure, torch.linspace(-1, 1, 50))  # r_t = 0: D cannot tell reals from fakes
        metrics = sure.adjust(step), unsure.adjust(step)
    assert sure.p == pytest.approx(0.8) and unsure.p == pytest.approx(0.2)
    assert metrics[0]["ada_rt"].item() == 1.0 and metrics[1]["ada_rt"].item() == 0.0
    for _ in range(20):  # p stays within [0, 1]
        observe(sure, torch.ones(50))
        sure.adjust(1)
    assert sure.p == 1.0


def test_diffaug_changes_every_image_and_none_changes_nothing():
    x, gen = images(16), torch.Generator().manual_seed(0)
    diff = Augment(AugmentConfig(kind="diffaug", policy=("color",)), CPU, 16)(x, gen)
    assert diff.shape == x.shape and all(not torch.equal(a, b) for a, b in zip(diff, x, strict=True))
    assert Augment(AugmentConfig(), CPU, 16)(x, gen) is x


@pytest.mark.parametrize(("override", "named"), [
    ("augment.policy=[color,rotate]", "augment.policy"),
    ("augment.ada_target=1.0", "augment.ada_target"),
    ("augment.ada_target=0", "augment.ada_target"),
    ("loss.lecam.decay=1", "loss.lecam.decay"),
    ("loss.bcr.policy=[flip]", "loss.bcr.policy"),
    ("loss.bcr.weight=-1", "loss.bcr.weight"),
])
def test_bad_augment_values_are_config_errors_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, ["augment.kind=ada", override])


def test_bcr_with_no_operation_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="loss.bcr.policy"):
        load_config(None, ["loss.bcr.weight=10", "loss.bcr.policy=[]"])


def test_ada_steers_an_unconditional_d_too():
    """r_t = E[sign(D(x))] reads no label: a flat folder trains with ADA as a labelled one does."""
    from conftest import CPU
    from shapes import batch, info

    from gan_dist.training.engine import GANEngine

    flat = info(3, 16, 0)
    eng = GANEngine(load_config(None, ["model.arch=dcgan", "model.dcgan.width=8", "model.conditioning=none",
                                       "augment.kind=ada", "augment.ada_interval=1", "augment.ada_p=0.5"]), CPU, flat)
    images, _ = batch(8, flat)
    metrics = eng.iteration(0, [(images, torch.zeros(8, dtype=torch.long))])
    assert metrics["augment_p"].item() != 0.5 and all(torch.isfinite(v) for v in metrics.values())
