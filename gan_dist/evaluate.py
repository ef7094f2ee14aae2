"""Score a generator in the judge's feature space: FID, intra-class FID, precision/recall, accuracy.

A checkpoint, on one process or many:
    python -m gan_dist.evaluate --checkpoint runs/mnist_cgan/checkpoints/step_4680.pt
    torchrun --nproc_per_node=4 -m gan_dist.evaluate --checkpoint best.pt --out scores.json
Samples of any generator, as ``gan_dist.sample --npz`` writes them (uint8 images, int64 labels):
    python -m gan_dist.evaluate --npz samples.npz data.name=mnist data.root=data
Trailing ``key=value`` overrides apply to the checkpoint's config (or to the defaults with ``--npz``),
e.g. ``data.root=...`` when the data moved, or ``eval.judge_dir=...``.

The reference is the ``test`` split of the dataset, always; the judge is ``gan_dist.judge``'s.
Each rank generates and embeds its contiguous share of the samples; the features are all-gathered
in rank order, so every rank holds the same features as a single process would, and computes the
same metrics. Prints one JSON line (rank 0). Exit status: 0 done; 2 bad arguments, data or checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from gan_dist import metrics
from gan_dist.checkpoint import CheckpointError, load_generator
from gan_dist.config import Config, ConfigError, load_config, resolve, to_dict
from gan_dist.data import NUM_CLASSES, DataError, load_split
from gan_dist.dist import DistEnv, setup, teardown
from gan_dist.engine import derive_seed
from gan_dist.judge import DEFAULT_SPEC, JudgeSpec, load_or_train, shard
from gan_dist.monitor import generate

K = 3  # neighbours of the precision/recall manifolds, as in Kynkäänniemi et al. 2019
EXIT_USAGE = 2
METRICS = ("cond_acc", "fid", "intra_fid", "precision", "recall")


@dataclass(frozen=True)
class FeatureSet:
    """Judge features, logits and the (conditioning or true) labels of one set of images."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor

    def __getitem__(self, index: torch.Tensor | slice) -> FeatureSet:
        return FeatureSet(self.features[index], self.logits[index], self.labels[index])


