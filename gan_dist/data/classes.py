"""Which classes a sample grid shows, how they are named, and what a user may not expect of a split's classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gan_dist.config import DatasetInfo

if TYPE_CHECKING:
    from gan_dist.data.cache import Split


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
