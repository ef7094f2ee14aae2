"""A run's quality curve: FID, recall and conditional accuracy against the images seen.

    python -m gan_dist.curve --run runs/folder_small                 # score every kept checkpoint
    python -m gan_dist.curve --run runs/folder_small --logged        # plot what eval.every_steps logged
    torchrun --nproc_per_node=2 -m gan_dist.curve --run RUN eval.reference=train --n-per-class 500

Scoring is ``gan_dist.evaluate``'s, with one judge and one reference for every checkpoint, its EMA G
unless ``--no-ema``; trailing ``key=value`` overrides change the run's config as they do there. It
writes ``curve.json`` (a record per point: step, kimg, the scores, and the floors once), ``curve.md`` (the
table) and ``curve.png`` (the three scores against thousands of images seen, the real-vs-real floor
dashed) beside the run (``--out`` another folder), and logs the points to a W&B run of their own
(named ``<run>-curve``, in the run's group) with the plot. Keep checkpoints for it:
``checkpoint.keep_last`` bounds how many there are.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gan_dist import cli
from gan_dist.checkpoint import load_file, rolling
from gan_dist.config import Config, ConfigError, DatasetInfo, UsageError
from gan_dist.configio import resolve, to_dict
from gan_dist.data.cache import load_split
from gan_dist.data.classes import class_rows
from gan_dist.dist import setup, teardown
from gan_dist.evaluate import check_reference
from gan_dist.evaluation.evaluator import Evaluator, check_features
from gan_dist.evaluation.judge import DEFAULT_SPEC, JudgeSpec
from gan_dist.models.base import label_count
from gan_dist.models.loading import generator_from_state
from gan_dist.training.monitor import start_wandb

PLOTTED = (("fid", "FID ↓"), ("recall", "recall ↑"), ("cond_acc", "conditional accuracy ↑"))


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.Parser(prog="python -m gan_dist.curve", description="A run's quality curve (see the docstring).")
    parser.add_argument("--run", required=True, type=Path, help="the run_dir of a training run")
    parser.add_argument("--logged", action="store_true",
                        help="plot the eval records of the run's metrics.jsonl instead of scoring checkpoints")
    parser.add_argument("--out", type=Path, help="folder for curve.json, curve.md and curve.png (default: --run)")
    parser.add_argument("--n-per-class", type=cli.integer(2), metavar="N", help="samples per class")
    parser.add_argument("--no-ema", action="store_true", help="score the raw generators, not their EMAs")
    parser.add_argument("--no-floors", action="store_true", help="skip the real-vs-real and noise floors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.logged and (args.overrides or args.n_per_class or args.no_ema or args.no_floors):
        parser.error("--logged plots the scores the run logged; scoring options do not apply")
    return args


def pyplot() -> Any:
    """matplotlib's pyplot without a display, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the curve's plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def images_seen(state: dict[str, Any]) -> float:
    """Thousands of images G's batches held up to a checkpoint's step (global batch × steps)."""
    pos = state["position"]
    return pos["step"] * pos["batch_size"] * pos["world_size"] / 1000


def score_checkpoints(args: Any, spec: JudgeSpec) -> tuple[list[dict[str, Any]], dict[str, Any], Config] | None:
    """Every rolling checkpoint of the run scored alike; (points, floors, config) on rank 0, None elsewhere."""
    found = rolling(args.run / "checkpoints")
    if not found:
        raise UsageError(f"{args.run}: no checkpoints/step_*.pt to score (is it a run_dir?)")
    first = load_file(found[0][1])
    _, cfg, trained_on = generator_from_state(first, found[0][1])
    cfg = resolve(to_dict(cfg), args.overrides)
    if args.n_per_class is not None:
        rows = class_rows(label_count(cfg.model, trained_on))
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_samples=rows * args.n_per_class))
    check_features(cfg.eval)
    env = setup(cfg.dist)
    points: list[dict[str, Any]] = []
    try:
        reference = load_split(cfg.data, env, cfg.eval.reference)
        evaluator = Evaluator(cfg, env, spec, reference)
        for step, path in found:
            state = load_file(path, env.device)
            generator, _, info = generator_from_state(state, path, env.device, use_ema=not args.no_ema)
            same_run(path, info, trained_on)
            check_reference(str(path), info, reference, label_count(cfg.model, info))
            scores = evaluator.run(generator)
            points.append({"step": step, "kimg": images_seen(state), "checkpoint": str(path)} | scores)
            if env.is_main:
                print(f"step {step}: " + " ".join(f"{k} {scores[k]:.4g}" for k, _ in PLOTTED if k in scores),
                      flush=True)
        floors = {} if args.no_floors else evaluator.floors()
    finally:
        teardown(env)
    return (points, floors | evaluator.info, cfg) if env.is_main else None


