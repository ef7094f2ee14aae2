"""Readers: from a source on disk to uint8 arrays of the configured shape.

Each ``data.name`` has one reader. It knows where its files are (``files``: what the cache key is
made of), whether a split is there, how to download it where that is possible, and how to read it.
Reading converts: every image ends up as uint8 [C, R, R] at ``data.channels`` and
``data.resolution`` (or the source's own), so the cache and the feeders never see another layout.
"""

from __future__ import annotations

import gzip
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from gan_dist.config import DATASETS, DataConfig, DataError, DatasetInfo
from gan_dist.data.files import GREY_MODES, IMAGE_EXTENSIONS, Failed, decode, each, fit, probe
from gan_dist.seeds import Stream

SPLITS = ("train", "test")


@dataclass
class Decoded:
    """A source read and converted: per split, uint8 images [N, C, R, R] and int64 labels [N]."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: tuple[str, ...]
    """Empty for an unconditional source (every label 0)."""
    channels: int
    resolution: int
    skipped: list[str] = field(default_factory=list)
    """``relative/path: reason`` of each unreadable image left out (``data.skip_bad``)."""


class Source:
    """One ``data.name`` rooted at ``data.root``."""

    downloadable = False

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser()

    def has(self, split: str) -> bool:
        """The split's files are on disk."""
        raise NotImplementedError

    def missing(self, split: str) -> DataError:
        """The error for a split that is not on disk: what to put where."""
        raise NotImplementedError

    def download(self, split: str) -> None:
        """Fetch the split (only where ``downloadable``)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """Every file the data is read from: a change to any of them is other data."""
        raise NotImplementedError

    def read(self) -> Decoded:
        """Every split on disk, converted."""
        raise NotImplementedError


# ---- IDX: mnist, fashion_mnist, idx ------------------------------------------------------------

IDX_DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
IDX_CLASSES = 10
IDX_KINDS = {"images": (0x803, read_image_file), "labels": (0x801, read_label_file)}
"""Magic number (unsigned bytes, 3 or 1 dimensions) and torchvision's reader of each IDX file."""


def idx_description(name: str, source: str) -> DatasetInfo:
    """mnist's or fashion_mnist's description at its own shape and official sizes, without reading it
    (KeyError for any other name): what a record that carries no description of its data was made from."""
    classes = tuple(IDX_DATASETS[name].classes)
    return DatasetInfo(name, 1, 28, len(classes), classes, {"train": 60000, "test": 10000}, source)


def idx_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


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


