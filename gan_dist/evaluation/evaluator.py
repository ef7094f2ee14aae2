"""Scores of a generator against a reference split, in the judge's or Inception's feature space: the
``Evaluator`` that the training run's evaluation, ``gan_dist.evaluate`` and ``gan_dist.curve`` share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gan_dist.amp import tf32
from gan_dist.config import Config, ConfigError, DataError, DatasetInfo, EvalConfig
from gan_dist.data.cache import Split, load_split
from gan_dist.data.classes import class_rows
from gan_dist.data.pixels import to_device
from gan_dist.dist import DistEnv, StopPoints
from gan_dist.evaluation import scores as metrics
from gan_dist.evaluation.judge import DEFAULT_SPEC, JudgeSpec, load_or_train
from gan_dist.models.base import label_count
from gan_dist.models.loading import generate
from gan_dist.seeds import Stream, derive_seed

if TYPE_CHECKING:
    from gan_dist.evaluation.inception import Inception


NEIGHBOURS = 3  # k of the precision/recall manifolds, as in Kynkäänniemi et al. 2019


METRICS = ("cond_acc", "fid", "intra_fid", "kid", "kid_std", "precision", "recall")
"""Every metric in the judge's space, as a conditional G gets them."""


CLASS_METRICS = ("cond_acc", "intra_fid")


INCEPTION_METRICS = ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall")
"""Every metric in Inception's space: IS instead of the class metrics, which read the judge's classes."""


def metric_names(num_classes: int, features: str = "judge") -> tuple[str, ...]:
    """The metrics of a G conditioned on ``num_classes`` classes in the ``features`` space: the class
    ones need the judge and two or more classes."""
    if features == "inception":
        return INCEPTION_METRICS
    return METRICS if num_classes >= 2 else tuple(m for m in METRICS if m not in CLASS_METRICS)


def open_inception(cfg: EvalConfig, device: torch.device) -> Inception:
    """``gan_dist.evaluation.inception.Inception`` on ``device`` from ``eval.inception_weights``; a config error when
    torch-fidelity is not installed or the weights file is not its InceptionV3's."""
    try:
        from gan_dist.evaluation import inception
    except ModuleNotFoundError as e:
        if e.name != "torch_fidelity":
            raise
        raise ConfigError("eval.features=inception needs torch-fidelity: pip install -e '.[metrics]'") from None
    return inception.Inception(cfg.inception_weights, device)


