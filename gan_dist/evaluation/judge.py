"""The judge: a small CNN whose penultimate layer is the default feature space of every metric.

Inception (``eval.features=inception``, ``gan_dist.evaluation.inception``) sees 299×299 photos and needs its
weights file; a judge trained here on the real training split sees what matters in this data, at its
own channels and resolution. It is built from the data's description (strided conv stages from the
resolution down to 8 or less) and trained once per dataset, cached under
``<judge_dir>/<name>-<split>-<hash>.pt``, where the hash covers the uint8 pixels and labels it was
trained and tested on, the image shape, its task and its recipe: other data, or another recipe, is
another file.

Its task: the data's classes when there are two or more. Without classes (a flat folder, or a
single class) there is nothing to tell apart, so it learns a self-supervised proxy instead: which of
four rotations (0, 90, 180, 270 degrees) an image was given. Telling an upright image from a turned
one takes its shapes, so the features still see the images' structure.

Which data: the ``train`` split when it can be had, and its accuracy is measured on ``test``.
Without a training split (only MNIST's 10k test digits on some machines) it trains on a seeded
share of ``test`` and reports accuracy on the rest.

All ranks train it together (DDP, the global batch split over ranks), or all load it: never one
rank alone while the others wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.checkpoint import CheckpointError, atomic_save
from gan_dist.config import DataConfig, DatasetInfo
from gan_dist.data.batches import ResidentBatches
from gan_dist.data.cache import has_split, load_split, open_source
from gan_dist.data.pixels import to_device, to_unit
from gan_dist.evaluation.scores import in_batches
from gan_dist.seeds import Stream, derive_seed

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv, StopPoints

JUDGE_VERSION = 2  # bump when JudgeNet or the training loop changes: old caches then stop matching
ROTATIONS = 4  # the proxy task's classes: 0, 90, 180 and 270 degrees
SMALLEST = 8  # the conv stages halve the resolution until it is at most this


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


def judge_task(info: DatasetInfo) -> str:
    """``classes`` when the data has two or more, else ``rotation`` (see the module docstring)."""
    return "classes" if info.num_classes >= 2 else "rotation"


def judge_stages(resolution: int) -> int:
    """Stride-2 stages from ``resolution`` down to ``SMALLEST`` or less (28 → 14 → 7: 2; 64 → 8: 3); at least 1."""
    stages, size = 1, (resolution + 1) // 2
    while size > SMALLEST:
        stages, size = stages + 1, (size + 1) // 2
    return stages


class JudgeNet(nn.Module):
    """Strided conv stages (a 5×5 one, then 3×3 ones doubling the width) and a ReLU feature layer;
    the logits, one per class of the task, read it out linearly.

    Strides instead of pooling keep a training step cheap on a CPU (1.5 MMAC per 28×28 image).
    """

    def __init__(self, spec: JudgeSpec, info: DatasetInfo) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = info.channels, info.resolution
        for stage in range(judge_stages(info.resolution)):
            width, kernel = spec.width * 2 ** stage, 5 if stage == 0 else 3
            layers += [nn.Conv2d(channels, width, kernel, stride=2, padding=kernel // 2), nn.ReLU()]
            channels, size = width, (size + 1) // 2
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, spec.features), nn.ReLU())
        outputs = info.num_classes if judge_task(info) == "classes" else ROTATIONS
        self.head = nn.Linear(spec.features, outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return features, self.head(features)


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (the data's own form) to float32 in [-1, 1]; float images pass through as float32."""
    return to_unit(images) if images.dtype == torch.uint8 else images.float()


