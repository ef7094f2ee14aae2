"""The distributed environment, read once from the launcher's variables and passed around.

torchrun, submitit (through ``launch.slurm``) and a plain ``python -m`` all end up here: RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT are the whole contract.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from gan_dist.config import ConfigError, DistConfig


class PeerFailed(RuntimeError):
    """Raised on every rank at once when some rank failed; ``cause`` is this rank's own error, if any."""

    def __init__(self, cause: Exception | None) -> None:
        super().__init__(str(cause) if cause is not None else "another rank failed at the same point")
        self.cause = cause


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    control: tdist.ProcessGroup | None = None
    """A gloo group for host-side flags (stop signals, save status): agreeing on them never syncs a GPU."""
    backend: str | None = None
    """The process group's backend (nccl or gloo); None without a process group."""

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that writes files, logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists (world size > 1, or ``dist.force_ddp``): collectives and DDP are live."""
        return self.control is not None

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items: gathering in rank order restores the full order."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def largest_shard(self, n: int) -> int:
        """The most items any rank's ``shard`` of ``n`` holds: loops over it take alike many turns on every rank."""
        return -(-n // self.world_size)

    def raise_together(self, error: Exception | None, elsewhere: Exception | None = None) -> None:
        """Every rank calls this; if any rank has an error, every rank raises.

        By default every rank raises ``PeerFailed`` (the trainer then waits for the failing ranks to
        say why). With ``elsewhere``, for callers that handle the error's own type, the failing ranks
        raise their own error and the others ``elsewhere``.
        """
        if self.any(error is not None):
            if elsewhere is None:
                raise PeerFailed(error)
            raise error if error is not None else elsewhere

    @contextmanager
    def together(self, catch: type[Exception] | tuple[type[Exception], ...],
                 elsewhere: Exception | None = None) -> Iterator[None]:
        """Run the block on every rank, then agree: an error of type ``catch`` raised in it on any
        rank is raised on every rank, as ``raise_together`` says. The agreement is also a barrier."""
        error = None
        try:
            yield
        except catch as e:
            error = e
        self.raise_together(error, elsewhere)

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier(group=self.control)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank. Every rank must call it."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (on the training device's backend)."""
        if self.distributed:
            tdist.all_reduce(t)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over ranks, in place."""
        if self.distributed:
            tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank: one rank decides, everyone follows."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of every rank, in rank order; shapes may differ in dim 0."""
        if not self.distributed:
            return t
        sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(self.world_size)]
        tdist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
        top = int(max(s.item() for s in sizes))
        padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class Stopped(Exception):
    """Every rank agreed, inside a long phase (judge training, an evaluation), to stop on a signal."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


class StopPoints:
    """A long phase's places to stop at: every ``every``-th call, the ranks agree whether any of them was
    signalled, and all raise ``Stopped`` together. Ranks must call alike (the same loops, the same counts)."""

    def __init__(self, env: DistEnv, requested: Callable[[], bool], every: int = 8) -> None:
        self.env, self.requested, self.every, self.calls = env, requested, every, 0

    def __call__(self, phase: str) -> None:
        self.calls += 1
        if self.calls % self.every == 0 and self.env.any(self.requested()):
            raise Stopped(phase)


@dataclass(frozen=True)
class Agreed:
    """The flags the ranks agreed on one step ago: ``stop`` (any rank's signal), ``timed_save`` (rank 0's clock)."""

    stop: bool = False
    timed_save: bool = False


class StepAgreement:
    """The ranks' per-step decisions (stop on a signal, save on rank 0's clock) without a host barrier.

    The flags offered after step k travel in an all-reduce that runs while step k+1 computes and is
    read after it, so every rank acts on the same decision at the same step, one step late. Stop is
    any rank's; save is rank 0's alone (the other ranks offer 0), so clocks never need to agree.
    """

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.pending: tuple[torch.Tensor, Any] | None = None

    def exchange(self, stop: bool, save: bool) -> Agreed:
        """Offer this step's flags; returns the flags agreed one step ago (both false at first)."""
        flags = torch.tensor([int(stop), int(save and self.env.is_main)], dtype=torch.int32)
        work = (tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self.env.control, async_op=True)
                if self.env.distributed else None)
        previous, self.pending = self.pending, (flags, work)
        return self._read(previous)

    def drain(self) -> Agreed:
        """Finish the agreement in flight (every rank calls this at the same step), returning its flags."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(entry: tuple[torch.Tensor, Any] | None) -> Agreed:
        if entry is None:
            return Agreed()
        flags, work = entry
        if work is not None:
            work.wait()
        return Agreed(bool(flags[0]), bool(flags[1]))


_GLOO_TRANSPORT = ("gloo/transport", "Application timeout caused pair closure")


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer died, hung or became unreachable.

    NCCL and the stores raise ``DistError``; gloo's transport errors reach Python as plain
    ``RuntimeError`` whose message names gloo's transport source, except the one gloo hands every
    other pending operation when one of them times out, which is a bare sentence.
    """
    return isinstance(e, getattr(tdist, "DistError", ())) or any(m in str(e) for m in _GLOO_TRANSPORT)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> tdist.Store | None:
    """torchrun's store, with keys scoped to this restart; None where the store is not torchrun's.

    torchrun's agent keeps one store for all restarts of the group, and the process group's keys
    (gloo's peer addresses among them) are the same on every attempt: a restarted rank could read
    the address of a peer that died with the previous attempt, and fail or stall connecting to it
    (pytorch/pytorch#135712). One agent gives all its workers the same restart count, so it names
    the attempt. Several agents (multi-node) may count differently; there the launcher sets
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives each attempt a fresh store instead.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if _env_int("GROUP_WORLD_SIZE", 1) != 1:
        if _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0 and rank == 0:
            warnings.warn("torchrun restarts across nodes share one store; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "(launch/torchrun_multinode.sh does) or a restarted rank may stall connecting", stacklevel=2)
        return None
    store, _, _ = next(tdist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return tdist.PrefixStore(f"gan_dist/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def visible_gpus() -> list[str]:
    """Signs that this process was given GPUs which need no CUDA runtime to read: NVIDIA's device files
    (unless CUDA_VISIBLE_DEVICES hides them all), or a CUDA_VISIBLE_DEVICES that names some."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() in ("", "-1"):
        return []  # hidden on purpose
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    return devices or ([f"CUDA_VISIBLE_DEVICES={listed}"] if listed else [])


