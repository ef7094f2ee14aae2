"""Two real gloo processes: parameters stay identical across ranks, D is never all-reduced in the
G step, and 2 ranks × B/2 follow the same trajectory as 1 rank × B, on fixed tensors and on an RGB
image folder fed through the real data layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import file_group, write_folder
from shapes import DIGITS
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from gan_dist.configio import load_config
from gan_dist.data.batches import make_batches
from gan_dist.data.cache import load_split
from gan_dist.dist import DistEnv, setup, teardown
from gan_dist.training.engine import GANEngine

pytestmark = pytest.mark.integration  # starts processes or services

STEPS = 3
GLOBAL_BATCH = 16

# Every option composes with DDP: each must keep parameters bit-identical across ranks.
OPTIONS = {
    "mlp": [],
    "dcgan_batchnorm": ["model.arch=dcgan", "model.dcgan.width=8"],
    "dcgan_sn_hinge_projection_ema": ["model.arch=dcgan", "model.dcgan.width=8", "model.dcgan.d_depth=2",
                                      "model.spectral_norm=true", "loss.kind=hinge", "model.conditioning=projection",
                                      "ema.enabled=true"],
    "n_critic_smoothing_ttur": ["train.n_critic=2", "loss.bce.label_smoothing=0.1", "optim.d_lr=4e-4",
                                "optim.g_betas=[0.5, 0.99]"],
    "mlp_bf16": ["amp.enabled=true"],
    "dcgan_r1_lazy_bf16": ["model.arch=dcgan", "model.dcgan.width=8", "loss.r1.gamma=1", "loss.r1.every=2",
                           "amp.enabled=true"],
    "dcgan_conditional_batchnorm": ["model.arch=dcgan", "model.dcgan.width=8", "model.dcgan.g_label=batchnorm"],
}

RESNET = ["model.arch=resnet", "model.resnet.g_width=8", "model.resnet.d_width=8", "model.resnet.attention=14",
          "model.resnet.z_chunks=true", "model.spectral_norm=true", "loss.kind=hinge", "model.conditioning=projection"]
"""The residual pair with every option: conditional BatchNorm from z chunks, attention, projection, spectral norm."""
OPTIONS["resnet_all_options_ema"] = [*RESNET, "ema.enabled=true"]

R3GAN = ["model.arch=r3gan", "model.r3gan.widths=[16,8]", "model.r3gan.group_size=8", "model.conditioning=projection",
         "loss.kind=rpgan", "loss.r1.gamma=1", "loss.r1.every=2", "loss.r2.gamma=1", "loss.r2.every=2",
         "schedule.kimg=0.1", "schedule.g_lr.shape=cosine", "schedule.g_lr.end=1e-5", "schedule.d_beta2.shape=linear",
         "schedule.d_beta2.end=0.99", "schedule.r2_gamma.shape=cosine", "schedule.r2_gamma.end=0.1"]
"""R3GAN's pair and loss: RpGAN pairs each fake with a real in G's phase too, R1 and R2 both lazy, and ramps over
100 images."""
OPTIONS["r3gan_rpgan_r1_r2_ramps_ema"] = [*R3GAN, "ema.enabled=true", "schedule.ema_half_life.start=0",
                                          "schedule.ema_half_life.end=0.05", "schedule.ema_half_life.shape=linear"]


def _fixed_inputs(step: int) -> dict[str, torch.Tensor]:
    """The same global batch for any world size: each rank then takes its slice."""
    g = torch.Generator().manual_seed(100 + step)
    return {
        "real": torch.rand(GLOBAL_BATCH, 1, 28, 28, generator=g) * 2 - 1,
        "labels": torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
        "z_d": torch.randn(GLOBAL_BATCH, 100, generator=g),
        "y_d": torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
        "z_g": torch.randn(GLOBAL_BATCH, 100, generator=g),
        "y_g": torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
    }


NO_DROPOUT = "model.mlp.d_dropout=0"
EQUIVALENCE = {"plain": [NO_DROPOUT], "r1": [NO_DROPOUT, "loss.r1.gamma=2", "loss.r1.every=2"], "resnet_same": RESNET,
               "small_data": [NO_DROPOUT, "augment.kind=ada", "augment.ada_p=0.5",
                                 "augment.policy=[translation,cutout]", "loss.lecam.weight=0.3",
                                 "loss.bcr.weight=10", "loss.bcr.policy=[color,translation]"],
               "r3gan": [*R3GAN, "augment.kind=diffaug", "augment.policy=[translation]", "schedule.augment_p.start=0.2",
                         "schedule.augment_p.end=0.8", "schedule.augment_p.shape=linear"]}
"""The runs that must give one rank's weights on two: R1's, R2's and bCR's penalties are means over the batch, as the
loss is, and RpGAN pairs the same real and fake at any world size; each image is augmented alike at any world size (by
ADA, DiffAugment at a ramped p and by bCR's T), and LeCam's EMAs take the global means.
``*_same`` runs give every rank the same batch."""


def _equivalence_run(env: DistEnv, out: Path) -> None:
    """Dropout off, no autocast, fixed inputs sliced by rank; the parameters after STEPS are saved."""
    rank, world = env.rank, env.world_size
    for name, extra in EQUIVALENCE.items():
        same = name.endswith("_same")
        per = GLOBAL_BATCH // (2 if same else world)
        # The batch per rank sets the global batch that the ramps' length in images is counted in.
        eng = GANEngine(load_config(None, ["amp.enabled=false", f"train.batch_size={per}", *extra]), env, DIGITS)
        probe = _fixed_inputs(-1)
        outputs = [_outputs(eng, probe)]
        for step in range(STEPS):
            part = 0 if same else rank
            t = {k: v[part * per:(part + 1) * per] for k, v in _fixed_inputs(step).items()}
            eng.apply_ramps(step)
            eng.d_step(t["real"], t["labels"], t["z_d"], t["y_d"], step)
            eng.g_step(t["z_g"], t["y_g"], step, (t["real"], t["labels"]))
        if rank == 0:
            torch.save({"G": eng.generator.state_dict(), "D": eng.discriminator.state_dict(),
                        "outputs": [*outputs, _outputs(eng, probe)]}, out / f"equiv_{name}_{world}.pt")


@torch.no_grad()
def _outputs(eng: GANEngine, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What G and D compute on one fixed global batch (G's BatchNorm on the batch's own statistics)."""
    fake = torch.func.functional_call(eng.generator, {**dict(eng.generator.named_parameters()),
                                      **{k: b.clone() for k, b in eng.generator.named_buffers()}}, (t["z_g"], t["y_g"]))
    return {"G": fake, "D": eng.discriminator(t["real"], t["labels"])}


def _join(rank: int, world: int, store: Path) -> DistEnv:
    """A gloo group of ``world`` spawned ranks, or the plain single-process environment."""
    return file_group(rank, world, store) if world > 1 else setup(load_config(None, []).dist)


def _worker(rank: int, world: int, out: Path) -> None:
    env = _join(rank, world, out / f"store_{world}")
    if world > 1:
        _check_options(env, out)
    # In float64, summing 16 rows at once or 8 and 8 across ranks differs by far less than the tolerance, on any
    # CPU's kernels: in float32 the difference, amplified by Adam on near-zero gradients, reached 1e-6.
    torch.set_default_dtype(torch.float64)
    _equivalence_run(env, out)
    teardown(env)


def _counting_hook(counts: dict[str, int], tag: str):
    """A DDP comm hook that all-reduces as usual and counts its calls: the proof of who syncs when."""

    def hook(state, bucket):
        counts[tag] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _check_options(env: DistEnv, out: Path) -> None:
    """A few iterations per option, with different real data per rank, counting all-reduces per network."""
    results: dict[str, object] = {}
    for name, overrides in OPTIONS.items():
        eng = GANEngine(load_config(None, overrides), env, DIGITS)
        counts = {"G": 0, "D": 0}

        eng.nets.G.step.register_comm_hook(None, _counting_hook(counts, "G"))
        eng.nets.D.step.register_comm_hook(None, _counting_hook(counts, "D"))
        torch.manual_seed(env.rank)  # different real data on each rank
        n_critic = load_config(None, overrides).train.n_critic
        for step in range(STEPS):
            reals = [(torch.rand(8, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (8,))) for _ in range(n_critic)]
            eng.iteration(step, reals)
        # The G step alone: D's hook must stay silent.
        before = dict(counts)
        eng.g_step(*eng.noise.draw(99, 0, 8), 99, reals[-1])
        results[name] = {
            "params": [p.detach().clone() for p in [*eng.generator.parameters(), *eng.discriminator.parameters()]],
            "ema": [p.clone() for p in eng.ema.module.parameters()] if eng.ema else [],
            "d_in_g_step": counts["D"] - before["D"],
            "g_in_g_step": counts["G"] - before["G"],
            "d_total": counts["D"],
        }
    torch.save(results, out / f"rank{env.rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, out), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, out), nprocs=1, join=True)
    return out


@pytest.mark.parametrize("option", list(OPTIONS))
def test_parameters_bit_identical_across_ranks(two_ranks, option):
    r0, r1 = (torch.load(two_ranks / f"rank{r}.pt")[option] for r in (0, 1))
    assert len(r0["params"]) > 0
    for a, b in zip(r0["params"] + r0["ema"], r1["params"] + r1["ema"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_d_gradients_not_all_reduced_in_g_step(two_ranks, option):
    r = torch.load(two_ranks / "rank0.pt")[option]
    assert r["d_total"] > 0  # the hook does see D's all-reduces in D steps...
    assert r["g_in_g_step"] > 0  # ...and G's in the G step,
    assert r["d_in_g_step"] == 0  # but none of D's in the G step.


@pytest.mark.parametrize("run", [r for r in EQUIVALENCE if not r.endswith("_same")])
def test_two_half_batches_equal_one_full_batch(two_ranks, run):
    one, two = (torch.load(two_ranks / f"equiv_{run}_{world}.pt") for world in (1, 2))
    for net in ("G", "D"):
        for key in one[net]:
            torch.testing.assert_close(two[net][key], one[net][key], rtol=1e-5, atol=1e-6, msg=f"{net}.{key}")
    # And the check has teeth: one step moves the parameters far more than the tolerance.
    from gan_dist.models.base import build_generator

    torch.manual_seed(0)
    init = build_generator(load_config(None, EQUIVALENCE[run]).model, DIGITS).state_dict()
    assert max((init[k] - one["G"][k]).abs().max().item() for k in init) > 1e-4


def test_two_ranks_of_the_resnet_equal_one_rank_on_the_same_batch(two_ranks):
    """Each rank's BatchNorm normalises its own half batch (SyncBatchNorm needs CUDA), so 2 × B/2 is not
    1 × B for G; given the same batch on both ranks, DDP's average must be the one rank's step exactly."""
    one, two = (torch.load(two_ranks / f"equiv_resnet_same_{world}.pt") for world in (1, 2))
    for net in ("G", "D"):
        for key in one[net]:
            torch.testing.assert_close(two[net][key], one[net][key], rtol=1e-5, atol=1e-6, msg=f"{net}.{key}")
    moved = (one["outputs"][1]["G"] - one["outputs"][0]["G"]).norm()
    assert moved > 1e-3


# ------------------------------------------------------------------------------ an RGB image folder

def _folder_config(out: Path) -> list[str]:
    """Streamed (the path that is not a plain index gather) with flips, so both must shard alike."""
    return ["model.mlp.d_dropout=0", "amp.enabled=false", "data.name=folder", f"data.root={out / 'images'}",
            "data.resolution=16", "data.resident=off", "data.flip=true", "data.workers=0",
            f"data.cache_dir={out / 'cache'}", "data.split=train"]


def _folder_worker(rank: int, world: int, out: Path) -> None:
    """STEPS iterations on the folder's batches with fixed latents; saves this rank's batches, and
    rank 0 the parameters."""
    env = _join(rank, world, out / f"folder_store_{world}")
    cfg = load_config(None, _folder_config(out))
    split = load_split(cfg.data, env)
    batches = make_batches(split, cfg.data, env, GLOBAL_BATCH // world, cfg.train.seed)
    eng = GANEngine(cfg, env, split.info)
    per, seen = GLOBAL_BATCH // world, []
    for step, (real, labels) in zip(range(STEPS), batches.epoch(1), strict=False):
        g = torch.Generator().manual_seed(100 + step)
        z = torch.randn(2, GLOBAL_BATCH, cfg.model.z_dim, generator=g)[:, rank * per:(rank + 1) * per]
        y = torch.randint(0, split.info.num_classes, (2, GLOBAL_BATCH), generator=g)[:, rank * per:(rank + 1) * per]
        eng.d_step(real, labels, z[0], y[0], step)
        eng.g_step(z[1], y[1], step)
        seen.append((real.clone(), labels.clone()))
    torch.save(seen, out / f"folder_batches_{world}_{rank}.pt")
    if rank == 0:
        torch.save({"G": eng.generator.state_dict(), "D": eng.discriminator.state_dict()}, out / f"folder_{world}.pt")
    batches.close()
    teardown(env)


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_folder")
    write_folder(out / "images", {"red": 20, "green": 20, "blue": 20}, modes=("RGB",))
    mp.spawn(_folder_worker, args=(2, out), nprocs=2, join=True)
    mp.spawn(_folder_worker, args=(1, out), nprocs=1, join=True)
    return out


def test_two_ranks_read_exactly_the_one_rank_batches_of_a_folder(folder_runs):
    one = torch.load(folder_runs / "folder_batches_1_0.pt")
    halves = [torch.load(folder_runs / f"folder_batches_2_{r}.pt") for r in (0, 1)]
    assert len(one) == STEPS and one[0][0].shape == (GLOBAL_BATCH, 3, 16, 16)
    for step, (images, labels) in enumerate(one):
        # DistributedSampler deals sample i of the global order to rank i mod 2
        (x0, y0), (x1, y1) = halves[0][step], halves[1][step]
        assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), images)
        assert torch.equal(torch.stack([y0, y1], 1).flatten(0, 1), labels)


def test_two_ranks_on_a_folder_follow_the_one_rank_trajectory(folder_runs):
    """Equal up to float summation order: DDP averages two half-batch gradients, 1 rank one full one."""
    one, two = torch.load(folder_runs / "folder_1.pt"), torch.load(folder_runs / "folder_2.pt")
    for net in ("G", "D"):
        for key in one[net]:
            torch.testing.assert_close(two[net][key], one[net][key], rtol=1e-5, atol=1e-6, msg=f"{net}.{key}")
