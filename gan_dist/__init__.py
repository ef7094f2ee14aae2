"""gan_dist: distributed, resumable training of conditional GANs.

Importing the package, or its config, loads no torch: the built-in architectures, losses and datasets
register themselves when a config first looks one up. ``gan_dist.load_generator(path)`` reads an export
of ``python -m gan_dist.export --format safetensors`` (torch is loaded then).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_generator"]


def __getattr__(name: str) -> Any:
    if name == "load_generator":
        from gan_dist.models.export import load_generator

        return load_generator
    raise AttributeError(f"module 'gan_dist' has no attribute {name!r}")
