"""Image files to uint8 arrays: one image fitted to the configured shape, and many read on threads.

PIL and numpy only: no torch, and nothing of gan_dist. ``sources`` reads whole datasets with it; an
image it cannot read is reported per file (``Failed``), and ``sources`` decides what that means.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""PIL modes without colour; any other mode (P included: its palette is RGB) counts as colour."""


def fit(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """One image as uint8 [C, R, R]: transparency composited on black, then the centre square
    (the shorter side) resized to R with an antialiasing filter, then converted to L or RGB."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        img = _from_16_bit(img)
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                         box=(left, top, left + side, top + side), reducing_gap=3.0)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _from_16_bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG's I;16, or I holding such values) scaled to 8 bits: PIL's convert clips it."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{img.mode} pixels span {values.min()}..{values.max()}: not 16-bit greyscale")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def probe(path: Path) -> tuple[tuple[int, int], str]:
    """Size and mode from the file's header, without decoding it."""
    with Image.open(path) as img:
        return img.size, img.mode


def decode(path: Path, resolution: int, channels: int) -> np.ndarray:
    """The file decoded and put through ``fit``."""
    with Image.open(path) as img:
        img.load()
        return fit(img, resolution, channels)


@dataclass
class Failed:
    """What ``each`` gives for a file that could not be read."""

    reason: str


def each(fn: Callable[[Path], object], paths: list[Path], chunk: int = 1024) -> Iterator[object]:
    """``fn`` on each path, in order, on a few threads (PIL decodes and resizes without the GIL), a
    chunk at a time; a file that fails gives ``Failed`` with its error instead of a result."""

    def attempt(path: Path) -> object:
        try:
            return fn(path)
        except Exception as e:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError...)
            return Failed(f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(attempt, paths[start:start + chunk])
