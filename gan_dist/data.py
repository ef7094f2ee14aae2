"""The data layer: any image source, converted once into a uint8 cache, fed in ``DistributedSampler`` order.

A source (``gan_dist.sources``: IDX, CIFAR, an image folder) is read and converted to
``data.channels`` × ``data.resolution``² once, by local rank 0 of each node, into
``<data.cache_dir>/<name>-<key>/``; every rank then memory-maps it. The key hashes the source's
file listing (paths, sizes, mtimes) and the conversion, so changed data or settings is a new cache.

Two feeders give bit-identical batches: ``ResidentBatches`` keeps the split as one uint8 tensor on
the device (a batch is an index gather), ``StreamedBatches`` reads the memory-mapped cache in
DataLoader workers. Pixels stay uint8 until the batch is on the device, where ``to_unit`` scales them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gan_dist.config import DATASETS, DataConfig, DataError, DatasetInfo
from gan_dist.seeds import Stream

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv
    from gan_dist.sources import Decoded, Source

CACHE_FORMAT = 1
"""Bumped whenever the conversion or the cache layout changes: older caches are then other keys."""


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1], the networks' encoding."""
    return pixels.float().div(127.5).sub(1.0)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] back to uint8 pixels (the inverse of ``to_unit`` on every uint8 value)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---- the classes a grid shows --------------------------------------------------------------

def class_rows(num_classes: int) -> int:
    """Label values a G conditioned on ``num_classes`` takes: its classes, or the one label 0 of an
    unconditional G."""
    return max(num_classes, 1)


GRID_ROWS = 10  # rows of a sample grid: every class up to this many, else an even pick of them


def grid_classes(num_classes: int, rows: int = GRID_ROWS) -> list[int]:
    """The classes a grid shows, one per row: all of them up to ``rows``, else ``rows`` spread evenly
    from the first to the last (100 classes: 0, 11, 22, ..., 99). Below 2 classes none: one label
    tells no rows apart, so the rows hold distinct latents instead."""
    if num_classes < 2:
        return []
    if num_classes <= rows:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (rows - 1)) for i in range(rows)]


def class_notes(split: Split) -> list[str]:
    """What a user may not expect of the split's classes: names that look like numbers but are ordered as text
    (the labels follow it: ``10`` is label 0 before ``2``), and classes of one image (none left for the test split
    when it is held out)."""
    names, notes = split.info.class_names, []
    if names and all(n.isdigit() for n in names) and sorted(names, key=int) != list(names):
        shown = ", ".join(f"{label}={name}" for label, name in enumerate(names[:8])) + ", ..." * (len(names) > 8)
        notes.append(f"labels follow the class folders' names sorted as text, not as numbers: {shown}")
    counts = np.bincount(split.labels, minlength=len(names)) if names else np.array([])
    single = [names[c] for c in np.flatnonzero(counts == 1)]
    if single:
        notes.append(f"{len(single)} class{'es' if len(single) > 1 else ''} of one image (no test image when the "
                     f"test split is held out from it): {', '.join(single[:8])}" + ", ..." * (len(single) > 8))
    return notes


def row_names(info: DatasetInfo, classes: Sequence[int]) -> str:
    """What the rows of a grid are, for captions and messages: ``0 airplane, 11 ..., 99 truck``."""
    def name(c: int) -> str:  # "3 cat"; a name that starts with its number ("3", "3 - three") as it is
        text = info.class_names[c] if c < len(info.class_names) else ""
        return text if text.split(" ")[0] == str(c) else f"{c} {text}".strip()

    return ", ".join(name(c) for c in classes) if classes else "distinct latents per row"


