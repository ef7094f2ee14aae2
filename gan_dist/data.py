"""MNIST-format data: decoded once into one tensor, sharded by ``DistributedSampler``.

A split is 47 MB at most, so it lives in memory (on the GPU when training there) scaled to
[-1, 1]; a batch is one index gather, with no per-sample PIL work in the hot loop.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from gan_dist.config import DataConfig
from gan_dist.dist import DistEnv

DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
NUM_CLASSES = 10


class DataError(RuntimeError):
    """Data that cannot be found or read; entry points turn it into exit status 2."""


def idx_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidates(cfg: DataConfig) -> list[Path]:
    root = Path(cfg.root).expanduser()
    return [root, root / DATASETS[cfg.name].__name__ / "raw"]


def find_files(cfg: DataConfig) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of the split, raw or .gz, in a flat folder or torchvision's layout."""
    for folder in _candidates(cfg):
        found = []
        for stem in idx_names(cfg.split):
            hits = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
            found.append(hits[0] if hits else None)
        if all(found):
            return found[0], found[1]
    return None


def _read_idx(path: Path, reader) -> torch.Tensor:
    """torchvision's reader takes a plain file; a .gz is inflated into a temporary one first."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.NamedTemporaryFile() as tmp, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, tmp)
            tmp.flush()
            return reader(tmp.name)
    # torchvision reports a malformed file with bare asserts, TypeErrors and view RuntimeErrors.
    except (OSError, AssertionError, ValueError, TypeError, EOFError, RuntimeError) as e:
        raise DataError(f"cannot read {path}: {e or type(e).__name__}") from None


def _download(cfg: DataConfig) -> None:
    try:
        DATASETS[cfg.name](str(Path(cfg.root).expanduser()), train=cfg.split == "train", download=True)
    except Exception as e:  # torchvision raises bare RuntimeError/URLError for every network failure
        raise DataError(f"downloading {cfg.name} into {cfg.root} failed: {e}") from None


def load_split(cfg: DataConfig, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 [N, 1, 28, 28] in [-1, 1] and labels as int64 [N], on ``env.device``.

    With ``download``, local rank 0 of each node fetches missing files while the other ranks wait,
    so no two processes ever write the same file.
    """
    if cfg.download and env.local_rank == 0 and find_files(cfg) is None:
        try:
            _download(cfg)
            failed = None
        except DataError as e:
            failed = e
    else:
        failed = None
    if env.any(failed is not None):  # every rank enters: the barrier that orders the download
        raise failed or DataError(f"downloading {cfg.name} failed on another rank")
    files = find_files(cfg)
    if files is None:
        stems = " and ".join(f"{s}[.gz]" for s in idx_names(cfg.split))
        where = " or ".join(str(p) for p in _candidates(cfg))
        raise DataError(f"{cfg.name} {cfg.split} split not found: put {stems} in {where} (or set data.download=true)")
    images = _read_idx(files[0], read_image_file)
    labels = _read_idx(files[1], read_label_file).long()
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DataError(f"{files[0]} and {files[1]}: expected N×28×28 images and N labels, "
                        f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    x = images.to(env.device).unsqueeze(1).float().div_(127.5).sub_(1.0)
    return x.contiguous(), labels.to(env.device)


@dataclass
class ShardedBatches:
    """Per-rank batches of an in-memory split, in ``DistributedSampler`` order.

    The sampler pads the index list so every rank holds the same number of samples; the last
    partial batch is dropped, so every rank runs the same number of steps and no collective can hang.
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    rank: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        self.sampler = DistributedSampler(
            range(len(self.labels)), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed
        )
        if len(self) == 0:
            raise DataError(f"{len(self.labels)} samples over {self.world_size} ranks give no full batch "
                            f"of {self.batch_size}")

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, grouped as [batches, batch_size]."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(self.sampler), dtype=torch.int64)[: len(self) * self.batch_size]
        return idx.view(len(self), self.batch_size).to(self.images.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from batch ``start`` on (a resumed run skips what it already did)."""
        for idx in self.indices(epoch)[start:]:
            yield self.images[idx], self.labels[idx]
