"""Sample-quality metrics on feature vectors: FID, intra-class FID, KID, k-NN precision/recall, accuracy.

Pure functions of tensors, so they are tested against NumPy/SciPy references and know nothing
about ranks: the evaluator gathers the features first and every rank computes the same numbers.
FID is computed in float64; the k-NN distances in the features' own dtype, chunked so a 10k×10k
distance matrix never exists at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 2048  # default rows of a distance matrix held at once: 2048 × 10k float32 is 80 MB
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020
"""torch-fidelity's KID protocol (its defaults): 100 subsets of 1000, drawn from NumPy's RandomState(2020)."""


@dataclass(frozen=True)
class Stats:
    """Mean and covariance of a feature set, float64: what FID compares."""

    mean: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> Stats:
        """Unbiased (n - 1) covariance, as NumPy's ``cov`` and the reference FID code use."""
        if features.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 samples per set, got {features.shape[0]}")
        x = features.double()
        mean = x.mean(0)
        centred = x - mean
        return cls(mean, centred.T @ centred / (x.shape[0] - 1))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigh; round-off negative eigenvalues become 0, never NaN."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: Stats, b: Stats) -> float:
    """||μa − μb||² + tr Ca + tr Cb − 2 tr (Ca Cb)^½.

    tr (Ca Cb)^½ = tr (Ca^½ Cb Ca^½)^½: the product Ca Cb is not symmetric, its similar form is, so
    its eigenvalues come from eigh and are clamped at 0. A singular covariance (fewer samples than
    dimensions) stays finite, where scipy's ``sqrtm`` of the product can return complex values.
    """
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mean - b.mean
    return float(diff @ diff + a.cov.trace() + b.cov.trace() - 2 * cross)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, D] and [M, D]."""
    return frechet_distance(Stats.of(real), Stats.of(fake))


def intra_fid(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
              num_classes: int) -> float:
    """FID per class 0..num_classes-1 (fakes grouped by their conditioning label), averaged over the classes.

    Every class needs 2 samples in both sets; with many classes a small set misses some, so the
    error names the class.
    """
    total = 0.0
    for c in range(num_classes):
        real_c, fake_c = real[real_labels == c], fake[fake_labels == c]
        if min(real_c.shape[0], fake_c.shape[0]) < 2:
            raise ValueError(f"intra-class FID: class {c} has {real_c.shape[0]} real and {fake_c.shape[0]} "
                             "generated samples; it needs at least 2 of each")
        total += fid(real_c, fake_c)
    return total / num_classes


def kid_subset_size(n_real: int, n_fake: int) -> int:
    """KID's subset size for sets of these sizes: ``KID_SUBSET_SIZE``, or the smaller set when it has fewer."""
    return min(KID_SUBSET_SIZE, n_real, n_fake)


def kid(real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) in any feature space: mean and standard deviation,
    over ``KID_SUBSETS`` random subsets, of the unbiased MMD² under the kernel (x·y / D + 1)³.

    The subsets are drawn as torch-fidelity draws them (fake, then real, each without replacement),
    so on the same features this gives its numbers. The dot products are taken in the features' dtype
    and on their device, the kernel and its sums in float64: MMD² is a small difference of large sums.
    """
    if min(real.shape[0], fake.shape[0]) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {real.shape[0]} and {fake.shape[0]}")
    size = kid_subset_size(real.shape[0], fake.shape[0])
    rng = np.random.RandomState(KID_SEED)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a @ b.T).double() / a.shape[1] + 1) ** 3

    mmds = []
    for _ in range(KID_SUBSETS):
        x = fake[torch.from_numpy(rng.choice(fake.shape[0], size, replace=False)).to(fake.device)]
        y = real[torch.from_numpy(rng.choice(real.shape[0], size, replace=False)).to(real.device)]
        kxx, kyy = kernel(x, x), kernel(y, y)
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        mmds.append(within / (size * (size - 1)) - 2 * kernel(x, y).sum() / size**2)
    values = torch.stack(mmds)
    return float(values.mean()), float(values.std(unbiased=False))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max is the label: for fakes, how often G draws the class it was asked for."""
    return float((logits.argmax(1) == labels).double().mean())


def knn_radii(features: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {features.shape[0]}")
    # The (k+1)-th smallest distance of a row counts the point itself, at distance 0. topk, not
    # kthvalue: the faster of the two on CPU (docs/QUALITY.md, "Cost during training").
    return torch.cat([torch.cdist(rows, features).topk(k + 1, dim=1, largest=False).values[:, k]
                      for rows in features.split(chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, real_radii: torch.Tensor | None = None,
                     chunk: int = CHUNK) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with the k-NN radius. Precision:
    share of fakes inside the real manifold; recall: share of reals inside the fake manifold.
    ``real_radii`` may be passed in when the real set is fixed, to compute them once.
    """
    real_radii = knn_radii(real, k, chunk) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k, chunk)
    inside_real = []
    covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for rows, radii in zip(fake.split(chunk), fake_radii.split(chunk), strict=True):
        dist = torch.cdist(rows, real)  # [chunk of fakes, reals], used both ways
        inside_real.append((dist <= real_radii[None, :]).any(1))
        covered |= (dist <= radii[:, None]).any(0)
    precision = torch.cat(inside_real).double().mean()
    return float(precision), float(covered.double().mean())


@torch.no_grad()
def in_batches(net: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor,
               batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature net's features and logits of ``images``, ``batch`` at a time, so a uint8 set never exists
    converted at once; ``net`` converts its batch. A rank with no images still gets [0, F] and [0, outputs]."""
    parts = [net(images[i:i + batch]) for i in range(0, images.shape[0], batch)] or [net(images)]
    return torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts])
