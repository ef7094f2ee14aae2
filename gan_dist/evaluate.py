"""Score a generator: FID, KID and precision/recall, in the judge's feature space (with intra-class FID
and conditional accuracy for a conditional G) or in Inception's (with IS).

A checkpoint, on one process or many:
    python -m gan_dist.evaluate --checkpoint runs/mnist_cgan/checkpoints/step_4680.pt
    torchrun --nproc_per_node=4 -m gan_dist.evaluate --checkpoint best.pt --out scores.json
Samples of any generator, as ``gan_dist.sample --npz`` writes them (uint8 images [N, H, W] for one
channel or [N, H, W, 3] for RGB, int64 labels [N]):
    python -m gan_dist.evaluate --npz samples.npz data.name=cifar10 data.root=data
Trailing ``key=value`` overrides apply to the checkpoint's config (or to the defaults with ``--npz``),
e.g. ``data.root=...`` when the data moved, or ``eval.judge_dir=...``.

The reference is the ``eval.reference`` split of the dataset (``test`` by default). The feature space
is ``eval.features``: ``judge``, ``gan_dist.evaluation.judge``'s classifier, or ``inception``, torch-fidelity's
InceptionV3 (``gan_dist.evaluation.inception``: the papers' FID, KID and IS), whose weights file is checked
before any work. The class metrics (``cond_acc``, ``intra_fid``) need the judge and a G conditioned
on two or more classes; an unconditional one gets FID, KID and precision/recall. Each rank generates
and embeds its contiguous share of the samples; the features are all-gathered in rank order, so
every rank holds the same features as a single process would, and computes the same metrics. Prints
one JSON line (rank 0).
Exit status: 0 done; 2 bad arguments, data or checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gan_dist import cli
from gan_dist.config import DataError, DatasetInfo, UsageError
from gan_dist.configio import load_config, resolve, to_dict
from gan_dist.data.cache import Split, load_split
from gan_dist.data.classes import class_rows
from gan_dist.dist import setup, teardown
from gan_dist.evaluation.evaluator import NEIGHBOURS, Evaluator, check_features, shape_text
from gan_dist.evaluation.judge import DEFAULT_SPEC, JudgeSpec
from gan_dist.models.base import label_count
from gan_dist.models.loading import generator_from_checkpoint

if TYPE_CHECKING:
    pass


class NpzError(UsageError, ValueError):
    """An .npz that does not fit the dataset: ``images`` uint8 [N, H, W] (1 channel) or [N, H, W, 3] at
    its resolution, and (for a conditional model) ``labels`` int [N] in its classes."""


def read_npz(path: str | Path, info: DatasetInfo, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, H, W] and int64 labels of another generator's samples, checked against the dataset
    before any scoring. ``num_classes`` is what the samples are conditioned on: below 2 the labels are not
    needed (and, if there, not used); every label is then 0."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise NpzError(f"{path}: cannot read it ({e}; a file cut short?)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise NpzError(f"{path}: one array (.npy), not an .npz of named arrays; write it with "
                       "np.savez(path, images=..., labels=...)")
    try:
        with loaded as npz:
            images = npz["images"]
            labels = npz["labels"] if num_classes >= 2 and "labels" in npz.files else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise NpzError(f"{path}: cannot read 'images' ({e}; a file cut short?)") from None
    if images.dtype != np.uint8:
        raise NpzError(f"{path}: 'images' must be uint8 pixels 0..255, got {images.dtype}")
    if images.ndim == 3:
        channels, height, width = 1, *images.shape[1:]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        height, width, channels = images.shape[1:]
    else:
        raise NpzError(f"{path}: 'images' must be [N, H, W] (1 channel) or [N, H, W, 3] (RGB), got shape "
                       f"{images.shape}")
    if (channels, height, width) != info.shape:
        raise NpzError(f"{path}: 'images' are {shape_text(channels, height, width)}, the dataset ({info.name}) "
                       f"is {shape_text(*info.shape)}")
    n = images.shape[0]
    if n <= NEIGHBOURS:
        raise NpzError(f"{path}: {n} images; the k-NN precision/recall needs at least {NEIGHBOURS + 1}")
    pixels = torch.from_numpy(images.reshape(n, height, width, channels)).permute(0, 3, 1, 2).contiguous()
    if num_classes < 2:
        return pixels, torch.zeros(n, dtype=torch.int64)
    if labels is None:
        raise NpzError(f"{path}: no 'labels' (int64 [{n}]) for a model of {num_classes} classes; "
                       "model.conditioning=none scores the images without them")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise NpzError(f"{path}: 'labels' must be integers [{n}], one per image, got {labels.dtype} {labels.shape}")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise NpzError(f"{path}: {int(outside.sum())} of {n} labels are outside 0..{num_classes - 1} (the "
                       f"{num_classes} classes of {info.name}), e.g. {labels[outside][0]}")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < 2:
        raise NpzError(f"{path}: class {counts.argmin()} has {counts.min()} sample(s); intra-class FID needs "
                       f"at least 2 of every class 0..{num_classes - 1}")
    return pixels, torch.from_numpy(labels.astype(np.int64))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(
        prog="python -m gan_dist.evaluate",
        description="Score a generator: FID, KID and precision/recall, in the judge's feature space (with "
                    "intra-class FID and conditional accuracy for a conditional G) or with eval.features=inception "
                    "in Inception's (with IS); see the module docstring.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a gan_dist checkpoint (its EMA generator when it has one)")
    source.add_argument("--npz", help="samples of any generator: images uint8 [N, H, W] (1 channel) or "
                                      "[N, H, W, 3], labels int64 [N] (not needed with model.conditioning=none)")
    parser.add_argument("--config", help="with --npz: YAML naming the dataset (else the defaults and overrides)")
    parser.add_argument("--n-per-class", type=cli.integer(2), metavar="N",
                        help="samples per class, 2 or more; all samples of an unconditional G "
                             "(default: eval.n_samples / classes)")
    parser.add_argument("--no-ema", action="store_true", help="score the raw generator, not its EMA")
    parser.add_argument("--no-floors", action="store_true", help="skip the real-vs-real and noise floors")
    parser.add_argument("--out", type=cli.writable_file, help="also write the JSON line to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.npz and args.n_per_class is not None:
        parser.error("--n-per-class applies to --checkpoint; an .npz brings its own samples")
    if args.checkpoint and args.config:
        parser.error("--config applies to --npz; a checkpoint brings its own config (override keys instead)")
    model = [o for o in args.overrides if o.partition("=")[0].split(".")[0] == "model"]
    if args.checkpoint and model:
        parser.error(f"{model[0]}: the checkpoint's weights fix its model; model.* overrides cannot apply")
    return args


def check_reference(path: str, trained_on: DatasetInfo, reference: Split, num_classes: int) -> None:
    """The reference must be data of the shape (and classes) G was trained to make."""
    info = reference.info
    if trained_on.shape != info.shape or (num_classes and info.num_classes != trained_on.num_classes):
        def show(i: DatasetInfo) -> str:
            return f"{shape_text(*i.shape)} and {i.num_classes} classes"
        raise DataError(f"checkpoint {path}: its G makes {trained_on.name}'s {show(trained_on)}; the reference "
                        f"({info.name} {reference.name} split) has {show(info)}; point data.* at the data it "
                        "was trained on")


def evaluate(args: argparse.Namespace, spec: JudgeSpec) -> dict[str, Any] | None:
    """The JSON record of one evaluation on rank 0, None on the other ranks; every rank runs it."""
    if args.checkpoint:
        generator, cfg, trained_on = generator_from_checkpoint(args.checkpoint, "cpu", use_ema=not args.no_ema)
        cfg = resolve(to_dict(cfg), args.overrides)
        rows = class_rows(label_count(cfg.model, trained_on))
        n_samples = rows * args.n_per_class if args.n_per_class is not None else cfg.eval.n_samples
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_samples=n_samples))
    else:
        cfg = load_config(args.config, args.overrides)
    check_features(cfg.eval)
    env = setup(cfg.dist)
    try:
        reference = load_split(cfg.data, env, cfg.eval.reference)
        if args.checkpoint:
            check_reference(args.checkpoint, trained_on, reference, label_count(cfg.model, trained_on))
        else:
            # Unlabelled data scores unconditionally whatever model.conditioning says: there is no class to ask
            # for; and Inception's scores read no labels.
            if not reference.info.conditional or cfg.eval.features == "inception":
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conditioning="none"))
            classes = label_count(cfg.model, reference.info)
            images, labels = read_npz(args.npz, reference.info, classes)
            # the noise floor then has as many samples as the file
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_samples=labels.shape[0]))
        evaluator = Evaluator(cfg, env, spec, reference)
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

    def body() -> int:
        record = evaluate(args, spec)
        if record is not None:
            line = json.dumps(record)
            print(line, flush=True)
            if args.out:
                args.out.write_text(line + "\n")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
