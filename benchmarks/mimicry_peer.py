"""Mimicry's cGAN-PD (SNGAN with a projection D, ``torch-mimicry``) on an image folder: a peer for gan_dist.

Runs in its own venv, not gan_dist's: of gan_dist it imports only ``gan_dist.data.files`` (numpy and PIL), so that
it reads every image exactly as gan_dist does::

    python3 -m venv /opt/mimicry-venv
    /opt/mimicry-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /opt/mimicry-venv/bin/pip install torch-mimicry tensorboard   # pulls tensorflow; its Trainer needs tensorboard

Then, on a folder with ``train/<class>/<image>`` and ``test/<class>/<image>`` (the split gan_dist
trains on; for a folder without them, ``python tools/subset_folder.py --root DIR --out SPLIT
--n 1000000000`` links all of gan_dist's training images and its seeded test hold-out)::

    OMP_NUM_THREADS=4 /opt/mimicry-venv/bin/python benchmarks/mimicry_peer.py --root SPLIT \\
        --steps 100000 --threads 4 --log-dir runs/mimicry --out runs/mimicry/samples.npz
    python -m gan_dist.evaluate --npz runs/mimicry/samples.npz data.name=folder data.root=SPLIT \\
        data.resolution=32 data.channels=3

It trains Mimicry's ``CGANPDGenerator32``/``CGANPDDiscriminator32`` with Mimicry's own ``Trainer`` as
its CIFAR-10 baseline ships: hinge loss, 5 D steps per G step, batch 64, Adam 2e-4 with betas
(0.0, 0.9), the learning rates decayed linearly to 0 over ``--steps`` G steps. Images are read as
gan_dist reads a folder (classes are the class folders sorted by name; ``gan_dist.data.files.decode``) and
scaled to [-1, 1]. It prints the measured
seconds per G step (5 D steps and 1 G step) and writes ``--out``: ``images`` uint8 [N, 32, 32, 3]
and ``labels`` int64 [N] from the final G in eval mode: ``--n-per-class`` times the classes, their labels in the
training split's proportions (``--labels uniform``: as many of each).

Stopping (Ctrl-C or SIGTERM) saves Mimicry's checkpoints in ``--log-dir`` and writes no samples; the
same command resumes from the latest one (Mimicry's Trainer refuses a changed ``--steps``,
``--save-every`` or ``--log-dir``). Mimicry's TensorBoard logs and image grids go there too.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import statistics
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gan_dist.data.files from this checkout, not installed
from gan_dist.data.files import decode  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # gan_dist's, case-insensitive
RESOLUTION = 32
BATCH, N_DIS, LR, BETAS = 64, 5, 2e-4, (0.0, 0.9)


def import_mimicry() -> Any:
    """``torch_mimicry``, made importable on torch 2.14 (see the shims below)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorflow is imported but never used
    # Shim 1: torchvision, and with it torch._dynamo and triton, loaded before tensorflow: Mimicry's logger
    # imports torch.utils.tensorboard, which imports tensorflow when it is installed, and triton's native
    # library then segfaults when torchvision.models (imported by torchvision.utils) loads it after TF.
    import torchvision  # noqa: F401
    # Shim 2: torch._six (gone since torch 2.0), imported by Mimicry's ImageNet helpers at import time.
    if "torch._six" not in sys.modules:
        six = types.ModuleType("torch._six")
        six.PY3, six.string_classes, six.int_classes, six.inf = True, (str, bytes), int, math.inf  # type: ignore[attr-defined]
        sys.modules["torch._six"] = torch._six = six  # type: ignore[attr-defined]
    import torch_mimicry

    return torch_mimicry


def class_folders(split: Path) -> list[Path]:
    """The class folders of a split, sorted by name (hidden ones left out), as gan_dist lists them."""
    entries = sorted(p for p in split.iterdir() if not p.name.startswith("."))
    if any(p.is_file() and p.suffix.lower() in EXTENSIONS for p in entries):
        sys.exit(f"{split} holds loose images: cGAN-PD needs <class>/<image> folders")
    return [p for p in entries if p.is_dir()]


