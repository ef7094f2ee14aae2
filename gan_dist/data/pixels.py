"""Pixels between their stored form (uint8 0..255) and the networks' (float in [-1, 1]), and arrays onto a
device a chunk at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    pass


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1], the networks' encoding."""
    return pixels.float().div(127.5).sub(1.0)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] back to uint8 pixels (the inverse of ``to_unit`` on every uint8 value)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A copy of ``array`` (a read-only memory map, say) on ``device``, made a chunk at a time, so a large
    split never needs a second full copy on the host."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, device=device)
    step = max(1, 2**28 // max(1, array[:1].nbytes))  # about 256 MiB a chunk
    for i in range(0, len(array), step):
        out[i:i + step] = torch.from_numpy(np.array(array[i:i + step]))
    return out