@dataclass
class Judge:
    """A trained judge in eval mode, with what is known about it (task, accuracy, data, cache file)."""

    net: JudgeNet
    info: dict[str, Any]

    def __call__(self, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, F] and logits [N, outputs] in float32 of uint8 images, or float ones in [-1, 1]."""
        return in_batches(lambda x: self.net(as_unit(x)), images, batch)


@dataclass(frozen=True)
class JudgeData:
    """Training and held-out uint8 images [N, C, H, W] and int64 labels, on the CPU, and what they are."""

    trained_on: str
    train: tuple[np.ndarray, np.ndarray]
    heldout: tuple[np.ndarray, np.ndarray]
    info: DatasetInfo


def judge_data(cfg: DataConfig, env: DistEnv, holdout: float, seed: int) -> JudgeData:
    """The training split when it can be had, else a seeded split of ``test`` (see the module docstring)."""
    test = load_split(cfg, env, "test")
    if has_split(cfg, "train") or (cfg.download and open_source(cfg).downloadable):
        train = load_split(cfg, env, "train")
        return JudgeData("train", (train.images, train.labels), (test.images, test.labels), test.info)
    order = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(seed)).numpy()
    n_held = round(holdout * order.shape[0])
    held, kept = order[:n_held], order[n_held:]
    return JudgeData("test", (test.images[kept], test.labels[kept]), (test.images[held], test.labels[held]),
                     test.info)


def content_hash(data: JudgeData, spec: JudgeSpec) -> str:
    """SHA-256 of the uint8 pixels and labels (not the files: recompressing a .gz keeps the key), the shape,
    the task and the recipe."""
    task, shape = judge_task(data.info), "×".join(map(str, data.info.shape))
    digest = hashlib.sha256(f"judge v{JUDGE_VERSION} {spec} task={task} shape={shape}".encode())
    for images, labels in (data.train, data.heldout):
        digest.update(np.ascontiguousarray(images, dtype=np.uint8))
        digest.update(np.ascontiguousarray(labels, dtype=np.int64))
    return digest.hexdigest()[:16]


def batch_per_rank(spec: JudgeSpec, n_train: int, world_size: int) -> int:
    """The recipe's global batch split over the ranks, or a smaller one where a small split has fewer images."""
    return max(1, min(spec.batch_size // world_size, n_train // world_size))


def epochs_for(spec: JudgeSpec, n_train: int, batch: int | None = None) -> int:
    """Epochs of ``spec.samples`` images seen; at a global ``batch`` below the recipe's (a split too small for it),
    as many steps as the recipe's batch would take, not as many images."""
    return max(1, math.ceil(spec.samples / n_train * (batch or spec.batch_size) / spec.batch_size))


def shifted(images: torch.Tensor, most: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to ``most`` pixels per axis, background filled in.

    The judge then keys on shapes, not on exact positions, and learns more from a small split.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (most, most, most, most), value=-1.0)
    dy, dx = torch.randint(0, 2 * most + 1, (2, n, 1), generator=gen, device=gen.device).to(images.device)
    rows, cols = dy + torch.arange(h, device=images.device), dx + torch.arange(w, device=images.device)
    flat = (rows[:, :, None] * (w + 2 * most) + cols[:, None, :]).view(n, 1, h * w).expand(-1, c, -1)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


def turned(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Image i rotated by ``turns[i]`` quarter turns (0..3), all in one pass with no host sync."""
    out = images
    for k in range(1, ROTATIONS):
        out = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(images, k, (2, 3)), out)
    return out


def _train(spec: JudgeSpec, data: JudgeData, env: DistEnv, stop: StopPoints | None) -> tuple[JudgeNet, float]:
    """Adam, one-cycle schedule, random shifts; the global batch is ``spec.batch_size`` at any world size.

    The split stays uint8 on the device and each batch is converted there. The rotation task turns
    each image by a random quarter turn, its target. The global RNG is left as it was: training G
    around an evaluation must not change its streams. Returns the net and the wall seconds.
    """
    start = time.perf_counter()
    rotation = judge_task(data.info) == "rotation"
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(spec.seed)  # identical init on every rank
        net = JudgeNet(spec, data.info).to(env.device)
    model = DDP(net, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else net
    images, labels = (to_device(a, env.device) for a in data.train)
    per_rank = batch_per_rank(spec, len(labels), env.world_size)
    batches = ResidentBatches(images, labels, per_rank, env.rank, env.world_size,
                              derive_seed(spec.seed, Stream.JUDGE_ORDER))
    epochs = epochs_for(spec, len(labels), per_rank * env.world_size)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=epochs * len(batches),
                                                   pct_start=0.15)
    gen = torch.Generator().manual_seed(derive_seed(spec.seed, env.rank))
    model.train()
    for epoch in range(epochs):
        for x, targets in batches.epoch(epoch):
            if stop is not None:
                stop("the judge's training")
            x = shifted(x, spec.shift, gen)
            if rotation:
                targets = torch.randint(0, ROTATIONS, (x.shape[0],), generator=gen).to(x.device)
                x = turned(x, targets)
            loss = F.cross_entropy(model(x)[1], targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval().requires_grad_(False), time.perf_counter() - start


def _accuracy(net: JudgeNet, data: JudgeData, env: DistEnv, batch: int) -> float:
    """Held-out accuracy, each rank scoring its slice; one all-reduce of the counts.

    The rotation task turns held-out image i by i mod 4 quarter turns: the same test on every run.
    """
    images, labels = data.heldout
    mine = env.shard(len(labels))
    images, targets = to_device(images[mine], env.device), to_device(labels[mine], env.device)
    if judge_task(data.info) == "rotation":
        targets = torch.arange(len(labels), device=env.device)[mine] % ROTATIONS
        images = turned(images, targets)
    _, logits = Judge(net, {})(images, batch)
    counts = torch.tensor([(logits.argmax(1) == targets).sum().item(), targets.shape[0]],
                          dtype=torch.float64, device=env.device)
    correct, total = env.all_reduce_sum(counts).tolist()
    return correct / total


def _read(path: Path, spec: JudgeSpec, info: DatasetInfo, device: torch.device) -> Judge | None:
    """The cached judge, or None when missing or unreadable (then it is trained again)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        net = JudgeNet(spec, info).to(device)
        net.load_state_dict(state["net"])
        info = dict(state["info"]) | {"cache": "hit", "path": str(path)}
    except Exception:  # missing, truncated, foreign or stale file: all mean "train it again"
        return None
    return Judge(net.eval().requires_grad_(False), info)


def load_or_train(cfg: DataConfig, judge_dir: str | Path, env: DistEnv, spec: JudgeSpec = DEFAULT_SPEC,
                  stop: StopPoints | None = None) -> Judge:
    """The cached judge for this data and recipe, trained and cached first if no rank can read it; ``stop``
    cuts the training short on a signal.

    Every rank calls this. Rank 0 alone writes the cache file, atomically.
    """
    data = judge_data(cfg, env, spec.holdout, spec.seed)
    key = f"{cfg.name}-{data.trained_on}-{content_hash(data, spec)}"
    path = Path(judge_dir).expanduser() / f"{key}.pt"
    judge = _read(path, spec, data.info, env.device)
    if not env.any(judge is None):
        return judge
    if env.is_main:
        print(f"judge: none cached for this data and recipe; training one on {len(data.train[1])} images "
              f"({spec.samples:,} seen), to be cached as {path}", file=sys.stderr, flush=True)  # stdout: results
    net, seconds = _train(spec, data, env, stop)
    n_train = len(data.train[1])
    info = {
        "key": key,
        "trained_on": f"{cfg.name}/{data.trained_on}",
        "task": judge_task(data.info),
        "shape": list(data.info.shape),
        "n_train": n_train,
        "n_heldout": len(data.heldout[1]),
        "epochs": epochs_for(spec, n_train, batch_per_rank(spec, n_train, env.world_size) * env.world_size),
        "accuracy": _accuracy(net, data, env, spec.batch_size),
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