def score(real: FeatureSet, fake: FeatureSet, real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """All metrics of ``fake`` against ``real``; ``real_radii`` caches the real k-NN radii."""
    precision, recall = metrics.precision_recall(real.features, fake.features, K, real_radii)
    return {
        "cond_acc": metrics.accuracy(fake.logits, fake.labels),
        "fid": metrics.fid(real.features, fake.features),
        "intra_fid": metrics.intra_fid(real.features, real.labels, fake.features, fake.labels, NUM_CLASSES),
        "precision": precision,
        "recall": recall,
    }


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] in 0..255 (the .npz format) to float32 [N, 1, 28, 28] in [-1, 1], like the data."""
    return torch.as_tensor(images).unsqueeze(1).float().div(127.5).sub(1.0)


class Evaluator:
    """Scores generators against the held-out split, with fixed latents; every method is collective.

    Building it trains or loads the judge, embeds the real reference and its k-NN radii once. ``run``
    then costs one generation of ``eval.n_samples`` images and their features (split over the ranks),
    and the metrics on the gathered features (on every rank alike: two 10k×10k distance passes and a
    few 128×128 eigendecompositions, a few seconds on one CPU core). Lower FID is better.
    """

    def __init__(self, cfg: Config, env: DistEnv, spec: JudgeSpec = DEFAULT_SPEC) -> None:
        n_per_class = cfg.eval.n_samples // NUM_CLASSES
        if n_per_class < 2:
            raise ConfigError(f"eval.n_samples: needs at least {2 * NUM_CLASSES} (2 per class for intra-class FID)")
        self.cfg, self.env = cfg.eval, env
        self.judge = load_or_train(cfg.data, cfg.eval.judge_dir, env, spec)
        reference = dataclasses.replace(cfg.data, split="test")
        images, labels = load_split(reference, env)
        mine = shard(labels.shape[0], env)
        self.real = self._embed(images[mine], labels[mine])
        self.real_radii = metrics.knn_radii(self.real.features, K)
        latents = torch.Generator().manual_seed(cfg.eval.seed)
        self.z = torch.randn(n_per_class * NUM_CLASSES, cfg.model.z_dim, generator=latents)
        self.labels = torch.arange(NUM_CLASSES).repeat(n_per_class)  # 0..9, 0..9: every shard is balanced
        self.info: dict[str, Any] = {
            "dataset": cfg.data.name,
            "reference": f"{cfg.data.name}/test",
            "n_reference": int(labels.shape[0]),
            "reference_is_training_data": cfg.data.split == "test",
            "judge_trained_on": self.judge.info["trained_on"],
            "judge_accuracy": self.judge.info["accuracy"],
            "judge_key": self.judge.info["key"],
            "judge_cache": self.judge.info["cache"],
        }

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def _embed(self, images: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """Features of this rank's images, then all ranks' features in rank order."""
        features, logits = self.judge(images.to(self.env.device), self.cfg.batch_size)
        labels = labels.to(self.env.device)
        gather = self.env.all_gather_cat
        return FeatureSet(gather(features), gather(logits), gather(labels))

    def _agree(self, values: dict[str, float]) -> dict[str, float]:
        """Rank 0's numbers on every rank, by one all-reduce that all enter: all ranks then decide alike."""
        vector = torch.tensor(list(values.values()), dtype=torch.float64, device=self.env.device)
        if not self.env.is_main:
            vector.zero_()
        return dict(zip(values, self.env.all_reduce_sum(vector).tolist(), strict=True))

    def _scores(self, fake: FeatureSet, start: float) -> dict[str, float]:
        """METRICS of gathered fakes, with their count and rank 0's wall time, equal on every rank."""
        scores = score(self.real, fake, self.real_radii)
        return self._agree(scores | {"n_samples": float(fake.labels.shape[0]),
                                     "seconds": time.perf_counter() - start})

    def run(self, generator: nn.Module) -> dict[str, float]:
        """Scores of ``generator(z, labels)`` (the bare module, not its DDP wrapper) on the fixed latents.

        Returns the same dict on every rank: METRICS, ``n_samples`` and ``seconds`` (rank 0's wall time).
        """
        start = time.perf_counter()
        mine = shard(self.labels.shape[0], self.env)
        z, labels = self.z[mine].to(self.env.device), self.labels[mine].to(self.env.device)
        return self._scores(self._embed(generate(generator, z, labels, self.cfg.batch_size), labels), start)

    def score_images(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Scores of given samples (float [N, 1, 28, 28] in [-1, 1]; every rank holds all of them)."""
        start = time.perf_counter()
        mine = shard(labels.shape[0], self.env)
        return self._scores(self._embed(images[mine], labels[mine]), start)

    def floors(self) -> dict[str, float]:
        """Both ends of the scale, as ``floor_real_*`` and ``floor_noise_*``.

        Real: one seeded half of the reference scored against the other, with true labels (as good as
        samples can look, at half the sample size). Noise: uniform pixels in [-1, 1] with the
        evaluation labels (what a generator that learned nothing gets).
        """
        order = torch.randperm(self.real.labels.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed))
        first, second = order.to(self.env.device).chunk(2)
        real = score(self.real[first], self.real[second])
        pixels = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 0x401CE))
        mine = shard(self.labels.shape[0], self.env)
        noise_images = torch.rand(self.labels.shape[0], 1, 28, 28, generator=pixels).mul(2).sub(1)
        noise = score(self.real, self._embed(noise_images[mine], self.labels[mine]), self.real_radii)
        return self._agree({f"floor_real_{k}": real[k] for k in METRICS}
                           | {f"floor_noise_{k}": noise[k] for k in METRICS})


# ---------------------------------------------------------------------------------------------- the CLI


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (it prints the whole usage before them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        if not (text.removeprefix("-").isdecimal() and int(text) >= minimum):
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    return parse


def writable_file(text: str) -> Path:
    """An argparse type: a file whose folder exists and is writable, checked before any work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} is not writable")
    return path


