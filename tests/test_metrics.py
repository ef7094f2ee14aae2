"""The metrics against known answers and against independent float64 NumPy/SciPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan_dist.evaluation import scores as metrics

scipy_linalg = pytest.importorskip("scipy.linalg")
scipy_distance = pytest.importorskip("scipy.spatial.distance")


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with SciPy's sqrtm of the (non-symmetric) product, in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Brute force on full SciPy distance matrices."""
    rr, ff, fr = (scipy_distance.cdist(x, y) for x, y in ((real, real), (fake, fake), (fake, real)))
    real_radii = np.sort(rr, axis=1)[:, k]
    fake_radii = np.sort(ff, axis=1)[:, k]
    precision = (fr <= real_radii[None, :]).any(1).mean()
    recall = (fr <= fake_radii[:, None]).any(0).mean()
    return float(precision), float(recall)


def cloud(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen) / math.sqrt(d)  # correlated features, like a network's
    return torch.randn(n, d, generator=gen) @ mixing * scale


def test_fid_of_a_set_with_itself_is_zero() -> None:
    x = cloud(500, 32, seed=0)
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_scipy_in_float64() -> None:
    a, b = cloud(800, 24, seed=1), cloud(700, 24, seed=2, scale=1.3) + 0.2
    assert metrics.fid(a, b) == pytest.approx(reference_fid(a.double().numpy(), b.double().numpy()), rel=1e-8)


def test_fid_of_a_shift_is_the_squared_shift() -> None:
    """Same covariance, means apart by d: FID is exactly ||d||²."""
    x = cloud(400, 16, seed=3).double()
    shift = torch.full((16,), 0.25, dtype=torch.float64)
    assert metrics.fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fid_grows_with_shift_and_with_noise() -> None:
    x = cloud(1000, 16, seed=4)
    noise = cloud(1000, 16, seed=5)
    shifted = [metrics.fid(x, x + s) for s in (0.1, 0.5, 1.0, 2.0)]
    noised = [metrics.fid(x, x + s * noise) for s in (0.1, 0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted) and shifted[0] > 0
    assert noised == sorted(noised) and noised[0] > 0


def test_near_singular_covariances_give_finite_fid() -> None:
    """Fewer samples than dimensions, a duplicated feature and a dead one: rank-deficient covariances."""
    a, b = cloud(6, 40, seed=6), cloud(7, 40, seed=7)
    a[:, 1] = a[:, 0]
    a[:, 2] = 0.0
    b[:, 2] = 1e-12
    value = metrics.fid(a, b)
    assert math.isfinite(value) and value > 1.0
    # The square root turns round-off eigenvalues of ~1e-16 into ~1e-8 each: still ~0 next to tr C ≈ 40.
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-5)


def test_psd_sqrt_of_round_off_negative_eigenvalues_is_not_nan() -> None:
    v = cloud(5, 5, seed=8).double()
    q, _ = torch.linalg.qr(v)
    matrix = q @ torch.diag(torch.tensor([1.0, 1e-3, 0.0, -1e-17, -1e-15], dtype=torch.float64)) @ q.T
    root = metrics._psd_sqrt(matrix)
    assert not root.isnan().any()
    assert root @ root == pytest.approx(q @ torch.diag(torch.tensor([1.0, 1e-3, 0, 0, 0], dtype=torch.float64)) @ q.T,
                                        abs=1e-12)


def test_intra_fid_is_the_mean_of_per_class_fids() -> None:
    real, fake = cloud(600, 8, seed=9), cloud(600, 8, seed=10) + 0.3
    real_labels, fake_labels = torch.arange(3).repeat(200), torch.arange(3).repeat_interleave(200)
    expected = np.mean([reference_fid(real[real_labels == c].double().numpy(), fake[fake_labels == c].double().numpy())
                        for c in range(3)])
    assert metrics.intra_fid(real, real_labels, fake, fake_labels, 3) == pytest.approx(expected, rel=1e-8)


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_knn_radii_exclude_the_point_itself() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert metrics.knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert metrics.knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_on_a_hand_made_line() -> None:
    """Reals 0..4 (1-NN radius 1 each); fakes 0.5 and 10 (1-NN radius 9.5 each)."""
    real = torch.arange(5.0)[:, None]
    fake = torch.tensor([[0.5], [10.0]])
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_of_identical_and_of_disjoint_clouds() -> None:
    x = cloud(300, 8, seed=11)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_mode_dropping_costs_recall_not_precision() -> None:
    """Two far clusters of reals; the fakes are the first cluster only."""
    a, b = cloud(200, 4, seed=12), cloud(200, 4, seed=13) + 50.0
    precision, recall = metrics.precision_recall(torch.cat([a, b]), a)
    assert precision == 1.0 and recall == 0.5


def test_precision_recall_match_scipy_brute_force() -> None:
    real, fake = cloud(500, 6, seed=14), cloud(450, 6, seed=15, scale=1.5) + 0.5
    expected = reference_precision_recall(real.double().numpy(), fake.double().numpy(), k=3)
    radii = metrics.knn_radii(real.double(), 3)
    assert metrics.precision_recall(real.double(), fake.double(), k=3, real_radii=radii) == pytest.approx(expected)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case where both matter


def test_chunking_does_not_change_precision_recall() -> None:
    real, fake = cloud(300, 5, seed=16), cloud(260, 5, seed=17) + 0.4
    assert metrics.precision_recall(real, fake, chunk=64) == metrics.precision_recall(real, fake)


def test_intra_fid_over_many_classes_names_a_class_too_small() -> None:
    """100 classes, as CIFAR-100 has: the mean of 100 per-class FIDs; a class with one sample is named."""
    real, fake = cloud(1000, 4, seed=18), cloud(1000, 4, seed=19) + 0.1
    labels = torch.arange(100).repeat(10)
    expected = np.mean([reference_fid(real[labels == c].double().numpy(), fake[labels == c].double().numpy())
                        for c in range(100)])
    assert metrics.intra_fid(real, labels, fake, labels, 100) == pytest.approx(expected, rel=1e-6)
    short = labels.clone()
    short[short == 37] = 38
    short[0] = 37  # class 37 keeps one generated sample
    with pytest.raises(ValueError, match="class 37 has 10 real and 1 generated samples"):
        metrics.intra_fid(real, labels, fake, short, 100)
