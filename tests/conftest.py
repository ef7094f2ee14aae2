"""Shared fixtures: tiny IDX datasets written by the tests, and helpers to run the real entry points."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_idx(folder: Path, n: int, split: str = "test", gz: bool = False,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an MNIST-format split of ``n`` images: each class is a bright bar at its own row band,
    so the data is learnable and a classifier can tell the classes apart."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y: 5 + 2 * y, 4:24] = 200 + rng.integers(0, 55)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return images, labels


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A 256-image test split in torchvision's raw layout."""
    root = tmp_path / "data"
    write_idx(root / "MNIST" / "raw", 256)
    return root


def base_overrides(run_dir: Path, root: Path, **extra: object) -> list[str]:
    """Overrides for a tiny, quiet, offline run on a test-written split."""
    items = {
        "run_dir": run_dir,
        "data.root": root,
        "data.split": "test",
        "data.download": False,
        "log.wandb.mode": "disabled",
        "log.progress": False,
        "train.batch_size": 16,
        "log.every_steps": 2,
        "checkpoint.every_steps": 0,
    } | extra
    return [f"{k}={v}" for k, v in items.items()]


def file_group(rank: int, world: int, store: Path, timeout_s: float = 60):
    """Join a gloo group of ``world`` spawned processes through a file store: no port is picked in
    advance, so no other process can take it first. Returns the rank's ``DistEnv``."""
    import datetime

    import torch
    import torch.distributed as tdist

    from gan_dist.dist import DistEnv

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, rank, world, world, torch.device("cpu"), tdist.group.WORLD)


def complete_records(path: Path) -> list[dict]:
    """The JSON lines of a file that a running process may be appending to (``metrics.jsonl``):
    text after the last newline is a line still being written, and is left out."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def torchrun_cmd(nproc: int, args: Sequence[str], *extra: str) -> list[str]:
    """torchrun on this host; ``--standalone`` lets its store bind a port itself, so concurrent test
    runs can never join each other's rendezvous through a port picked in advance."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "-m", "gan_dist.train", *args]


def workers(proc: subprocess.Popen) -> list[int]:
    """PIDs of a launcher's worker processes (torchrun's ranks), in order of start."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def run(cmd: Sequence[str], timeout: float = 300, cwd: Path = REPO, env_extra: dict[str, str] | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run a command to completion with captured text output, unbuffered and one thread per process."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | (env_extra or {})
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, **kw)
