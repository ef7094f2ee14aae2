"""Colour Fashion-MNIST: an RGB image folder made from Fashion-MNIST, for ``data.name=folder``.

    python tools/colour_fashion.py --out DIR [--root /usr/share/datasets/fashion-mnist]
                                        [--n-train N] [--n-test N] [--seed 0]

Each 28×28 image (read by gan_dist's own IDX reader, raw or .gz, flat or in torchvision's layout)
is padded with black to 32×32 and coloured with its own random hue (seeded): the grey value is the
V of HSV at a fixed saturation, so the background stays black and the garment takes the hue. The
first ``--n-train`` / ``--n-test`` images of each split (default: all) are written as
``DIR/train/<class>/<i>.png`` and ``DIR/test/<class>/<i>.png``; a ``/`` in a class name becomes ``-``.
Train on it with ``data.name=folder data.root=DIR``; a folder reader wants the same classes in both
splits, so take enough images that every class appears in each (a few hundred do).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gan_dist.config import DataConfig, DataError
from gan_dist.data.sources import IdxSource

SATURATION = 0.85


def colourise(grey: np.ndarray, hues: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] to RGB [N, H, W, 3]: grey as V, ``hues`` [N] in [0, 1) as H, a fixed S."""
    v = grey.astype(np.float32)[..., None] / 255.0
    h = hues.astype(np.float32)[:, None, None, None] * 6.0
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32) + h) % 6.0  # the HSV-to-RGB sectors of R, G and B
    rgb = v - v * SATURATION * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def write_split(source: IdxSource, split: str, n: int | None, rng: np.random.Generator, folder: Path) -> int:
    """Colour the first ``n`` images of ``split`` (all when None) into ``folder/<class>/<i>.png``."""
    names = [name.replace("/", "-") for name in source.class_names]
    grey, labels = source.arrays(split)
    grey, labels = grey[:n], labels[:n]
    images = colourise(np.pad(grey, ((0, 0), (2, 2), (2, 2))), rng.random(len(grey)))
    for label in np.unique(labels):  # a folder for each class present: an empty one is an error to read
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(folder / names[label] / f"{i}.png")
    return len(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder to write (train/ and test/)")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files")
    parser.add_argument("--n-train", type=int, default=None, help="training images to write (default: all)")
    parser.add_argument("--n-test", type=int, default=None, help="test images to write (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the hues")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    source = IdxSource(DataConfig(name="fashion_mnist", root=args.root, download=False))
    rng = np.random.default_rng(args.seed)
    try:
        counts = {split: write_split(source, split, n, rng, args.out / split)
                  for split, n in (("train", args.n_train), ("test", args.n_test))}
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['test']} test images (3×32×32, "
          f"{len(source.class_names)} classes) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
