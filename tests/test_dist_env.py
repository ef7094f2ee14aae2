"""The distributed environment: device per rank, backend choice, DDP at world size 1, and how a
failed collective is told apart from a bug."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import file_group
from shapes import DIGITS
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist import dist
from gan_dist.config import ConfigError, DistConfig
from gan_dist.configio import load_config
from gan_dist.training.engine import GANEngine


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
def test_backend_follows_the_device_unless_set(backend, device, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dist._backend(DistConfig(backend=backend), torch.device(device), local_world=1) == expected


def test_nccl_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="dist.backend=nccl"):
        dist._backend(DistConfig(backend="nccl"), torch.device("cpu"), local_world=1)


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
            assert isinstance(engine.nets.G.step, DDP) == forced and isinstance(engine.nets.D.step, DDP) == forced
            agreement = dist.StepAgreement(env)
            for step in range(3):
                engine.iteration(step, [batch])
                agreement.exchange(False, False)
            assert agreement.drain() == dist.Agreed(stop=False, timed_save=False)
            params[forced] = [p.detach().clone() for m in (engine.generator, engine.discriminator)
                              for p in m.parameters()]
        finally:
            dist.teardown(env)
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True], strict=True))


def _silent_peer_worker(rank: int, store: Path, out: Path) -> None:
    """Rank 0 joins the group and goes silent; rank 1 waits on several pending all-reduces, the way
    DDP's buckets wait in a backward pass, and writes what each wait raised."""
    file_group(rank, 2, store, timeout_s=2)
    if rank == 0:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    pending = [tdist.all_reduce(torch.ones(4), async_op=True) for _ in range(3)]
    raised = []
    for work in reversed(pending):
        try:
            work.wait()
            raised.append(None)
        except RuntimeError as e:
            raised.append([str(e).splitlines()[0], dist.lost_peer(e)])
    out.write_text(json.dumps(raised))


@pytest.mark.integration
def test_every_error_a_silent_peer_causes_is_told_as_a_lost_peer(tmp_path):
    """The first wait to time out names gloo's transport; gloo then fails every other pending operation
    with a bare sentence. Both are a lost peer (one line, exit 4); any other error keeps its traceback."""
    out = tmp_path / "raised.json"
    mp.spawn(_silent_peer_worker, args=(tmp_path / "store", out), nprocs=2, join=True)
    raised = json.loads(out.read_text())
    assert all(r is not None and r[1] for r in raised), raised
    assert len({message for message, _ in raised}) > 1, "expected the timeout and the closure it causes"
    assert dist.lost_peer(tdist.DistNetworkError("the client socket has timed out"))
    assert not dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