def _cuda_failure() -> str:
    """Why CUDA does not start, in the runtime's own words (a driver too old for this torch, no device files)."""
    try:
        torch.cuda.init()
    except Exception as e:
        return str(e).splitlines()[0][:200]
    return "torch.cuda.is_available() is false"


def _device(cfg: DistConfig, local_rank: int) -> torch.device:
    """``cuda:(local_rank % visible GPUs)``: ranks may share a GPU, or each see exactly one. GPUs that are there
    but that CUDA cannot use are an error, never a quiet run on the CPU."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        gpus = visible_gpus() if torch.version.cuda else []
        if cfg.device == "cuda" or gpus:
            seen = f"{', '.join(gpus)} {'is' if len(gpus) == 1 else 'are'} here, but " if gpus else ""
            raise ConfigError(f"dist.device={cfg.device}: {seen}CUDA does not start ({_cuda_failure()}); fix the "
                              "driver or the container's GPU access (docker --gpus, apptainer --nv), or set "
                              "dist.device=cpu to train on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _backend(cfg: DistConfig, device: torch.device, local_world: int) -> str:
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA; on CPU use gloo (or auto)")
    backend = cfg.backend if cfg.backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if backend == "nccl" and local_world > gpus:
        raise ConfigError(f"dist.backend: NCCL takes one GPU per rank, and {local_world} ranks on this node share "
                          f"{gpus} GPU{'s' if gpus != 1 else ''}; launch at most {gpus} per node "
                          "(torchrun --nproc_per_node), or set dist.backend=gloo to let ranks share a GPU")
    return backend


def setup(cfg: DistConfig) -> DistEnv:
    """Join the process group described by the environment (or run alone when there is none)."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    device = _device(cfg, local_rank)
    backend = _backend(cfg, device, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Every batch has one shape (the last partial one is dropped): cuDNN may pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
    else:
        # Each rank gets its share of the cores, so N ranks never oversubscribe the node.
        torch.set_num_threads(cfg.threads or max(1, usable_cores() // local_world))
    control = group_backend = None
    if world > 1 or cfg.force_ddp:
        group_backend = backend
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        # Alone, an in-process store is the whole rendezvous: no address or port is needed.
        store = _attempt_store(rank, world, timeout) if world > 1 else tdist.HashStore()
        tdist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=timeout,
            store=store,
            **({"device_id": device} if backend == "nccl" else {}),
        )
        control = tdist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else tdist.group.WORLD
    return DistEnv(rank, local_rank, world, local_world, device, control, group_backend)


def teardown(env: DistEnv) -> None:
    if env.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
