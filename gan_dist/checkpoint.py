"""Atomic rank-0 checkpoints of a run's components, rolling retention, and resume past broken files.

The checkpointer is given the run's parts by name (engine, position, best score, run record); each
saves and loads its own state, and a checkpoint is ``{"format_version", "step", <name>: <state>}``.
It is a plain dict of tensors and builtins, so ``torch.load(weights_only=True)`` reads it without
running pickled code. It is written to a temporary file in the same folder, fsynced, renamed over
``step_<N>.pt`` and the folder fsynced: a crash at any instant leaves either the old set or the new
file, never a half-file under a valid name.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gan_dist.config import UsageError, write_reason

if TYPE_CHECKING:
    pass


FORMAT_VERSION = 3
"""3: one entry per component, the only format this gan_dist reads. Formats 1 and 2 hold one flat dict;
they, and any other version, are refused, naming their version."""


REQUIRED = ("format_version", "step", "run", "engine")
"""What every reader needs: the step, the run record (config, data) and the engine (the weights)."""


ROLLING_NAME = re.compile(r"step_(\d+)\.pt")


class Stateful(Protocol):
    """A part of a run that saves and restores itself: plain tensors and builtins only."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that cannot be written or does not fit this run."""


class IncompatibleCheckpoint(CheckpointError):
    """Readable but not for this run (format, data or model shape): never silently skipped."""


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Components refuse a state without knowing its file; the refusal leaves here naming it."""
    try:
        yield
    except IncompatibleCheckpoint as e:
        raise IncompatibleCheckpoint(f"checkpoint {path}: {e}") from None


def rolling(folder: Path) -> list[tuple[int, Path]]:
    """The rolling checkpoints ``step_<N>.pt`` in ``folder``, by step, oldest first."""
    return sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := ROLLING_NAME.fullmatch(p.name)))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that readers see the old file, or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"saving checkpoint {path} failed (disk full?): {write_reason(e)}") from e
    except BaseException:  # an abort (a second Ctrl-C) mid-write leaves no partial file either
        tmp.unlink(missing_ok=True)
        raise


ZIP_MAGIC = b"PK\x03\x04"
"""How every torch.save file begins (torch.save writes a zip archive); a truncated one still does."""


def _reason(e: Exception) -> str:
    """What is wrong, in one line: torch puts a ``weights_only`` refusal after paragraphs of advice."""
    text = str(e)
    _, refused, why = text.partition("WeightsUnpickler error: ")
    if refused:
        first = next((line for line in why.splitlines() if line.strip()), "")
        return f"it holds objects other than tensors and builtins: {first.split('. ')[0]}"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` reads as a gan_dist checkpoint (its tensors memory-mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable, or not torch.save's: not ours to delete
        return False
    return isinstance(state, dict) and all(k in state for k in REQUIRED)


def load_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read and sanity-check one checkpoint; ``CheckpointError`` if it is not usable at all."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        state = torch.load(path, map_location=device, weights_only=True) if magic == ZIP_MAGIC else None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # truncated zip, bad pickle opcode, non-allowlisted global, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({_reason(e)})") from None
    if state is None:
        raise CheckpointError(f"{path} is not a gan_dist checkpoint: not a torch.save archive (a plain pickle, "
                              "or another file)")
    version = state.get("format_version", FORMAT_VERSION) if isinstance(state, dict) else FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise IncompatibleCheckpoint(f"checkpoint {path} has format version {version}; this gan_dist reads "
                                     f"{FORMAT_VERSION}")
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    return state


def check_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights that hold NaN or infinity: a diverged run's G draws nothing but blank images."""
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise IncompatibleCheckpoint(f"{name} has non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}); "
                                     "the run diverged before this save, use an earlier checkpoint")


def check_shapes(name: str, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare a saved state dict with the model this config builds; say what differs."""
    own = model.state_dict()
    if saved.keys() != own.keys():
        extra, missing = sorted(saved.keys() - own.keys()), sorted(own.keys() - saved.keys())
        raise IncompatibleCheckpoint(f"{name} has other layers than this config builds (only in checkpoint: "
                                     f"{extra[:3]}, only in config: {missing[:3]}); check model.*")
    for key, tensor in own.items():
        if saved[key].shape != tensor.shape:
            raise IncompatibleCheckpoint(f"{name}.{key} has shape {tuple(saved[key].shape)}, this config builds "
                                         f"{tuple(tensor.shape)}; check model.*")


def load_components(path: Path, state: dict[str, Any], components: Mapping[str, Stateful]) -> None:
    """Each component loads its own entry, in the mapping's order; a refusal names the file."""
    missing = [name for name in components if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a gan_dist checkpoint (missing {', '.join(missing)})")
    with naming(path):
        for name, component in components.items():
            component.load_state_dict(state[name])


def move_aside(path: Path, why: CheckpointError) -> None:
    """Rename an unreadable checkpoint to ``<name>.corrupt``: kept for a look, out of resume's and pruning's way."""
    target = path.with_name(f"{path.name}.corrupt")
    try:
        path.rename(target)
    except OSError as e:
        raise CheckpointError(f"{why}; moving it aside to {target.name} failed: {e.strerror}") from None
    print(f"warning: {why}; moved it aside to {target.name}, resuming from an older checkpoint", file=sys.stderr,
          flush=True)