def read_train(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``root/train``'s images (uint8 [N, 32, 32, 3]), labels (int64 [N]) and class names."""
    train, test = root / "train", root / "test"
    if not (train.is_dir() and test.is_dir()):
        sys.exit(f"{root} needs train/ and test/ folders (the split gan_dist trains on): make them with "
                 "tools/subset_folder.py, whose test split is gan_dist's seeded hold-out")
    folders = class_folders(train)
    names = [d.name for d in folders]
    if names != [d.name for d in class_folders(test)]:
        sys.exit(f"{train} and {test} have different class folders")
    if not names:
        sys.exit(f"{train} has no class folders")
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            sys.exit(f"class folder {folder} has no images")
        images += [decode(path, RESOLUTION, 3).transpose(1, 2, 0) for path in files]
        labels += [label] * len(files)
    return np.stack(images), np.array(labels, dtype=np.int64), names


class Pixels(torch.utils.data.Dataset):
    """(image float [3, 32, 32] in [-1, 1], label) pairs, as Mimicry's Trainer takes them from a DataLoader."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].float() / 127.5 - 1, self.labels[i]


def done_steps(log_dir: Path) -> int:
    """The G step of the latest checkpoint Mimicry saved in ``log_dir`` (0: none)."""
    steps = [int(m.group(1)) for p in (log_dir / "checkpoints" / "netG").glob("*.pth")
             if (m := re.search(r"(\d+)_steps", p.name))]
    return max(steps, default=0)


def sample_labels(train_labels: np.ndarray, n: int, proportional: bool) -> np.ndarray:
    """``n`` labels: 2 of each class and the rest in the training split's proportions by largest remainders (as
    gan_dist's evaluation draws its own, eval.labels=data), or as many of each class."""
    counts = np.bincount(train_labels)
    k = len(counts)
    if not proportional:
        return np.repeat(np.arange(k), n // k)
    share = counts / counts.sum() * (n - 2 * k)
    per = np.floor(share).astype(np.int64) + 2
    per[np.argsort(share - np.floor(share))[::-1][:n - per.sum()]] += 1
    return np.repeat(np.arange(k), per)


@torch.no_grad()
def samples(netG: torch.nn.Module, labels: np.ndarray, seed: int, device: torch.device) -> np.ndarray:
    """One image per label from ``netG`` in eval mode: uint8 [N, 32, 32, 3]."""
    netG.eval()
    labels = torch.from_numpy(labels).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for y in labels.split(500):
        x = netG(torch.randn(len(y), netG.nz, generator=gen, device=device), y)
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="folder with train/<class>/ and test/<class>/")
    p.add_argument("--steps", type=int, required=True, help="G steps (Mimicry's num_steps; 100000 for CIFAR-10)")
    p.add_argument("--ngf", type=int, default=256, help="G width (default 256, as shipped)")
    p.add_argument("--ndf", type=int, default=128, help="D width (default 128, as shipped)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", type=Path, required=True, help="Mimicry's checkpoints and logs; resumes from them")
    p.add_argument("--out", type=Path, required=True, help="samples .npz for gan_dist.evaluate --npz")
    p.add_argument("--n-per-class", type=int, default=1000, help="samples: this times the classes (default 1000)")
    p.add_argument("--labels", choices=("data", "uniform"), default="data",
                   help="the samples' labels: in the training split's proportions (as gan_dist evaluates), or "
                        "as many of each class")
    p.add_argument("--save-every", type=int, default=5000, help="checkpoint every N G steps (Mimicry's 5000)")
    p.add_argument("--print-every", type=int, default=50, help="Mimicry's log line every N G steps")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mmc = import_mimicry()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    images, labels, names = read_train(args.root)
    print(f"{len(labels)} training images in {len(names)} classes: {', '.join(names)}", flush=True)
    loader = torch.utils.data.DataLoader(Pixels(images, labels), batch_size=BATCH, shuffle=True)
    netG = mmc.nets.cgan_pd.CGANPDGenerator32(num_classes=len(names), ngf=args.ngf).to(device)
    netD = mmc.nets.cgan_pd.CGANPDDiscriminator32(num_classes=len(names), ndf=args.ndf).to(device)
    optG = torch.optim.Adam(netG.parameters(), LR, betas=BETAS)
    optD = torch.optim.Adam(netD.parameters(), LR, betas=BETAS)
    trainer = mmc.training.Trainer(
        netD=netD, netG=netG, optD=optD, optG=optG, dataloader=loader, num_steps=args.steps, n_dis=N_DIS,
        lr_decay="linear", log_dir=str(args.log_dir.resolve()), device=device, print_steps=args.print_every,
        save_steps=args.save_every)

    stamps = [time.perf_counter()]  # after each G step: its time includes its 5 D steps and the batches
    g_step = netG.train_step

    def timed_g_step(*a: Any, **k: Any) -> Any:
        out = g_step(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return out

    netG.train_step = timed_g_step
    signal.signal(signal.SIGTERM, interrupt)  # Trainer saves its checkpoints on KeyboardInterrupt
    trainer.train()
    gaps = np.diff(stamps)
    if len(gaps):
        steady = gaps[1:] if len(gaps) > 1 else gaps
        print(f"s/G step: {steady.mean():.3f} mean, {statistics.median(steady):.3f} median over {len(steady)} "
              f"steps after the first ({gaps[0]:.3f}); ngf={args.ngf} ndf={args.ndf} threads="
              f"{torch.get_num_threads()} device={device}", flush=True)
    step = done_steps(args.log_dir)
    if step < args.steps:
        print(f"stopped at G step {step} of {args.steps}: no samples; run the same command to resume")
        return 130
    wanted = sample_labels(labels, args.n_per_class * len(names), args.labels == "data")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=samples(netG, wanted, args.seed, device), labels=wanted)
    print(f"wrote {args.out}: {len(wanted)} images, labels by {args.labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