def same_run(path: Path, info: DatasetInfo, first: DatasetInfo) -> None:
    if (info.name, info.shape, info.num_classes) != (first.name, first.shape, first.num_classes):
        raise UsageError(f"{path}: trained on other data than the run's first checkpoint; one run per curve")


def logged_points(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any], Config]:
    """The eval records of ``metrics.jsonl`` (the newest of a replayed step wins), and the run's config."""
    try:
        cfg = resolve(yaml.safe_load((run / "config.yaml").read_text()))
    except OSError as e:
        raise UsageError(f"{run}: cannot read config.yaml ({e.strerror})") from None
    batch = cfg.train.batch_size * _world(run)
    by_step: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if any(k.startswith("eval/") for k in record):
            scores = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
            by_step[record["step"]] = {"step": record["step"], "kimg": record["step"] * batch / 1000} | scores
    if not by_step:
        raise UsageError(f"{run}/metrics.jsonl holds no evaluation: train with eval.every_steps, or score the "
                         "checkpoints (drop --logged)")
    return [by_step[s] for s in sorted(by_step)], {}, cfg


def _world(run: Path) -> int:
    """The world size of the run's newest checkpoint (1 when it has none)."""
    found = rolling(run / "checkpoints")
    return load_file(found[-1][1])["position"]["world_size"] if found else 1


def table(points: list[dict[str, Any]], floors: dict[str, Any]) -> str:
    keys = [k for k in ("fid", "intra_fid", "precision", "recall", "cond_acc") if k in points[0]]
    lines = ["| step | kimg | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    if floors:
        lines.append("| *floor: real vs real* | | " + " | ".join(f"{floors[f'floor_real_{k}']:.4g}" for k in keys)
                     + " |")
    lines += [f"| {p['step']} | {p['kimg']:.1f} | " + " | ".join(f"{p[k]:.4g}" for k in keys) + " |" for p in points]
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], floors: dict[str, Any], title: str, path: Path) -> None:
    plt = pyplot()
    shown = [(k, name) for k, name in PLOTTED if k in points[0]]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    kimg = [p["kimg"] for p in points]
    for ax, (key, name) in zip(axes[0], shown, strict=True):
        ax.plot(kimg, [p[key] for p in points], marker="o", markersize=3)
        if f"floor_real_{key}" in floors:
            ax.axhline(floors[f"floor_real_{key}"], linestyle="--", color="grey", label="real vs real")
            ax.legend(loc="best", fontsize=8)
        ax.set(xlabel="thousands of images seen", title=name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_wandb(cfg: Config, run: Path, points: list[dict[str, Any]], png: Path) -> None:
    """The points as a W&B run of their own beside the training run's: its step axis is the training step."""
    wb = dataclasses.replace(cfg.log.wandb, name=f"{cfg.log.wandb.name or run.name}-curve",
                             group=cfg.log.wandb.group or run.name)
    wandb_run = start_wandb(wb, run, {"curve_of": str(run)}, None)
    if wandb_run is None:
        return
    import wandb

    for p in points:
        wandb_run.log({f"curve/{k}": v for k, v in p.items() if isinstance(v, float)}, step=p["step"])
    wandb_run.log({"curve/plot": wandb.Image(str(png))}, step=points[-1]["step"])
    wandb_run.finish()


def write(points: list[dict[str, Any]], floors: dict[str, Any], cfg: Config, run: Path, out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "curve.json").write_text(json.dumps({"points": points, "floors": floors}, indent=1) + "\n")
        (out / "curve.md").write_text(table(points, floors))
        png = out / "curve.png"
        plot(points, floors, f"{run.name}: {cfg.data.name} {cfg.model.arch}", png)
    except OSError as e:
        raise UsageError(f"cannot write the curve into {out}: {e.strerror or e}") from None
    log_to_wandb(cfg, run, points, png)
    return png


def main(argv: Sequence[str] | None = None, spec: JudgeSpec = DEFAULT_SPEC) -> int:
    args = parse_args(argv)

    def body() -> int:
        pyplot()  # before any scoring: a missing plotter is known up front
        if not args.run.is_dir():
            raise ConfigError(f"--run: {args.run} is not a folder")
        result = logged_points(args.run) if args.logged else score_checkpoints(args, spec)
        if result is not None:
            points, floors, cfg = result
            png = write(points, floors, cfg, args.run, args.out or args.run)
            print(table(points, floors) + f"wrote {png}", flush=True)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
