"""A smaller copy of an image folder's training split, to see how a recipe copes with less data.

    python tools/subset_folder.py --root /data/twemoji --out /data/twemoji_1k --n 1000

Writes ``OUT/train/<class>/`` with a seeded ``n`` of the folder's training images (each class keeps its
share, and at least one image) and ``OUT/test/<class>/`` with all of its test images, as symbolic
links. The test split is the full folder's, so a run on the subset and a run on the whole folder
are scored against the same images by the same judge (evaluate with ``data.root=<the full folder>``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gan_dist.config import DataConfig, DataError
from gan_dist.data.sources import FolderSource

SEED = 20261206


def shares(sizes: Sequence[int], n: int) -> list[int]:
    """Images per class: ``n`` split in proportion to ``sizes`` (largest remainders), at least one each."""
    exact = np.array(sizes, dtype=float) * n / sum(sizes)
    counts = np.maximum(np.floor(exact).astype(int), 1)
    for i in np.argsort(counts - exact)[: max(n - int(counts.sum()), 0)]:
        counts[i] += 1
    for _ in range(int(counts.sum()) - n):  # the classes raised to one image are paid for by the others
        counts[np.argmax(np.where(counts > 1, counts - exact, -np.inf))] -= 1
    return np.minimum(counts, sizes).tolist()


def write_subset(root: Path, out: Path, n: int) -> tuple[int, int]:
    """Link the subset under ``out``; returns (training images, test images) written."""
    names, splits = FolderSource(DataConfig(name="folder", root=str(root))).layout()
    if not names:
        raise DataError(f"{root} has no class folders")
    rng = np.random.default_rng(SEED)
    counts = {"train": 0, "test": 0}
    for name, train, test, k in zip(names, splits["train"], splits["test"],
                                    shares([len(g) for g in splits["train"]], n), strict=True):
        chosen = {"train": [train[i] for i in sorted(rng.permutation(len(train))[:k])], "test": test}
        for split, paths in chosen.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                (folder / path.name).symlink_to(path.resolve())
            counts[split] += len(paths)
    return counts["train"], counts["test"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="a class folder gan_dist reads (data.root)")
    parser.add_argument("--out", required=True, type=Path, help="new folder to write (must not exist)")
    parser.add_argument("--n", required=True, type=int, help="training images to keep")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; name a new folder", file=sys.stderr)
        return 2
    try:
        train, test = write_subset(args.root, args.out, args.n)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {train} training images, {test} test images (links into {args.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