class IdxSource(Source):
    """An MNIST-format pair per split, raw or .gz, flat in root or in torchvision's layout.

    mnist and fashion_mnist are 28×28 with 10 named classes; ``idx`` is any such pair, its classes
    counted from the labels.
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.dataset = IDX_DATASETS.get(cfg.name)
        self.downloadable = self.dataset is not None

    def folders(self) -> list[Path]:
        return [self.root, self.root / self.dataset.__name__ / "raw"] if self.dataset else [self.root]

    def find(self, split: str) -> tuple[Path, Path] | None:
        """The (images, labels) files of the split, the first folder holding both."""
        for folder in self.folders():
            found = []
            for stem in idx_names(split):
                hits = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
                found.append(hits[0] if hits else None)
            if all(found):
                return found[0], found[1]
        return None

    def has(self, split: str) -> bool:
        return self.find(split) is not None

    def missing(self, split: str) -> DataError:
        stems = " and ".join(f"{s}[.gz]" for s in idx_names(split))
        where = " or ".join(str(p) for p in self.folders())
        hint = " (or set data.download=true)" if self.downloadable else ""
        return DataError(f"{self.cfg.name} {split} split not found: put {stems} in {where}{hint}")

    def download(self, split: str) -> None:
        try:
            self.dataset(str(self.root), train=split == "train", download=True)
        except Exception as e:  # torchvision raises bare RuntimeError/URLError for every network failure
            raise DataError(f"downloading {self.cfg.name} into {self.cfg.root} failed: {e}") from None

    def files(self) -> list[Path]:
        return [p for split in SPLITS if (pair := self.find(split)) for p in pair]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N, H, W] and int64 labels [N] of the split, checked."""
        files = self.find(split)
        if files is None:
            raise self.missing(split)
        images = _read_idx(files[0], "images")
        labels = _read_idx(files[1], "labels").long()
        shape = "N×28×28" if self.dataset else "N×H×W"
        if self.dataset:
            # Every label a class id: one out of range would otherwise stop training mid-epoch, or never.
            bad = (labels < 0) | (labels >= IDX_CLASSES)
            if bad.any():
                values = ", ".join(str(v) for v in labels[bad].unique().tolist()[:10])
                raise DataError(f"{files[1]}: {int(bad.sum())} of {len(labels)} labels are outside "
                                f"0..{IDX_CLASSES - 1} (values: {values})")
        if images.shape[0] != labels.shape[0] or (self.dataset and images.shape[1:] != (28, 28)):
            raise DataError(f"{files[0]} and {files[1]}: expected {shape} images and N labels, "
                            f"got {tuple(images.shape)} and {tuple(labels.shape)}")
        return images.numpy(), labels.numpy()

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The named classes of mnist and fashion_mnist; None for ``idx`` (counted from the labels)."""
        return tuple(self.dataset.classes) if self.dataset else None

    def read(self) -> Decoded:
        arrays = {split: self.arrays(split) for split in SPLITS if self.has(split)}
        names = self.class_names
        if names is None:
            names = self._counted_classes(arrays)
        return convert_arrays(self.cfg, arrays, names, str(self.root))

    def _counted_classes(self, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[str, ...]:
        """Classes 0..K-1 from the labels; a gap (one stray label) would build empty classes, so it is refused."""
        seen = np.unique(np.concatenate([labels for _, labels in arrays.values()]))
        if len(seen) and (seen[0] < 0 or len(seen) != seen[-1] + 1):
            shown = ", ".join(str(v) for v in seen[:12]) + (", ..." if len(seen) > 12 else "")
            raise DataError(f"{self.root}: labels must be the class ids 0..K-1 with every class present; they take "
                            f"{len(seen)} values ({shown}), so {int(seen[-1]) + 1 - len(seen)} of the classes "
                            f"0..{int(seen[-1])} would be empty")
        return tuple(str(c) for c in range(len(seen) or 1))


# ---- CIFAR: cifar10, cifar100 ------------------------------------------------------------------

class _PresenceChecked:
    """torchvision's CIFAR reader, checking that the split's batches and the meta file exist.

    torchvision also checks them against the md5 sums of the official files, which a subset or a
    re-packed copy never matches; a damaged file still fails to unpickle or to reshape. Mixed into
    a subclass of ``CIFAR10`` or ``CIFAR100``, whose file lists it reads.
    """

    @classmethod
    def needed(cls, split: str) -> list[str]:
        return [name for name, _ in (cls.train_list if split == "train" else cls.test_list)] + [cls.meta["filename"]]

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in self.needed("train" if self.train else "test"))


class _Cifar10(_PresenceChecked, CIFAR10):
    meta = CIFAR10.meta | {"md5": None}  # _load_meta's check: None checks presence only


class _Cifar100(_PresenceChecked, CIFAR100):
    meta = CIFAR100.meta | {"md5": None}


CIFAR_READERS: dict[str, tuple[type[CIFAR10], type[CIFAR10]]] = {
    "cifar10": (_Cifar10, CIFAR10), "cifar100": (_Cifar100, CIFAR100)}
"""The reader of each CIFAR, and torchvision's own class (which downloads and checks the archive)."""


class CifarSource(Source):
    """CIFAR-10/100's pickled batches in ``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``."""

    downloadable = True

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.reader, self.official = CIFAR_READERS[cfg.name]
        self.folder = self.root / self.reader.base_folder

    def has(self, split: str) -> bool:
        return all((self.folder / name).is_file() for name in self.reader.needed(split))

    def missing(self, split: str) -> DataError:
        return DataError(f"{self.cfg.name} {split} split not found: put {', '.join(self.reader.needed(split))} "
                         f"in {self.folder} (or set data.download=true)")

    def download(self, split: str) -> None:
        try:
            self.official(str(self.root), train=split == "train", download=True)
        except Exception as e:  # bare RuntimeError/URLError for every network or archive failure
            raise DataError(f"downloading {self.cfg.name} into {self.cfg.root} failed: {e}") from None

    def files(self) -> list[Path]:
        names = dict.fromkeys(n for split in SPLITS if self.has(split) for n in self.reader.needed(split))
        return [self.folder / n for n in names]

    def read(self) -> Decoded:
        arrays, names = {}, ()
        for split in SPLITS:
            if not self.has(split):
                continue
            try:
                ds = self.reader(str(self.root), train=split == "train", download=False)
                images, labels = np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
            except Exception as e:  # unpickling raises whatever the damaged bytes lead to
                raise DataError(f"cannot read the {split} batches in {self.folder}: {type(e).__name__}: {e}") from None
            names = tuple(ds.classes)
            if len(images) != len(labels) or (len(labels) and (labels.min() < 0 or labels.max() >= len(names))):
                raise DataError(f"{self.folder}: the {split} batches hold {len(images)} images and {len(labels)} "
                                f"labels, which must be as many and within 0..{len(names) - 1}")
            arrays[split] = images, labels
        return convert_arrays(self.cfg, arrays, names, str(self.folder))


