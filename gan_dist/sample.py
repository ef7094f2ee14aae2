"""Sample a trained GAN: a class grid, arrays to score, and latent and label walks.

    python -m gan_dist.sample --checkpoint runs/mnist_cgan/checkpoints/step_1500.pt --grid grid.png
    python -m gan_dist.sample --checkpoint CKPT --npz samples.npz --n-per-class 1000 --seed 1
    python -m gan_dist.sample --checkpoint CKPT --interpolate walks.png --steps 12 --no-ema

G is rebuilt from the checkpoint alone (its config and the description of its data). Its classes
are K; the rows below are the grid's classes: all K up to 10, else 10 picked evenly from the first
to the last (K = 100: 0, 11, 22, ..., 99). An unconditional G (or K = 1) has 10 rows of distinct
latents instead. The line printed for each output names its rows.

Outputs (any of them, in one call):
  --grid         one row per grid class and --n columns. A column holds the same latent in every row,
                 so rows differ by the label alone; with --n 10 and --seed set to the run's train.seed
                 it is the run's own samples/step_<N>.png again.
  --npz          ``images``: uint8, round((x + 1) * 127.5), the data's own encoding: [K·N, H, W] for
                 one channel, [K·N, H, W, 3] for RGB; ``labels``: int64 [K·N], class-major (all 0 and
                 N images when unconditional). Every image has its own latent, as scoring wants
                 independent samples.
  --interpolate  blocks of --steps columns, split by a gray row:
                 a row per grid class: a straight walk from latent z0 to latent z1;
                 a row per grid class: the spherical (slerp) walk between the same z0 and z1;
                 with K >= 2, latent z0: row k walks the label embedding from the k-th grid class
                 to the next. Without classes only the two latent walks, each row its own z0 and z1.

The checkpoint's tensors are mapped to --device (default cpu), so one saved on GPUs samples anywhere.
G's EMA is used when the checkpoint holds one, unless --no-ema. Each output draws from its own seeded
stream, so the same arguments give the same images, whatever else is asked for in the call.
Exit status: 0 done; 2 bad arguments, an unusable checkpoint or an unwritable output.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from gan_dist import cli
from gan_dist.config import UsageError
from gan_dist.data.classes import GRID_ROWS, class_rows, grid_classes, row_names
from gan_dist.data.pixels import to_pixels
from gan_dist.models.base import label_count
from gan_dist.models.loading import generate, generator_from_checkpoint
from gan_dist.seeds import Stream, latents
from gan_dist.training.samples import SampleWriter, fixed_noise, save_grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] to uint8 [N, H, W] (C = 1) or [N, H, W, 3] (C = 3), the layout image files
    use: the inverse of the loader's ``pixel / 127.5 - 1``."""
    pixels = to_pixels(images).cpu()
    return (pixels[:, 0] if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1)).numpy()


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points at fractions ``t`` [S] of the great-circle arc from z0 to z1, as [S, z_dim].

    A straight line between two Gaussian latents dips to ~0.7 of their norm midway, where the prior
    has almost no mass; the arc keeps the norm, so mid-walk images stay typical.
    """
    omega = torch.acos(torch.cosine_similarity(z0, z1, dim=0).clamp(-1, 1))
    t = t[:, None]
    if torch.sin(omega) < 1e-6:  # (anti)parallel latents: no unique arc
        return torch.lerp(z0, z1, t)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.no_grad()
def generate_from_embeddings(generator: nn.Module, z: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Images for label vectors given directly rather than as class ids, from G in eval mode.

    For this one call G's ``embed`` table is swapped for ``vectors`` (row i read as label i), so G's
    own forward runs unchanged, whatever its architecture.
    """
    rows = torch.arange(len(vectors), device=vectors.device)
    return functional_call(generator, {"embed.weight": vectors}, (z, rows)).float()


def walks(generator: nn.Module, z_dim: int, steps: int, seed: int, device: torch.device,
          classes: Sequence[int]) -> torch.Tensor:
    """The --interpolate images, row-major, laid out as the module docstring says; ``classes`` are the
    grid's (none: unconditional)."""
    t = torch.linspace(0, 1, steps)
    if classes:  # one pair of latents, shared by every class row
        starts, ends = latents(z_dim, 2, seed, Stream.WALK)[:, None]
        labels, repeat = torch.tensor(list(classes)).repeat_interleave(steps), len(classes)
    else:  # a pair per row
        starts, ends = latents(z_dim, 2 * GRID_ROWS, seed, Stream.WALK).view(2, GRID_ROWS, z_dim)
        labels, repeat = torch.zeros(GRID_ROWS * steps, dtype=torch.int64), 1
    labels = labels.to(device)
    line = torch.cat([torch.lerp(a, b, t[:, None]) for a, b in zip(starts, ends, strict=True)]).repeat(repeat, 1)
    arc = torch.cat([slerp(a, b, t) for a, b in zip(starts, ends, strict=True)]).repeat(repeat, 1)
    line, arc = (generate(generator, path.to(device), labels) for path in (line, arc))
    gap = torch.zeros(steps, *line.shape[1:], device=line.device)  # 0 is drawn as the grid's gray padding
    if len(classes) < 2:
        return torch.cat([line, gap, arc])
    table = generator.embed.weight[torch.tensor(list(classes), device=device)]
    vectors = torch.lerp(table[:-1, None], table[1:, None], t[:, None].to(device)).flatten(0, 1)
    labels_walk = generate_from_embeddings(generator, starts[0].to(device).expand(len(vectors), -1), vectors)
    return torch.cat([line, gap, arc, gap, labels_walk])


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or 0 where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_npz_size(n: int, shape: tuple[int, ...], z_dim: int, rows: int, free: int) -> None:
    """``n`` samples must fit in memory: their uint8 pixels, latents and labels (the file is written at once)."""
    per_image = int(np.prod(shape)) + 4 * z_dim + 8
    if free and n * per_image > free:
        fits = free // per_image // rows
        raise UsageError(f"--n-per-class: {n:,} samples of {'×'.join(map(str, shape))} need "
                             f"{n * per_image / 2**30:.1f} GiB in memory, and {free / 2**30:.1f} GiB are free here; "
                             f"ask for at most {fits:,} per class")


