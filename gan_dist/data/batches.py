"""Per-rank batches in ``DistributedSampler`` order: resident on the device, or streamed from the cache.

Two feeders give bit-identical batches: ``ResidentBatches`` keeps the split as one uint8 tensor on
the device (a batch is an index gather), ``StreamedBatches`` reads the memory-mapped cache in
DataLoader workers. Pixels stay uint8 until the batch is on the device, where ``to_unit`` scales them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gan_dist.config import DataConfig, DataError
from gan_dist.data.cache import CHECKS
from gan_dist.data.classes import class_notes
from gan_dist.data.pixels import to_unit
from gan_dist.seeds import Stream

if TYPE_CHECKING:
    from gan_dist.data.cache import Split
    from gan_dist.dist import DistEnv


def _flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] mirrored left to right where ``mask`` [B] is true."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


class ShardedBatches:
    """Per-rank batches in ``DistributedSampler`` order (global rank, common seed, set per epoch).

    The sampler pads the index list so every rank holds the same number of samples; the last
    partial batch is dropped, so every rank runs the same number of steps and no collective can hang.
    A flip is decided per sample index and epoch, so it is the same whichever rank or batch the
    sample lands in.
    """

    mode = "indices"
    """What feeds the batches: the feeders say "resident" or "streamed"; ``str()`` says it for a start-up line."""

    def __str__(self) -> str:
        return self.mode

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int, flip: bool = False) -> None:
        self.size, self.batch_size, self.seed, self.flip = size, batch_size, seed, flip
        self.sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        if len(self) == 0:
            raise DataError(f"{size} samples over {world_size} ranks give no full batch of {batch_size}")

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, grouped as [batches, batch_size] (on the CPU)."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.int64)[: len(self) * self.batch_size]
        return idx.view(len(self), self.batch_size)

    def flips(self, epoch: int) -> torch.Tensor | None:
        """One bit per dataset index for ``epoch`` (None without ``flip``): mirror that sample."""
        if not self.flip:
            return None
        rng = np.random.default_rng([int(Stream.FLIP), self.seed, epoch])
        return torch.from_numpy(rng.integers(0, 2, size=self.size, dtype=np.uint8).astype(bool))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """float32 images in [-1, 1] and int64 labels on the device, from batch ``start`` on (resume)."""
        raise NotImplementedError


class ResidentBatches(ShardedBatches):
    """The whole split as one uint8 tensor on the device: a batch is an index gather."""

    mode = "resident"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int, world_size: int,
                 seed: int, flip: bool = False) -> None:
        super().__init__(len(labels), batch_size, rank, world_size, seed, flip)
        self.images, self.labels = images, labels

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        flips = self.flips(epoch)
        flips = flips.to(device) if flips is not None else None
        for idx in self.indices(epoch)[start:].to(device):
            x = self.images[idx]
            yield to_unit(_flip(x, flips[idx]) if flips is not None else x), self.labels[idx]


class _CachedBatches(Dataset):
    """Batches of a memory-mapped split, fetched by (indices, flips); a worker started by spawn or
    forkserver reopens the memory map from its file instead of receiving a copy of the images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __getstate__(self) -> dict:
        if isinstance(self.images, np.memmap) and self.images.filename:
            return {"path": self.images.filename, "labels": self.labels}
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        if "path" in state:
            state = {"images": np.load(state["path"], mmap_mode="r"), "labels": state["labels"]}
        self.__dict__.update(state)

    def __getitem__(self, item: tuple[np.ndarray, np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, flips = item
        x = torch.from_numpy(self.images[idx])  # a fancy index copies: the result is writable
        return (_flip(x, torch.from_numpy(flips)) if flips is not None else x), torch.from_numpy(self.labels[idx])


class _Plan:
    """The loader's sampler: the (indices, flips) of the epoch's batches, set before each epoch, so
    persistent workers serve every epoch."""

    def __init__(self) -> None:
        self.items: list[tuple[np.ndarray, np.ndarray | None]] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class StreamedBatches(ShardedBatches):
    """The memory-mapped split read by DataLoader workers: the same batches as ``ResidentBatches``,
    for data too large for the device. One epoch iterates at a time."""

    mode = "streamed"

    def __init__(self, split: Split, batch_size: int, rank: int, world_size: int, seed: int, flip: bool = False,
                 *, device: torch.device | str = "cpu", workers: int = 2, prefetch: int = 4) -> None:
        super().__init__(len(split), batch_size, rank, world_size, seed, flip)
        self.device = torch.device(device)
        self.dataset = _CachedBatches(split.images, split.labels)
        self.workers, self.prefetch = workers, prefetch
        self.plan = _Plan()
        self.loader = self._loader()

    def __str__(self) -> str:
        return f"streamed by {self.workers} workers" if self.workers else "streamed in the training process"

    def _loader(self) -> DataLoader:
        # On CUDA the workers start from a fork server: a fork of a process whose CUDA and NCCL threads run
        # may copy their locks held, and hang.
        context = "forkserver" if self.workers > 0 and self.device.type == "cuda" else None
        return DataLoader(self.dataset, batch_size=None, sampler=self.plan, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                          prefetch_factor=self.prefetch if self.workers > 0 else None, multiprocessing_context=context)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        flips = self.flips(epoch)
        flips = flips.numpy() if flips is not None else None
        self.plan.items = [(idx, flips[idx] if flips is not None else None)
                           for idx in self.indices(epoch)[start:].numpy()]
        delivered = 0
        batches = iter(self.loader)
        try:
            for x, y in batches:
                delivered += 1
                yield to_unit(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
        finally:
            if delivered < len(self.plan):  # abandoned midway: the workers still fetch what nobody reads
                del batches
                self.close()

    def close(self) -> None:
        """Stop the workers now (the next epoch starts new ones); dropping the loader shuts them down."""
        self.loader = self._loader()


def loader_workers(cfg: DataConfig, device: torch.device) -> int:
    """``data.workers``, or when unset what suits the device (see its help)."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if device.type == "cpu" else 2


def make_batches(split: Split, cfg: DataConfig, env: DistEnv, batch_size: int, seed: int) -> ShardedBatches:
    """Resident batches when ``data.resident`` says so (auto: the split fits ``resident_max_gb``),
    else streamed ones; this rank's share, per ``env``."""
    resident = cfg.resident == "on" or (cfg.resident == "auto" and split.images.nbytes <= cfg.resident_max_gb * 2**30)
    if resident:
        images, labels = split.tensors(env.device)
        return ResidentBatches(images, labels, batch_size, env.rank, env.world_size, seed, cfg.flip)
    return StreamedBatches(split, batch_size, env.rank, env.world_size, seed, cfg.flip, device=env.device,
                           workers=loader_workers(cfg, env.device), prefetch=cfg.prefetch)


def start_lines(split: Split, batches: ShardedBatches, verify: str, label_classes: int) -> list[str]:
    """What the run's start says of its data: what the networks are built for, how it is fed and keyed, and what
    a user may not expect of its classes."""
    info = split.info
    c, h, w = info.shape
    labels = f"{label_classes} classes" if label_classes else "unconditional"
    line = f"data: {info.name} {split.name} ({info.sizes.get(split.name, '?')} images, {c}×{h}×{w}, {labels}) from " \
           f"{info.source}"
    lines = ["; ".join([line, str(batches), f"cache keyed by {CHECKS[verify]}", *class_notes(split)])]
    if label_classes == 1:
        lines.insert(0, "data: one class: conditioning on it changes nothing; model.conditioning=none trains the "
                        "same data unconditionally")
    return lines