# ---- folder: <root>/<class>/<image>, or a flat folder of images --------------------------------

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _tree(folder: Path) -> tuple[tuple[str, ...], list[list[Path]]]:
    """Class names and each class's image files (sorted; hidden entries left out).

    A folder of images without class folders is one unnamed group: unconditional data.
    """
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found (data.root)")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    classes = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    exts = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
    if classes and loose:
        raise DataError(f"{folder} holds both images ({loose[0].name}) and class folders ({classes[0].name}): "
                        "put every image in a class folder, or use a flat folder for unconditional data")
    if not classes:
        if not loose:
            raise DataError(f"{folder} has no images: expected <class>/<image> or a flat folder of images ({exts})")
        return (), [loose]
    root = folder.resolve()
    for d in classes:
        target = d.resolve()
        if d.is_symlink() and (target == root or root in target.parents or target in root.parents):
            raise DataError(f"class folder {d} is a link to {target}, which holds the data root {folder} or lies in "
                            "it: the class would take other classes' images; remove the link, or link a folder "
                            "outside the data root")
    groups = []
    for d in classes:
        images = sorted(p for p in d.rglob("*") if _is_image(p)
                        and not any(part.startswith(".") for part in p.relative_to(d).parts))
        if not images:
            raise DataError(f"class folder {d} has no images ({exts})")
        groups.append(images)
    return tuple(d.name for d in classes), groups


def _flatten(groups: Sequence[Sequence[Path]]) -> tuple[list[Path], np.ndarray]:
    labels = np.array([label for label, g in enumerate(groups) for _ in g], dtype=np.int64)
    return [p for g in groups for p in g], labels


def _holdout(groups: list[list[Path]], share: float) -> tuple[list[list[Path]], list[list[Path]]]:
    """Per class, a seeded ``share`` of the images (rounded; never all of them) as the test split."""
    rng = np.random.default_rng(int(Stream.HOLDOUT))
    train, test = [], []
    for images in groups:
        k = min(math.floor(len(images) * share + 0.5), len(images) - 1)
        held = set(rng.permutation(len(images))[:k].tolist())
        test.append([p for i, p in enumerate(images) if i in held])
        train.append([p for i, p in enumerate(images) if i not in held])
    return train, test


