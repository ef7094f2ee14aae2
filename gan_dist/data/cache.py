"""The data layer: any image source, converted once into a uint8 cache, fed in ``DistributedSampler`` order.

A source (``gan_dist.data.sources``: IDX, CIFAR, an image folder) is read and converted to
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gan_dist.config import DATASETS, DataConfig, DataError, DatasetInfo
from gan_dist.data.pixels import to_device

if TYPE_CHECKING:
    from gan_dist.data.sources import Decoded, Source
    from gan_dist.dist import DistEnv


CACHE_FORMAT = 1
"""Bumped whenever the conversion or the cache layout changes: older caches are then other keys."""


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
