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
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    holdout: float = 0.2
    """Share of the split held out for the accuracy when the judge must train on the evaluation split."""
    seed: int = 0


class JudgeNet(nn.Module):
    """Two conv blocks (28 → 14 → 7) and a ReLU feature layer; the logits are a linear read-out of it."""

    def __init__(self, spec: JudgeSpec) -> None:
        super().__init__()
        w = spec.width
        self.trunk = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
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


def _train(spec: JudgeSpec, data: JudgeData, env: DistEnv) -> tuple[JudgeNet, float]:
    """Adam with a cosine schedule; the global batch is ``spec.batch_size`` at any world size. Returns seconds."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)  # identical init on every rank
    net = JudgeNet(spec).to(env.device)
    model = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else net
    batches = ShardedBatches(*data.train, max(1, spec.batch_size // env.world_size), env.rank, env.world_size,
                             derive_seed(spec.seed, 0x1D6E))
    steps = spec.epochs * len(batches)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(spec.epochs):
        for images, labels in batches.epoch(epoch):
            loss = F.cross_entropy(model(images)[1], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval().requires_grad_(False), time.perf_counter() - start


def _accuracy(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, batch: int) -> float:
    """Held-out accuracy, each rank scoring its slice; one all-reduce of the counts."""
    mine = torch.tensor_split(torch.arange(labels.shape[0], device=labels.device), env.world_size)[env.rank]
    _, logits = Judge(net, {})(images[mine], batch)
    counts = torch.tensor([(logits.argmax(1) == labels[mine]).sum().item(), mine.numel()],
                          dtype=torch.float64, device=env.device)
    correct, total = env.all_reduce_sum(counts).tolist()
    return correct / total


def _read(path: Path, spec: JudgeSpec, device: torch.device) -> Judge | None:
    """The cached judge, or None when missing or unreadable (then it is trained again)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        net = JudgeNet(spec).to(device)
        net.load_state_dict(state["net"])
    except Exception:  # missing, truncated, foreign or stale file: all mean "train it again"
        return None
    return Judge(net.eval().requires_grad_(False), dict(state["info"]) | {"cache": "hit", "path": str(path)})


def load_or_train(cfg: DataConfig, judge_dir: str | Path, env: DistEnv, spec: JudgeSpec = JudgeSpec()) -> Judge:
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
