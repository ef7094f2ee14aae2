"""The distributed environment: device per rank, backend choice, and DDP at world size 1."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from shapes import DIGITS
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist import dist
from gan_dist.config import ConfigError, DistConfig, load_config
from gan_dist.engine import GANEngine


@pytest.mark.parametrize(("local_rank", "gpus", "index"), [(0, 1, 0), (3, 1, 0), (3, 2, 1), (5, 8, 5)])
def test_ranks_map_onto_the_visible_gpus(monkeypatch, local_rank, gpus, index):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert dist._device(DistConfig(), local_rank) == torch.device("cuda", index)


def test_cuda_requested_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="dist.device=cuda"):
        dist._device(DistConfig(device="cuda"), 0)
    assert dist._device(DistConfig(device="auto"), 0) == torch.device("cpu")


@pytest.mark.parametrize(("backend", "device", "expected"), [
    ("auto", "cpu", "gloo"), ("auto", "cuda", "nccl"), ("gloo", "cuda", "gloo"), ("gloo", "cpu", "gloo"),
])
def test_backend_follows_the_device_unless_set(backend, device, expected):
    assert dist._backend(DistConfig(backend=backend), torch.device(device)) == expected


def test_nccl_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="dist.backend=nccl"):
        dist._backend(DistConfig(backend="nccl"), torch.device("cpu"))


def test_force_ddp_at_world_size_1_wraps_both_networks_and_trains_identically():
    """DDP over one rank averages each gradient with itself: the same steps as no DDP, bit for bit."""
    batch = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (16,))
    params = {}
    for forced in (False, True):
        cfg = load_config(None, [f"dist.force_ddp={str(forced).lower()}", "dist.device=cpu"])
        env = dist.setup(cfg.dist)
        try:
            assert env.distributed == forced
            engine = GANEngine(cfg, env, DIGITS)
            assert isinstance(engine.G, DDP) == forced and isinstance(engine.D, DDP) == forced
            agreement = dist.StepAgreement(env)
            for step in range(3):
                engine.iteration(step, [batch])
                agreement.exchange(False, False)
            assert agreement.drain() == (False, False)
            params[forced] = [p.detach().clone() for m in (engine.generator, engine.discriminator)
                              for p in m.parameters()]
        finally:
            dist.teardown(env)
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True], strict=True))


def test_a_failed_collective_is_told_apart_from_a_bug():
    """The trainer reports these as a lost peer (one line, exit 4); any other error keeps its traceback."""
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:5: Connection reset")
    assert dist.lost_peer(gloo)
    assert dist.lost_peer(tdist.DistNetworkError("the client socket has timed out"))
    assert not dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