@dataclass
class Split:
    """One split of the cached, converted dataset."""

    name: str
    images: np.ndarray
    """uint8 [N, C, H, W], memory-mapped from the cache."""
    labels: np.ndarray
    """int64 [N]; all 0 for unconditional data."""
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and int64 labels in memory on ``device``."""
        return to_device(self.images, device), to_device(self.labels.astype(np.int64, copy=False), device)


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A copy of ``array`` (a read-only memory map, say) on ``device``, made a chunk at a time, so a large
    split never needs a second full copy on the host."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, device=device)
    step = max(1, 2**28 // max(1, array[:1].nbytes))  # about 256 MiB a chunk
    for i in range(0, len(array), step):
        out[i:i + step] = torch.from_numpy(np.array(array[i:i + step]))
    return out


# ---- the cache ---------------------------------------------------------------------------------

CHECKS = {"names": "names, sizes, mtimes and inode change times", "content": "content hashes"}
"""What ``data.verify`` keys the cache to, as the data line says it."""


def file_entry(path: Path, root: Path, verify: str, skip_bad: bool) -> list:
    """What keys the cache to one file: its name and size, and its content's hash or its two times. The inode's
    change time moves on every rewrite, and no copy that keeps the mtime (cp -p, rsync -a) can set it back. A
    file that cannot be read is an error, or with ``skip_bad`` an entry that says so (decoding then skips it)."""
    name = str(path.relative_to(root))
    try:
        st = path.stat()
        marks = [file_sha256(path)] if verify == "content" else [st.st_mtime_ns, st.st_ctime_ns]
    except OSError as e:
        if skip_bad:
            return [name, f"unreadable: {e.strerror or e}"]
        raise DataError(f"cannot read {path}: {e.strerror or e}; data.skip_bad=true skips unreadable files") from None
    return [name, st.st_size, *marks]


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_source(cfg: DataConfig) -> Source:
    """The reader of ``data.name``, from the registry (``sources`` registers the built-in ones)."""
    return DATASETS[cfg.name](cfg)


def cache_path(cfg: DataConfig, source: Source) -> Path:
    """``<cache_dir>/<name>-<key>``: the key hashes the source's files (relative path, size, and mtime or
    with ``data.verify=content`` a hash of the bytes), its root and everything the conversion depends on."""
    try:
        files = source.files()
    except OSError as e:
        raise DataError(f"cannot list {source.root}: {e}") from None
    listing = [file_entry(p, source.root, cfg.verify, cfg.skip_bad) for p in files]
    recipe = {"format": CACHE_FORMAT, "name": cfg.name, "root": str(source.root.resolve()), "files": listing,
              "resolution": cfg.resolution, "channels": cfg.channels, "holdout": cfg.holdout,
              "skip_bad": cfg.skip_bad}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / f"{cfg.name}-{key}"


def _save(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def build_cache(cfg: DataConfig, source: Source, path: Path) -> None:
    """Read and convert the source, then write it under ``path`` through a temporary sibling renamed
    at the end: a crash leaves no cache at ``path``, and of two builders of one key the first
    rename wins while the other's copy (identical) is dropped."""
    start = time.perf_counter()
    print(f"data: building the cache of {source.root} (a stop signal takes effect once it is built)", flush=True)
    decoded: Decoded = source.read()
    info = DatasetInfo(cfg.name, decoded.channels, decoded.resolution, len(decoded.class_names),
                       decoded.class_names, {s: len(labels) for s, (_, labels) in decoded.splits.items()},
                       str(source.root))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise DataError(f"cannot write the data cache in {path.parent}: {e.strerror or e} (data.cache_dir)") from None
    try:
        for split, (images, labels) in decoded.splits.items():
            _save(tmp / f"{split}_images.npy", images)
            _save(tmp / f"{split}_labels.npy", labels)
        meta = info.to_dict() | {"format": CACHE_FORMAT, "skipped": decoded.skipped}
        (tmp / "info.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(path)
        except OSError:
            if not path.is_dir():
                raise
    except OSError as e:
        raise DataError(f"cannot write the data cache {path}: {e.strerror or e} (data.cache_dir)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when the rename did not happen
    total = sum(info.sizes.values())
    if decoded.skipped:
        shown = "; ".join(decoded.skipped[:3]) + ("; ..." if len(decoded.skipped) > 3 else "")
        print(f"data: skipped {len(decoded.skipped)} unreadable images ({shown})", flush=True)
    print(f"data: built cache {path} ({total} images in {time.perf_counter() - start:.1f} s)", flush=True)


def open_cache(path: Path, split: str) -> Split:
    """The split of a built cache, its images memory-mapped."""
    try:
        meta = json.loads((path / "info.json").read_text())
        info = DatasetInfo.from_dict({f.name: meta[f.name] for f in dataclasses.fields(DatasetInfo)})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"data cache {path} is unreadable ({e}): delete it to rebuild") from None
    if split not in info.sizes:
        raise DataError(f"{info.name} in {info.source} has no {split} split")
    if info.sizes[split] == 0:
        raise DataError(f"the {split} split of {info.name} in {info.source} is empty "
                        "(a folder: raise data.holdout, or add images)")
    try:
        images = np.load(path / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(path / f"{split}_labels.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"data cache {path} is unreadable ({e}): delete it to rebuild") from None
    if images.shape != (info.sizes[split], *info.shape) or labels.shape != (info.sizes[split],):
        raise DataError(f"data cache {path} does not match its info.json: delete it to rebuild")
    return Split(split, images, labels, info)


def _download(cfg: DataConfig, source: Source, split: str) -> None:
    """Fetch the split where it is allowed and missing."""
    if cfg.download and source.downloadable and not source.has(split):
        source.download(split)


def _prepare(cfg: DataConfig, source: Source, split: str) -> Path:
    """Local rank 0: download the split if allowed and still missing (a node's own disk), then build the cache if
    it is not there; returns the cache's path."""
    _download(cfg, source, split)
    if not source.has(split):
        raise source.missing(split)
    path = cache_path(cfg, source)
    if not path.is_dir():
        build_cache(cfg, source, path)
    return path


def load_split(cfg: DataConfig, env: DistEnv, split: str | None = None) -> Split:
    """The split (``data.split`` by default) from the cache, building it first where needed.

    Every rank calls it: global rank 0 downloads first, so nodes that share ``data.root`` never fetch into it at
    once; then local rank 0 of each node downloads what its own disk still lacks and builds the node's cache
    while the other ranks wait in the agreement, so no two processes write the same file; then every rank
    opens it. An error on any rank stops every rank here.
    """
    split = split or cfg.split
    source = open_source(cfg)
    path = None
    # Every rank enters: each agreement is the barrier that orders the steps.
    with env.together(DataError, DataError(f"downloading {cfg.name} failed on rank 0")):
        if env.is_main:
            _download(cfg, source, split)
    with env.together(DataError, DataError(f"preparing {cfg.name} failed on another rank")):
        if env.local_rank == 0:
            path = _prepare(cfg, source, split)
    with env.together(DataError, DataError(f"opening the {cfg.name} cache failed on another rank")):
        result = open_cache(path or cache_path(cfg, source), split)
    return result


def has_split(cfg: DataConfig, split: str) -> bool:
    """The split can be had from what is on disk, without a download."""
    return open_source(cfg).has(split)


# ---- the feeders -------------------------------------------------------------------------------

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
