"""The within-class spread of G over z: near 0 for a G that ignores z (and a warning naming the classes),
near 1 for one that draws as varied images as the data, with the run's state untouched."""

from __future__ import annotations

import numpy as np
import torch
from shapes import info
from torch import nn

from gan_dist.data.cache import Split
from gan_dist.evaluation.diversity import ZSpread

DESCRIBED = info(3, 8, 3)


def real_split(n: int = 300) -> Split:
    """Uniform pixels, three classes: each class spreads as uniform noise does."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    return Split("train", images, np.arange(n) % 3, DESCRIBED)


class ToyG(nn.Module):
    """Uniform-like images; ``uses_z`` false: the same image for every z of a class (a collapsed G)."""

    def __init__(self, uses_z: bool) -> None:
        super().__init__()
        self.uses_z = uses_z
        self.norm = nn.BatchNorm1d(192)
        self.proj = nn.Linear(16, 192)
        self.embed = nn.Embedding(3, 192)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(z)) if self.uses_z else self.embed(labels)
        return torch.erf(h / 2**0.5).view(-1, 3, 8, 8)  # a standard normal made uniform in [-1, 1]


def spread(uses_z: bool, warn: float = 0.2) -> tuple[ZSpread, list[float], ToyG]:
    z_spread = ZSpread(real_split(), 3, 16, seed=0, device=torch.device("cpu"), warn=warn)
    g = ToyG(uses_z).eval()
    return z_spread, z_spread.measure(g), g


def test_a_g_that_varies_like_the_data_scores_near_one_and_is_not_flagged():
    z_spread, ratios, _ = spread(uses_z=True)
    assert all(0.8 < r < 1.2 for r in ratios), ratios
    assert z_spread.check(ratios) is None


def test_a_collapsed_g_scores_zero_and_the_warning_names_its_classes_once():
    z_spread, ratios, _ = spread(uses_z=False)
    assert ratios == [0.0, 0.0, 0.0]
    warning = z_spread.check(ratios)
    assert warning.startswith("warning: G's samples barely change with z (mode collapse) in 3 of 3 classes: 0 (0.00)")
    assert "log.z_spread_warn=0.2" in warning
    assert z_spread.check(ratios) is None  # said once, until the flagged classes change
    assert z_spread.check([0.0, 0.5, 0.5]) is not None


def test_measuring_leaves_the_generator_as_it_was():
    _, _, g = spread(uses_z=True)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    ZSpread(real_split(), 3, 16, seed=0, device=torch.device("cpu"), warn=0.2).measure(g)
    assert not g.training
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())  # running stats untouched
