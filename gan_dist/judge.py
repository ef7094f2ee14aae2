"""The judge: a small CNN classifier whose penultimate layer is the feature space of every metric.

Inception sees 299×299 photos and needs weights from the internet; a digit classifier trained here
on the real training split sees what matters in 28×28 digits. It is trained once per dataset and
cached under ``<judge_dir>/<name>-<split>-<hash>.pt``, where the hash covers the decoded images and
labels it was trained and tested on plus its recipe: other data, or another recipe, is another file.

Which data: the ``train`` split when its files are there (or ``data.download`` may fetch them), and
its accuracy is measured on ``test``. Without a training split (only MNIST's 10k test digits on some
machines) it trains on a seeded share of ``test`` and reports accuracy on the rest.

All ranks train it together (DDP, the global batch split over ranks), or all load it: never one
rank alone while the others wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.checkpoint import CheckpointError, atomic_save
from gan_dist.config import DataConfig
from gan_dist.data import NUM_CLASSES, ShardedBatches, find_files, load_split
from gan_dist.dist import DistEnv
from gan_dist.engine import derive_seed

JUDGE_VERSION = 1  # bump when JudgeNet or the training loop changes: old caches then stop matching


@dataclass(frozen=True)
class JudgeSpec:
    """The judge's recipe; part of the cache key. Tests use a tiny one."""

    width: int = 32
    features: int = 128
    samples: int = 360_000
    """Training length in images seen, whatever the split size: 6 epochs of 60k, 45 of 8k."""
    batch_size: int = 256
    lr: float = 3e-3
    shift: int = 1
    """Training images move by up to this many pixels per axis (0: no augmentation)."""
    holdout: float = 0.2
    """Share of the split held out for the accuracy when the judge must train on the evaluation split."""
    seed: int = 0


DEFAULT_SPEC = JudgeSpec()