@dataclass(frozen=True)
class FeatureSet:
    """Features, logits (the judge's classes, or Inception's for IS) and the (conditioning or true)
    labels of one set of images."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    def __getitem__(self, index: torch.Tensor | slice) -> FeatureSet:
        return FeatureSet(self.features[index], self.logits[index], self.labels[index])


def score(real: FeatureSet, fake: FeatureSet, num_classes: int, features: str = "judge",
          real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """``metric_names(num_classes, features)`` of ``fake`` against ``real``; ``real_radii`` caches the real
    k-NN radii. In Inception's space FID, KID and IS are torch-fidelity's; in the judge's, gan_dist's."""
    precision, recall = metrics.precision_recall(real.features, fake.features, NEIGHBOURS, real_radii)
    scores = {"precision": precision, "recall": recall}
    if features == "inception":
        from gan_dist.evaluation.inception import (
            distances,  # torch-fidelity, the metrics extra: only in Inception's space
        )
        scores |= distances(real.features, fake.features, fake.logits)
    else:
        kid, kid_std = metrics.kid(real.features, fake.features)
        scores |= {"fid": metrics.fid(real.features, fake.features), "kid": kid, "kid_std": kid_std}
        if num_classes >= 2:
            scores["cond_acc"] = metrics.accuracy(fake.logits, fake.labels)
            scores["intra_fid"] = metrics.intra_fid(real.features, real.labels, fake.features, fake.labels,
                                                    num_classes)
    return {k: scores[k] for k in metric_names(num_classes, features)}


def shape_text(channels: int, height: int, width: int) -> str:
    return f"{height}×{width} with {channels} channel{'' if channels == 1 else 's'}"


def eval_labels(reference_counts: np.ndarray, n: int, rule: str) -> torch.Tensor:
    """``n`` labels: as many of each class (``uniform``), or (``data``) 2 of each class for intra-class FID and the
    rest in the reference's proportions, by largest remainders; in a fixed shuffled order, so every rank's
    share mixes the classes."""
    k = len(reference_counts)
    if rule == "uniform" or k == 1:
        return torch.arange(k).repeat(n // k)
    share = reference_counts / reference_counts.sum() * (n - 2 * k)
    counts = np.floor(share).astype(np.int64) + 2
    counts[np.argsort(share - np.floor(share))[::-1][:n - counts.sum()]] += 1
    labels = torch.from_numpy(np.repeat(np.arange(k), counts))
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(Stream.EVAL_LABELS))]


class Evaluator:
    """Scores generators against the reference split, with fixed latents; every method is collective.

    Building it opens Inception (``eval.features=inception``: its weights, before the data loads),
    loads the reference (the ``eval.reference`` split; ``reference`` when the caller has loaded it),
    or else trains or loads the judge, and embeds the reference (Inception's: cached) and its k-NN
    radii once. ``run`` then costs one generation of ``eval.n_samples`` images and their features (split over
    the ranks), and the metrics on the gathered features (on every rank alike: two 10k×10k distance
    passes, KID's 100 subsets and a few 128×128 eigendecompositions per class in the judge's 128 features;
    their cost: docs/QUALITY.md, "Cost during training"). Lower FID and KID are better.
    """

    def __init__(self, cfg: Config, env: DistEnv, spec: JudgeSpec = DEFAULT_SPEC,
                 reference: Split | None = None, stop: StopPoints | None = None) -> None:
        features = cfg.eval.features
        inception = open_inception(cfg.eval, env.device) if features == "inception" else None
        reference = reference if reference is not None else load_split(cfg.data, env, cfg.eval.reference)
        self.data: DatasetInfo = reference.info
        self.num_classes = label_count(cfg.model, self.data)
        self.metrics = metric_names(self.num_classes, features)
        rows = class_rows(self.num_classes)
        n_per_class = cfg.eval.n_samples // rows
        intra = "intra_fid" in self.metrics
        if intra and n_per_class < 2:
            raise ConfigError(f"eval.n_samples: needs at least {2 * self.num_classes} "
                              f"(2 per class of {self.num_classes} for intra-class FID)")
        if n_per_class * rows <= NEIGHBOURS:
            raise ConfigError(f"eval.n_samples: needs at least {NEIGHBOURS + 1} for the k-NN precision/recall")
        if intra:
            counts = np.bincount(reference.labels, minlength=self.num_classes)
            if counts.min() < 4:  # 2 per class in each half of the real-vs-real floor
                raise DataError(f"{self.data.name} {reference.name} split has {counts.min()} image(s) of class "
                                f"{counts.argmin()}; intra-class FID and its floor need 4 or more of every class")
        self.cfg, self.env, self.stop = cfg.eval, env, stop
        with tf32():
            self.space = inception or load_or_train(cfg.data, cfg.eval.judge_dir, env, spec, stop)
            self.real, cache = self._reference(reference)
        self.real_radii = metrics.knn_radii(self.real.features, NEIGHBOURS)
        latents = torch.Generator().manual_seed(cfg.eval.seed)
        self.z = torch.randn(n_per_class * rows, cfg.model.z_dim, generator=latents)
        counts = np.bincount(reference.labels, minlength=rows) if rows > 1 else np.ones(1, np.int64)
        self.labels = eval_labels(counts, n_per_class * rows, cfg.eval.labels)
        self.info: dict[str, Any] = {
            "dataset": cfg.data.name,
            "shape": list(self.data.shape),
            "num_classes": self.data.num_classes,
            "conditioned_on": self.num_classes,
            "features": features,
            "reference": f"{cfg.data.name}/{reference.name}",
            "n_reference": len(reference.labels),
            "reference_is_training_data": cfg.data.split == reference.name,
            "kid_subsets": metrics.KID_SUBSETS,
            "kid_subset_size": metrics.kid_subset_size(len(reference.labels), self.labels.shape[0]),
        } | cache | (self._inception_info() if inception else self._judge_info())

    def _judge_info(self) -> dict[str, Any]:
        return {f"judge_{k}": self.space.info[k] for k in ("trained_on", "task", "accuracy", "key", "cache")}

    def _inception_info(self) -> dict[str, Any]:
        """The protocol beyond the sample count and the reference: what the images become, and the extractor."""
        c, h, w = self.data.shape
        return {"input": "uint8 RGB" if c == 3 else "uint8 RGB: the data's one channel replicated to three",
                "resize": f"torch-fidelity's TensorFlow-1-compatible bilinear resize, {h}×{w} to 299×299",
                **self.space.info}

    def _reference(self, reference: Split) -> tuple[FeatureSet, dict[str, str]]:
        """The reference's features (each rank embeds its share; Inception's are read from or written to the
        cache), and in Inception's space where they came from."""
        labels = to_device(reference.labels, self.env.device)
        mine = self.env.shard(len(labels))

        def embed() -> tuple[torch.Tensor, torch.Tensor]:
            images = reference.images[mine]
            features, logits = self._batches(len(images), len(labels), "the reference's features",
                                             lambda i, n: self.space(to_device(images[i:i + n], self.env.device), n))
            return self.env.all_gather_cat(features), self.env.all_gather_cat(logits)

        if self.cfg.features == "judge":
            return FeatureSet(*embed(), labels), {}
        features, logits, cache = self.space.reference(reference, self.cfg.features_dir, self.env, embed)
        return FeatureSet(features, logits, labels), cache

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def _gather(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """All ranks' features in rank order."""
        gather = self.env.all_gather_cat
        return FeatureSet(gather(features), gather(logits), gather(labels.to(self.env.device)))

    def _embed(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """Features of this rank's images (uint8, or float in [-1, 1]), then all ranks' features in rank order."""
        with tf32():
            features = self.space(images.to(self.env.device), self.cfg.batch_size)
        return self._gather(*features, labels)

    def _agree(self, values: dict[str, float]) -> dict[str, float]:
        """Rank 0's numbers on every rank, by one all-reduce that all enter: all ranks then decide alike."""
        vector = torch.tensor(list(values.values()), dtype=torch.float64, device=self.env.device)
        if not self.env.is_main:
            vector.zero_()
        return dict(zip(values, self.env.all_reduce_sum(vector).tolist(), strict=True))

    def _scores(self, fake: FeatureSet, start: float) -> dict[str, float]:
        """``self.metrics`` of gathered fakes, with their count and rank 0's wall time, equal on every rank."""
        scores = score(self.real, fake, self.num_classes, self.cfg.features, self.real_radii)
        return self._agree(scores | {"n_samples": float(fake.labels.shape[0]),
                                     "seconds": time.perf_counter() - start})

    def run(self, generator: nn.Module) -> dict[str, float]:
        """Scores of ``generator(z, labels)`` (the bare module, not its DDP wrapper) on the fixed latents.

        Each batch is embedded as it is generated, so the fakes never all exist at once. Returns the
        same dict on every rank: ``self.metrics``, ``n_samples`` and ``seconds`` (rank 0's wall time).
        """
        start = time.perf_counter()
        mine, device = self.env.shard(self.labels.shape[0]), self.env.device
        z, labels = self.z[mine].to(device), self.labels[mine].to(device)
        features, logits = self._batches(len(z), len(self.labels), "an evaluation", lambda i, n: self.space(
            generate(generator, z[i:i + n], labels[i:i + n], n), n))
        return self._scores(self._gather(features, logits, labels), start)

    def _batches(self, n: int, total: int, phase: str, embed: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed(start, size)`` over this rank's ``n`` of ``total`` items in batches, with a stop point before
        each: every rank takes the turns the largest share needs (a rank with fewer items embeds nothing in its
        last ones), so that the ranks agree at the same points."""
        b, parts = self.cfg.batch_size, []
        empty = torch.empty(0, *self.data.shape, device=self.env.device)
        with tf32():
            for i in range(0, max(self.env.largest_shard(total), 1), b):
                if self.stop is not None:
                    self.stop(phase)
                parts.append(embed(i, min(b, n - i)) if i < n else self.space(empty, b))
        features, logits = (torch.cat(p) for p in zip(*parts, strict=True))
        return features, logits

    def score_images(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Scores of given samples (uint8 [N, C, H, W], or float in [-1, 1]; every rank holds all of them)."""
        start = time.perf_counter()
        mine = self.env.shard(labels.shape[0])
        return self._scores(self._embed(images[mine], labels[mine]), start)

    def floors(self) -> dict[str, float]:
        """Both ends of the scale, as ``floor_real_*`` and ``floor_noise_*``.

        Real: one seeded half of the reference, taken class by class, scored against the other half,
        with true labels (as good as samples can look, at half the sample size). Noise: uniform pixels
        0..255 with the evaluation labels (what a generator that learned nothing gets).
        """
        order = torch.randperm(self.real.labels.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed))
        order = order[self.real.labels.cpu()[order].argsort(stable=True)]  # by class, random within
        first, second = order[0::2].to(self.env.device), order[1::2].to(self.env.device)
        real = score(self.real[first], self.real[second], self.num_classes, self.cfg.features)
        pixels = torch.Generator().manual_seed(derive_seed(self.cfg.seed, Stream.NOISE_FLOOR))
        mine = self.env.shard(self.labels.shape[0])
        noise_images = torch.randint(0, 256, (self.labels.shape[0], *self.data.shape), generator=pixels,
                                     dtype=torch.uint8)
        noise = score(self.real, self._embed(noise_images[mine], self.labels[mine]), self.num_classes,
                      self.cfg.features, self.real_radii)
        return self._agree({f"floor_real_{k}": real[k] for k in self.metrics}
                           | {f"floor_noise_{k}": noise[k] for k in self.metrics})


def check_features(cfg: EvalConfig) -> None:
    """``eval.features=inception``: torch-fidelity and its weights file, checked before any work, each a config
    error naming its key. The judge needs the data first, and is trained or loaded with the evaluator."""
    if cfg.features == "inception":
        open_inception(cfg, torch.device("cpu"))