class FolderSource(Source):
    """``<root>/<class>/<image>`` (torchvision's ImageFolder layout), or a flat folder of images.

    ``<root>/train/`` and ``<root>/test/`` are the splits when both exist; otherwise a seeded
    ``data.holdout`` of each class is the test split.
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self._layout: tuple[tuple[str, ...], dict[str, list[list[Path]]]] | None = None

    def layout(self) -> tuple[tuple[str, ...], dict[str, list[list[Path]]]]:
        """Class names, and per split each class's image files (listed once)."""
        if self._layout is None:
            train, test = self.root / "train", self.root / "test"
            if train.is_dir() or test.is_dir():
                if not (train.is_dir() and test.is_dir()):
                    have, lack = ("train", "test") if train.is_dir() else ("test", "train")
                    raise DataError(f"{self.root} has {have}/ but no {lack}/: give both splits, or neither "
                                    f"(then data.holdout={self.cfg.holdout} of the images is the test split)")
                (names, train_groups), (test_names, test_groups) = _tree(train), _tree(test)
                if names != test_names:
                    only = [f"only in {s}: {', '.join(sorted(set(a) - set(b))) or '-'}"
                            for s, a, b in (("train", names, test_names), ("test", test_names, names))]
                    raise DataError(f"{train} and {test} have different class folders ({'; '.join(only)})")
            else:
                names, groups = _tree(self.root)
                train_groups, test_groups = _holdout(groups, self.cfg.holdout)
            self._layout = names, {"train": train_groups, "test": test_groups}
        return self._layout

    def has(self, split: str) -> bool:
        if not self.root.is_dir():
            return False
        train, test = self.root / "train", self.root / "test"
        return (self.root / split).is_dir() if train.is_dir() or test.is_dir() else True

    def missing(self, split: str) -> DataError:
        self.layout()  # says what is wrong with the folder
        return DataError(f"{self.root} has no {split} split")

    def files(self) -> list[Path]:
        return [p for groups in self.layout()[1].values() for g in groups for p in g]

    def read(self) -> Decoded:
        names, splits = self.layout()
        listed = {split: _flatten(groups) for split, groups in splits.items()}
        bad: dict[Path, str] = {}
        channels, resolution = self.cfg.channels, self.cfg.resolution
        if channels is None or resolution is None:
            paths = [p for files, _ in listed.values() for p in files]
            heads = [head for _, head in self._readable(probe, paths, bad)]
            if not heads:
                raise DataError(f"{self.root} has no readable images")
            if channels is None:
                channels = 3 if any(mode not in GREY_MODES for _, mode in heads) else 1
            if resolution is None:
                resolution = self._common_size({size for size, _ in heads})
        out = {}
        for split, (files, labels) in listed.items():
            images = np.empty((len(files), channels, resolution, resolution), dtype=np.uint8)
            keep = np.zeros(len(files), dtype=bool)
            index = {p: i for i, p in enumerate(files) if p not in bad}
            for path, pixels in self._readable(lambda p: decode(p, resolution, channels), list(index), bad):
                images[index[path]], keep[index[path]] = pixels, True
            out[split] = (images if keep.all() else images[keep]), labels[keep]
        for label, name in enumerate(names):
            if not any((labels == label).any() for _, labels in out.values()):
                raise DataError(f"class folder {name!r} in {self.root} has no readable images")
        if not any(len(labels) for _, labels in out.values()):
            raise DataError(f"{self.root} has no readable images")
        skipped = [f"{p.relative_to(self.root)}: {reason}" for p, reason in bad.items()]
        return Decoded(out, names, channels, resolution, skipped)

    def _readable(self, fn: Callable[[Path], object], paths: list[Path],
                  bad: dict[Path, str]) -> Iterator[tuple[Path, object]]:
        """(path, ``fn(path)``) of each readable file, in order; an unreadable one stops the read, or
        with ``data.skip_bad`` is recorded in ``bad`` and left out."""
        for path, result in zip(paths, each(fn, paths), strict=True):
            if not isinstance(result, Failed):
                yield path, result
            elif self.cfg.skip_bad:
                bad[path] = result.reason
            else:
                raise DataError(f"{path}: cannot read the image ({result.reason}); set data.skip_bad=true to "
                                "skip unreadable images")

    def _common_size(self, sizes: set[tuple[int, int]]) -> int:
        """The images' one square size, the resolution when ``data.resolution`` is not set."""
        shown = ", ".join(f"{w}×{h}" for w, h in sorted(sizes)[:4]) + (", ..." if len(sizes) > 4 else "")
        if len(sizes) != 1:
            raise DataError(f"images in {self.root} come in {len(sizes)} sizes ({shown}): set data.resolution")
        (w, h), = sizes
        if w != h:
            raise DataError(f"images in {self.root} are {w}×{h}, not square: set data.resolution")
        return w


# ---- conversion --------------------------------------------------------------------------------

def convert_arrays(cfg: DataConfig, arrays: dict[str, tuple[np.ndarray, np.ndarray]], names: tuple[str, ...],
                   where: str) -> Decoded:
    """uint8 [N, H, W] or [N, H, W, 3] arrays as [N, C, R, R]: a transpose at the native shape,
    else each image through ``fit``."""
    first = next(iter(arrays.values()))[0]
    native_channels = 1 if first.ndim == 3 else 3
    height, width = first.shape[1:3]
    if cfg.resolution is None and height != width:
        raise DataError(f"images in {where} are {width}×{height}, not square: set data.resolution")
    resolution, channels = cfg.resolution or height, cfg.channels or native_channels
    out = {}
    for split, (images, labels) in arrays.items():
        if (resolution, resolution, channels) == (height, width, native_channels):
            converted = images.reshape(len(images), height, width, channels).transpose(0, 3, 1, 2)
            converted = np.ascontiguousarray(converted)
        else:
            converted = np.stack([fit(Image.fromarray(a), resolution, channels) for a in images]) if len(images) \
                else np.empty((0, channels, resolution, resolution), np.uint8)
        out[split] = converted, labels.astype(np.int64)
    return Decoded(out, names, channels, resolution)


for _name, _source in (("mnist", IdxSource), ("fashion_mnist", IdxSource), ("idx", IdxSource),
                      ("cifar10", CifarSource), ("cifar100", CifarSource), ("folder", FolderSource)):
    DATASETS.register(_name)(_source)
