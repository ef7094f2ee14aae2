"""Shared fixtures: tiny datasets written by the tests (IDX, CIFAR, image folders), and helpers to run the
real entry points."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_dist.dist import DistEnv

REPO = Path(__file__).resolve().parents[1]
CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
"""One process on the CPU, with no process group: what an engine or a loader sees without torchrun."""


def write_idx(folder: Path, n: int, split: str = "test", gz: bool = False,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an MNIST-format split of ``n`` images: each class is a bright bar at its own row band,
    so the data is learnable and a classifier can tell the classes apart."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y: 5 + 2 * y, 4:24] = 200 + rng.integers(0, 55)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x801, n) + labels.tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return images, labels


def _class_pattern(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """RGB uint8 [H, W, 3]: dim noise with a bright bar whose row band and colour follow the class,
    so a classifier can tell the classes apart at any size."""
    image = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    band = (label % 8) * height // 8
    colour = np.array([(label * 97) % 256, (label * 57 + 128) % 256, 255 - (label * 31) % 256], dtype=np.uint8)
    image[band: band + max(1, height // 8), width // 8: width - width // 8] = colour
    return image


CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta"),
}


def write_cifar(root: Path, n: int, kind: str = "cifar10", seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a CIFAR-10 or CIFAR-100 dataset in CIFAR's own pickle format: ``n`` training images (over the
    five batches of CIFAR-10) and ``n // 2`` test images. Each batch is a dict with ``data`` (uint8
    [m, 3072]: the red plane, then green, then blue) and ``labels`` (CIFAR-100: ``fine_labels`` and
    ``coarse_labels``); the keys are text, as the originals' Python 2 strings read with ``encoding="latin1"``.
    Returns per split the images as [N, 32, 32, 3] (torchvision's ``.data``) and the labels."""
    folder_name, train_files, test_files, meta_name = CIFAR[kind]
    classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(seed)
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, files, count in (("train", train_files, n), ("test", test_files, n // 2)):
        labels = (np.arange(count) % classes).astype(np.int64)
        rng.shuffle(labels)
        images = np.stack([_class_pattern(rng, int(y), 32, 32) for y in labels]) if count else \
            np.zeros((0, 32, 32, 3), np.uint8)
        written[split] = images, labels
        for part, (chunk, chunk_labels) in enumerate(zip(np.array_split(images, len(files)),
                                                         np.array_split(labels, len(files)), strict=True)):
            batch = {"batch_label": f"{split} batch {part + 1}", "data": chunk.transpose(0, 3, 1, 2).reshape(-1, 3072),
                     "filenames": [f"img_{split}_{part}_{i}.png" for i in range(len(chunk))]}
            if kind == "cifar10":
                batch["labels"] = chunk_labels.tolist()
            else:
                batch["fine_labels"], batch["coarse_labels"] = chunk_labels.tolist(), (chunk_labels // 5).tolist()
            (folder / files[part]).write_bytes(pickle.dumps(batch, protocol=2))
    if kind == "cifar10":
        meta = {"label_names": [f"class_{c}" for c in range(10)], "num_cases_per_batch": 10000, "num_vis": 3072}
    else:
        meta = {"fine_label_names": [f"fine_{c:02d}" for c in range(100)],
                "coarse_label_names": [f"coarse_{c:02d}" for c in range(20)]}
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return written


FOLDER_SIZES = ((16, 16), (20, 14), (12, 18), (24, 24))


def write_folder(root: Path, classes: dict[str, int] | None, size: int | Sequence[tuple[int, int]] = FOLDER_SIZES,
                 modes: Sequence[str] = ("L", "RGB", "RGBA", "P"), formats: Sequence[str] = ("png", "jpg"),
                 n: int = 12, seed: int = 0) -> list[Path]:
    """Write an image folder: ``<root>/<class>/<i>.<format>`` with ``classes[name]`` images of each class,
    or with ``classes=None`` a flat folder of ``n`` images (unconditional data). Image ``i`` of a class
    takes the i-th size (``size``: (width, height) pairs, or one square side), mode and format in turn;
    a mode JPEG cannot hold (RGBA, P) is saved as PNG. Returns the written files."""
    sizes = [(size, size)] if isinstance(size, int) else list(size)
    rng = np.random.default_rng(seed)
    groups = {"": n} if classes is None else classes
    written = []
    for label, (name, count) in enumerate(groups.items()):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width, height = sizes[i % len(sizes)]
            mode, fmt = modes[i % len(modes)], formats[i % len(formats)]
            image = Image.fromarray(_class_pattern(rng, label, height, width))
            if mode == "P":
                image = image.quantize(16)
            elif mode == "RGBA":
                image = image.convert("RGBA")
                image.putalpha(200)
            else:
                image = image.convert(mode)
            if fmt in ("jpg", "jpeg") and image.mode not in ("L", "RGB"):
                fmt = "png"
            path = folder / f"{i}.{fmt}"
            image.save(path)
            written.append(path)
    return written


def write_mnist(root: Path, n: int = 256) -> Path:
    """``root`` as ``data.root`` of ``data.name=mnist``: an ``n``-image test split in torchvision's raw layout."""
    write_idx(root / "MNIST" / "raw", n)
    return root


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A 256-image test split in torchvision's raw layout."""
    return write_mnist(tmp_path / "data")


def base_overrides(run_dir: Path, root: Path, **extra: object) -> list[str]:
    """Overrides for a tiny, quiet, offline run on a test-written split."""
    items = {
        "run_dir": run_dir,
        "data.root": root,
        "data.cache_dir": Path(run_dir).parent / "data_cache",
        "data.split": "test",
        "data.download": False,
        "log.wandb.mode": "disabled",
        "log.progress": False,
        "train.batch_size": 16,
        "log.every_steps": 2,
        "checkpoint.every_steps": 0,
    } | extra
    return [f"{k}={v}" for k, v in items.items()]


def file_group(rank: int, world: int, store: Path, timeout_s: float = 60):
    """Join a gloo group of ``world`` spawned processes through a file store: no port is picked in
    advance, so no other process can take it first. Returns the rank's ``DistEnv``."""
    import datetime

    import torch
    import torch.distributed as tdist

    from gan_dist.dist import DistEnv

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, rank, world, world, torch.device("cpu"), tdist.group.WORLD)


def assert_same_weights(a: Path, b: Path) -> None:
    """The generator and discriminator of checkpoints ``a`` and ``b`` are equal to the bit."""
    import torch

    def weights(path: Path) -> dict:
        state = torch.load(path, weights_only=True)
        return {f"{net}.{k}": v for net in ("generator", "discriminator") for k, v in state["engine"][net].items()}

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def saved_steps(run_dir: Path) -> list[int]:
    """The steps of ``run_dir``'s rolling checkpoints (``checkpoints/step_<N>.pt``), oldest first."""
    return sorted(int(p.stem.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*.pt"))


def complete_records(path: Path) -> list[dict]:
    """The JSON lines of a file that a running process may be appending to (``metrics.jsonl``):
    text after the last newline is a line still being written, and is left out."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def torchrun_cmd(nproc: int, args: Sequence[str], *extra: str) -> list[str]:
    """torchrun on this host; ``--standalone`` lets its store bind a port itself, so concurrent test
    runs can never join each other's rendezvous through a port picked in advance."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "-m", "gan_dist.train", *args]


def workers(proc: subprocess.Popen) -> list[int]:
    """PIDs of a launcher's worker processes (torchrun's ranks), in order of start."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a launch, then its ranks: torchrun starts each rank in a session of its own, so a kill of
    torchrun's process group alone leaves the ranks training (and saving) on; torchrun goes first, so
    that it cannot start new ranks."""
    for pid in [proc.pid, *workers(proc)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def start() -> Iterator[Callable[..., subprocess.Popen]]:
    """``start(cmd, **env)``: a command in a session of its own, unbuffered, one thread per process, its output
    piped; whatever is left of it, torchrun's ranks included, is killed after the test, also a failed one."""
    started: list[subprocess.Popen] = []

    def launch(cmd: Sequence[str], **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.PIPE,
                                env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | env,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        kill_all(proc)


def wait_until(ready: Callable[[], object], what: str, timeout: float, poll: float = 0.05,
               alive: Callable[[], str | None] | None = None, detail: Callable[[], str] | None = None) -> None:
    """Poll until ``ready()`` is true: every wait has a deadline, so a hang fails, naming ``what``.

    ``alive``: None while what is awaited can still come, else why it cannot (a process ended): the wait
    then fails at once instead of at the deadline. ``detail``: text for a failure at the deadline (a log's
    tail, a job's state)."""
    deadline = time.monotonic() + timeout
    while not ready():
        gone = alive() if alive is not None else None
        if gone is not None:
            if ready():  # it came just before the end
                return
            raise AssertionError(f"{what}: never came: {gone}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s" + (f"\n{detail()}" if detail else ""))
        time.sleep(poll)


def exited(*procs: subprocess.Popen) -> Callable[[], str | None]:
    """``wait_until``'s ``alive`` for piped processes: the exit status and output of the first to end."""

    def why() -> str | None:
        for proc in procs:
            if proc.poll() is not None:
                return f"exited {proc.returncode}:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}"
        return None

    return why


def wait_for_checkpoint(run_dir: Path, step: int, timeout: float, alive: Callable[[], str | None]) -> None:
    """Wait until ``run_dir`` holds step ``step``'s checkpoint: the point at which a fault test strikes."""
    wait_until((run_dir / "checkpoints" / f"step_{step}.pt").exists, f"step {step}'s checkpoint", timeout,
               alive=alive)


def run(cmd: Sequence[str], timeout: float = 300, cwd: Path = REPO, env_extra: dict[str, str] | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run a command to completion with captured text output, unbuffered and one thread per process."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | (env_extra or {})
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, **kw)