class JudgeNet(nn.Module):
    """Two strided conv layers (28 → 14 → 7) and a ReLU feature layer; the logits read it out linearly.

    Strides instead of pooling keep a training step cheap on a CPU (1.5 MMAC per image).
    """

    def __init__(self, spec: JudgeSpec) -> None:
        super().__init__()
        w = spec.width
        self.trunk = nn.Sequential(
            nn.Conv2d(1, w, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * w * 7 * 7, spec.features), nn.ReLU(),
        )
        self.head = nn.Linear(spec.features, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return features, self.head(features)


@dataclass
class Judge:
    """A trained judge in eval mode, with what is known about it (accuracy, data, cache file)."""

    net: JudgeNet
    info: dict[str, Any]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, F] and logits [N, 10] of images in [-1, 1], in float32."""
        parts = [self.net(images[i:i + batch].float()) for i in range(0, images.shape[0], batch)]
        parts = parts or [self.net(images.float())]  # a rank with no samples still returns [0, F]
        return torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts])


@dataclass(frozen=True)
class JudgeData:
    """Training and held-out images of the judge, and the name of what they are."""

    trained_on: str
    train: tuple[torch.Tensor, torch.Tensor]
    heldout: tuple[torch.Tensor, torch.Tensor]


def judge_data(cfg: DataConfig, env: DistEnv, holdout: float, seed: int) -> JudgeData:
    """The training split when it can be had, else a seeded split of ``test`` (see the module docstring)."""
    train_cfg = dataclasses.replace(cfg, split="train")
    test = load_split(dataclasses.replace(cfg, split="test"), env)
    if cfg.download or find_files(train_cfg) is not None:
        return JudgeData("train", load_split(train_cfg, env), test)
    order = torch.randperm(test[1].shape[0], generator=torch.Generator().manual_seed(seed)).to(env.device)
    n_held = round(holdout * order.shape[0])
    held, kept = order[:n_held], order[n_held:]
    return JudgeData("test", (test[0][kept], test[1][kept]), (test[0][held], test[1][held]))


def content_hash(data: JudgeData, spec: JudgeSpec) -> str:
    """SHA-256 of the decoded pixels and labels (not the files: recompressing a .gz keeps the key)."""
    digest = hashlib.sha256(f"judge v{JUDGE_VERSION} {spec}".encode())
    for images, labels in (data.train, data.heldout):
        pixels = images.add(1).mul(127.5).round().to(torch.uint8)
        digest.update(pixels.cpu().numpy().tobytes())
        digest.update(labels.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def epochs_for(spec: JudgeSpec, n_train: int) -> int:
    return max(1, math.ceil(spec.samples / n_train))


def shifted(images: torch.Tensor, most: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``most`` pixels per axis, background filled in.

    The judge then keys on shapes, not on exact positions, and learns more from a small split.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (most, most, most, most), value=-1.0)
    dy, dx = torch.randint(0, 2 * most + 1, (2, n, 1), generator=gen, device=gen.device).to(images.device)
    rows, cols = dy + torch.arange(h, device=images.device), dx + torch.arange(w, device=images.device)
    return padded[torch.arange(n, device=images.device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] \
        .unsqueeze(1)


def _train(spec: JudgeSpec, data: JudgeData, env: DistEnv) -> tuple[JudgeNet, float]:
    """Adam, one-cycle schedule, random shifts; the global batch is ``spec.batch_size`` at any world size.

    The global RNG is left as it was: training G around an evaluation must not change its streams.
    Returns the net and the wall seconds.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(spec.seed)  # identical init on every rank
        net = JudgeNet(spec).to(env.device)
    model = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else net
    batches = ShardedBatches(*data.train, max(1, spec.batch_size // env.world_size), env.rank, env.world_size,
                             derive_seed(spec.seed, 0x1D6E))
    epochs = epochs_for(spec, data.train[1].shape[0])
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=epochs * len(batches),
                                                   pct_start=0.15)
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, env.rank))
    model.train()
    for epoch in range(epochs):
        for images, labels in batches.epoch(epoch):
            loss = F.cross_entropy(model(shifted(images, spec.shift, gen))[1], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval().requires_grad_(False), time.perf_counter() - start


def shard(n: int, env: DistEnv) -> slice:
    """This rank's contiguous share of ``n`` items: gathering in rank order restores the full order."""
    return slice(n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size)


def _accuracy(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, batch: int) -> float:
    """Held-out accuracy, each rank scoring its slice; one all-reduce of the counts."""
    mine = shard(labels.shape[0], env)
    _, logits = Judge(net, {})(images[mine], batch)
    counts = torch.tensor([(logits.argmax(1) == labels[mine]).sum().item(), labels[mine].shape[0]],
                          dtype=torch.float64, device=env.device)
    correct, total = env.all_reduce_sum(counts).tolist()
    return correct / total


def _read(path: Path, spec: JudgeSpec, device: torch.device) -> Judge | None:
    """The cached judge, or None when missing or unreadable (then it is trained again)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        net = JudgeNet(spec).to(device)
        net.load_state_dict(state["net"])
        info = dict(state["info"]) | {"cache": "hit", "path": str(path)}
    except Exception:  # missing, truncated, foreign or stale file: all mean "train it again"
        return None
    return Judge(net.eval().requires_grad_(False), info)


def load_or_train(cfg: DataConfig, judge_dir: str | Path, env: DistEnv, spec: JudgeSpec = DEFAULT_SPEC) -> Judge:
    """The cached judge for this data and recipe, trained and cached first if no rank can read it.

    Every rank calls this. Rank 0 alone writes the cache file, atomically.
    """
    data = judge_data(cfg, env, spec.holdout, spec.seed)
    key = f"{cfg.name}-{data.trained_on}-{content_hash(data, spec)}"
    path = Path(judge_dir).expanduser() / f"{key}.pt"
    judge = _read(path, spec, env.device)
    if not env.any(judge is None):
        return judge
    net, seconds = _train(spec, data, env)
    info = {
        "key": key,
        "trained_on": f"{cfg.name}/{data.trained_on}",
        "n_train": int(data.train[1].shape[0]),
        "n_heldout": int(data.heldout[1].shape[0]),
        "epochs": epochs_for(spec, data.train[1].shape[0]),
        "accuracy": _accuracy(net, *data.heldout, env, spec.batch_size),
        "train_seconds": round(seconds, 1),
        "spec": dataclasses.asdict(spec),
    }
    if env.is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"net": net.state_dict(), "info": info}, path)
        except (OSError, CheckpointError) as e:  # every rank holds the judge: a cache miss next time only
            warnings.warn(f"judge not cached: {e}", stacklevel=1)
    return Judge(net, info | {"cache": "trained", "path": str(path)})