def write_npz(path: Path, generator: nn.Module, z: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> None:
    """G's samples as uint8, made a batch at a time (no float copy of them all), written through an open file:
    ``np.savez`` given a name would append ``.npz`` to other suffixes."""
    images = np.concatenate([to_uint8(generate(generator, z[i:i + batch], labels[i:i + batch]))
                             for i in range(0, len(labels), batch)])
    with path.open("wb") as f:
        np.savez_compressed(f, images=images, labels=labels.cpu().numpy())


def image_path(text: str) -> Path:
    """An argparse type: a path whose extension names an image format PIL writes, checked before sampling."""
    suffix = Path(text).suffix
    if Image.registered_extensions().get(suffix.lower()) not in Image.SAVE:
        what = f"PIL writes no {suffix} files" if suffix else "no extension to name the image format"
        raise argparse.ArgumentTypeError(f"{text}: {what}; use .png (or .jpg, .webp, ...)")
    return Path(text)


def parse_device(text: str) -> torch.device:
    """An argparse type: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:I``, checked here."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:I, got {text!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here")
    return dev


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m gan_dist.sample", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                        help="a step_<N>.pt written by gan_dist.train")
    parser.add_argument("--grid", type=image_path, metavar="OUT.png", help="write the class grid")
    parser.add_argument("--n", type=cli.integer(1), default=SampleWriter.COLUMNS,
                        help="grid columns (default %(default)s)")
    parser.add_argument("--npz", type=Path, metavar="OUT.npz", help="write images and labels for scoring")
    parser.add_argument("--n-per-class", type=cli.integer(1), default=1000, metavar="N",
                        help="npz images per class; all of them when unconditional (default %(default)s)")
    parser.add_argument("--interpolate", type=image_path, metavar="OUT.png",
                        help="write latent walks, and label walks when G has 2 or more classes")
    parser.add_argument("--steps", type=cli.integer(2), default=10, help="images per walk (default %(default)s)")
    parser.add_argument("--seed", type=cli.integer(0), default=0, help="latent seed (default %(default)s)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw G, not its saved EMA")
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"),
                        help="auto, cpu, cuda or cuda:I (default cpu)")
    args = parser.parse_args(argv)
    if not (args.grid or args.npz or args.interpolate):
        parser.error("nothing to write: give --grid, --npz and/or --interpolate")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: write(args))


def write(args: argparse.Namespace) -> int:
    """Every output asked for, from G rebuilt out of the checkpoint."""
    generator, cfg, info = generator_from_checkpoint(args.checkpoint, args.device, use_ema=not args.no_ema)
    num_classes = label_count(cfg.model, info)
    classes = grid_classes(num_classes)
    which = "EMA of G" if cfg.ema.enabled and not args.no_ema else "G"
    c, h, w = info.shape
    what = f"{num_classes} classes" if num_classes else "unconditional"
    print(f"sampling the {which} ({cfg.model.arch}, {info.name} {c}×{h}×{w}, {what}) of {args.checkpoint} "
          f"on {args.device}, seed {args.seed}")
    z_dim, rows = cfg.model.z_dim, class_rows(num_classes)
    if args.npz:
        check_npz_size(rows * args.n_per_class, info.shape, z_dim, rows, available_memory())
    try:
        for out in (args.grid, args.npz, args.interpolate):  # fail before the sampling, not after
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
        if args.grid:
            z, labels = fixed_noise(z_dim, args.n, args.seed, args.device, classes)
            print(f"wrote {save_grid(generate(generator, z, labels), args.grid, args.n)}: "
                  f"rows {row_names(info, classes)}")
        if args.npz:
            labels = torch.arange(rows, device=args.device).repeat_interleave(args.n_per_class)
            z = latents(z_dim, len(labels), args.seed, Stream.NPZ).to(args.device)
            write_npz(args.npz, generator, z, labels)
            print(f"wrote {args.npz}: {len(labels)} images, " +
                  (f"{args.n_per_class} per class of {num_classes}" if num_classes else "unconditional"))
        if args.interpolate:
            images = walks(generator, z_dim, args.steps, args.seed, args.device, classes)
            walked = "latent and label walks" if len(classes) >= 2 else "latent walks (no classes to walk)"
            print(f"wrote {save_grid(images, args.interpolate, args.steps)}: {walked}, "
                  f"rows {row_names(info, classes)}")
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return cli.EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
