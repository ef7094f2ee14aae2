"""MNIST-format data: decoded once into one tensor, sharded by ``DistributedSampler``.

A split is 47 MB at most, so it lives in memory (on the GPU when training there) scaled to
[-1, 1]; a batch is one index gather, with no per-sample PIL work in the hot loop.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
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


@dataclass(frozen=True)
class DatasetInfo:
    """What the data is, measured from the data itself: every network, metric and grid is built from it.

    It travels in every checkpoint, so sampling and evaluation rebuild G without the data.
    """

    name: str
    """``data.name`` of the source."""
    channels: int
    resolution: int
    num_classes: int
    """0: unconditional (a flat folder: every label is 0)."""
    class_names: tuple[str, ...]
    sizes: dict[str, int]
    """Images per split, e.g. ``{"train": 60000, "test": 10000}``."""
    source: str
    """Where it came from: a folder, a file, or a download."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.resolution, self.resolution

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_dict(self) -> dict:
        """Builtins only: safe for YAML, JSON, W&B and ``torch.load(weights_only=True)``."""
        return dataclasses.asdict(self) | {"class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        return cls(**(dict(d) | {"class_names": tuple(d["class_names"]), "sizes": dict(d["sizes"])}))


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


IDX_KINDS = {"images": (0x803, read_image_file), "labels": (0x801, read_label_file)}
"""Magic number (unsigned bytes, 3 or 1 dimensions) and torchvision's reader of each IDX file."""


def _check_idx(path: Path, plain: Path, kind: str) -> None:
    """The header of ``plain`` (``path`` inflated) against ``kind``, and its size against the header.

    torchvision's readers assume both: a wrong file gets a bare assert or a reshape error from them.
    """
    magic = IDX_KINDS[kind][0]
    with plain.open("rb") as f:
        head = f.read(4)
        found = int.from_bytes(head, "big") if len(head) == 4 else None
        if found != magic:
            other = next((k for k, (m, _) in IDX_KINDS.items() if m == found), None)
            hint = f" (that of an IDX {other} file)" if other else ""
            shown = f"0x{found:08x}" if found is not None else "none (under 4 bytes)"
            raise DataError(f"{path} is not an IDX {kind} file: magic number {shown}{hint}, expected 0x{magic:08x}")
        dims = f.read(4 * (magic & 0xFF))
    shape = [int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4)]
    size, expected = plain.stat().st_size, 4 + len(dims) + math.prod(shape)
    if len(dims) != 4 * (magic & 0xFF) or size != expected:
        raise DataError(f"{path} is cut short or padded: its header says {kind} of shape {shape}, "
                        f"{expected} bytes, the file has {size}")


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    """Checked, then read by torchvision's reader, which takes a plain file: a .gz is inflated first."""
    reader = IDX_KINDS[kind][1]
    try:
        if path.suffix != ".gz":
            _check_idx(path, path, kind)
            return reader(str(path))
        with tempfile.NamedTemporaryFile() as tmp, gzip.open(path, "rb") as src:
            shutil.copyfileobj(src, tmp)
            tmp.flush()
            _check_idx(path, Path(tmp.name), kind)
            return reader(tmp.name)
    except (OSError, EOFError) as e:  # unreadable, or a damaged .gz
        raise DataError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None


def _check_labels(path: Path, labels: torch.Tensor) -> None:
    """Every label a class id: one out of range would otherwise stop training mid-epoch, or never."""
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        values = ", ".join(str(v) for v in labels[bad].unique().tolist()[:10])
        raise DataError(f"{path}: {int(bad.sum())} of {len(labels)} labels are outside 0..{NUM_CLASSES - 1} "
                        f"(values: {values})")


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
    images = _read_idx(files[0], "images")
    labels = _read_idx(files[1], "labels").long()
    _check_labels(files[1], labels)
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