class NpzError(ValueError):
    """An .npz that is not ``images`` uint8 [N, 28, 28] and ``labels`` int [N] with 0..9."""


def read_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and labels from an .npz of another generator, checked before any scoring."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise NpzError(f"{path}: cannot read 'images' and 'labels' ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise NpzError(f"{path}: 'images' must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],):
        raise NpzError(f"{path}: 'labels' must be integers [{images.shape[0]}], got {labels.dtype} {labels.shape}")
    counts = np.bincount(labels, minlength=NUM_CLASSES) if labels.size and labels.min() >= 0 else None
    if counts is None or counts.size != NUM_CLASSES or counts.min() < 2:
        raise NpzError(f"{path}: 'labels' must be in 0..{NUM_CLASSES - 1}, with at least 2 samples per class")
    return to_unit_range(images), torch.from_numpy(labels.astype(np.int64))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m gan_dist.evaluate",
        description="Score a generator: FID, intra-class FID, precision/recall and conditional accuracy "
                    "in the judge classifier's feature space (see the module docstring).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a gan_dist checkpoint (its EMA generator when it has one)")
    source.add_argument("--npz", help="samples of any generator: images uint8 [10N, 28, 28], labels int64 [10N]")
    parser.add_argument("--config", help="with --npz: YAML naming the dataset (else the defaults and overrides)")
    parser.add_argument("--n-per-class", type=integer(2), metavar="N",
                        help="samples per class, 2 or more (default: eval.n_samples / 10)")
    parser.add_argument("--no-ema", action="store_true", help="score the raw generator, not its EMA")
    parser.add_argument("--no-floors", action="store_true", help="skip the real-vs-real and noise floors")
    parser.add_argument("--out", type=writable_file, help="also write the JSON line to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.npz and args.n_per_class is not None:
        parser.error("--n-per-class applies to --checkpoint; an .npz brings its own samples")
    if args.checkpoint and args.config:
        parser.error("--config applies to --npz; a checkpoint brings its own config (override keys instead)")
    model = [o for o in args.overrides if o.partition("=")[0].split(".")[0] == "model"]
    if args.checkpoint and model:
        parser.error(f"{model[0]}: the checkpoint's weights fix its model; model.* overrides cannot apply")
    return args


def evaluate(args: argparse.Namespace, spec: JudgeSpec) -> dict[str, Any] | None:
    """The JSON record of one evaluation on rank 0, None on the other ranks; every rank runs it."""
    if args.checkpoint:
        generator, cfg = load_generator(args.checkpoint, "cpu", use_ema=not args.no_ema)
        cfg = resolve(to_dict(cfg), args.overrides)
        n_samples = NUM_CLASSES * args.n_per_class if args.n_per_class is not None else cfg.eval.n_samples
    else:
        cfg = load_config(args.config, args.overrides)
        images, labels = read_npz(args.npz)
        n_samples = labels.shape[0]  # the noise floor then has as many samples as the file
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_samples=n_samples))
    env = setup(cfg.dist)
    try:
        evaluator = Evaluator(cfg, env, spec)
        scores = evaluator.run(generator.to(env.device)) if args.checkpoint else evaluator.score_images(images, labels)
        floors = {} if args.no_floors else evaluator.floors()
    finally:
        teardown(env)
    if not env.is_main:
        return None
    source = {"source": args.checkpoint or args.npz, "kind": "checkpoint" if args.checkpoint else "npz"}
    return source | evaluator.info | scores | floors | {"world_size": env.world_size}


def main(argv: Sequence[str] | None = None, spec: JudgeSpec = DEFAULT_SPEC) -> int:
    """The CLI. ``spec`` is for callers that need another judge recipe (tests use a tiny one)."""
    args = parse_args(argv)
    try:
        record = evaluate(args, spec)
    except (ConfigError, DataError, CheckpointError, NpzError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if record is not None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
