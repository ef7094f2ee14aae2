"""Submit gan_dist training to Slurm through submitit; in the job, hand each task to ``gan_dist.train.main``.

    python -m launch.slurm --slurm-config configs/slurm/gpu.yaml --config configs/mnist_cgan.yaml \\
        --nodes 2 --gpus-per-node 4 --partition gpu --time 240 train.batch_size=128

Cluster settings come from ``--slurm-config`` (a YAML file, see configs/slurm/), then from the flags
below, which are the same keys spelled ``--key-name``. ``--config`` and the ``key=value`` overrides
go to the trainer unchanged. ``--dry-run`` prints the sbatch script instead of submitting it.

In the job, one task per GPU (or ``tasks_per_node`` on CPUs) reads its rank from submitit's job
environment, exports torchrun's variables and calls the same ``gan_dist.train.main`` that torchrun
runs. Preemption and timeouts stop the trainer at a step boundary with a checkpoint saved; the job is
then requeued with the same arguments and resumes from that checkpoint (see docs/SLURM.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import shutil
import signal
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.utils import FailedJobError, JobPaths
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment
from submitit.slurm.slurm import _make_sbatch_string  # private: see Submission.sbatch_script

from gan_dist import cli
from gan_dist.config import ConfigError, opt
from gan_dist.configio import from_dict, load_config
from launch import netif
from launch.sbatch_options import SBATCH_OPTIONS

EXIT_USAGE = cli.EXIT_USAGE
EXIT_NO_SLURM = 1  # no sbatch here, or sbatch refused the job
STOPPED_WAIT_S = 180
"""How long a stopped task that does not requeue waits to be killed (by the requeue, scancel or Slurm)."""
OWN_FLAGS = {"job-name": "job_name", "nodes": "nodes", "gpus-per-node": "gpus_per_node",
             "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem",
             "partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
             "time": "time", "signal": "signal_delay_s"}
"""The sbatch options that SlurmConfig's own keys set: ``sbatch`` may not set them around the checks."""
SAME_AS = {"gpus": "gpus_per_node", "gpus-per-socket": "gpus_per_node", "gpus-per-task": "gpus_per_node",
           "gres": "gpus_per_node", "ntasks": "tasks_per_node", "ntasks-per-gpu": "tasks_per_node",
           "cpus-per-gpu": "cpus_per_task", "mem-per-cpu": "mem", "mem-per-gpu": "mem"}
"""sbatch options that ask for what an own key's option asks, in other terms (``gres``: its ``gpu`` entries).
Slurm would get both, so ``sbatch`` may not give them while the script has that key's option."""


@dataclass(frozen=True)
class SlurmConfig:
    job_name: str = opt("gan_dist", "Slurm job name")
    nodes: int = opt(1, "nodes", ge=1)
    gpus_per_node: int = opt(1, "GPUs per node, one task each; 0 on a CPU-only cluster (gloo)", ge=0)
    tasks_per_node: int | None = opt(None, "ranks per node; default gpus_per_node; required when that is 0", ge=1)
    cpus_per_task: int = opt(4, "CPU cores per task", ge=1)
    mem: str | None = opt(None, "memory per node as sbatch --mem takes it (64G); null: partition default")
    partition: str | None = opt(None, "partition; null: the cluster's default")
    account: str | None = opt(None, "account to charge")
    qos: str | None = opt(None, "quality of service")
    constraint: str | None = opt(None, "node features, as sbatch --constraint takes them (a100|h100)")
    time: int = opt(60, "time limit in minutes", ge=1)
    signal_delay_s: int = opt(
        120, "USR2 this long before the time limit: covers one step, one save, the requeue", ge=10
    )
    max_num_timeout: int = opt(3, "requeues allowed after timeouts (under 12.5 min, every signal counts)", ge=0)
    sbatch: tuple[str, ...] = opt((), "extra sbatch options, as name=value or a bare flag (exclusive)")
    srun_args: tuple[str, ...] = opt((), "extra srun arguments (write --srun-args=--cpu-bind=none)")
    setup: tuple[str, ...] = opt((), "shell lines run before srun (module load ...)")
    folder: str | None = opt(None, "submitit's folder for pickles and logs; default <run_dir>/slurm/%j")
    apptainer_image: str | None = opt(None, "run each task in `apptainer exec [--nv] IMAGE.sif`")
    pyxis_image: str | None = opt(None, "run each task in this image through pyxis (srun --container-image)")
    container_mounts: tuple[str, ...] = opt((), "more host paths seen in the container (cwd and run_dir always are)")
    container_python: str = opt("python3", "python in the container (with gan_dist and submitit installed)")

    def __post_init__(self) -> None:
        if self.gpus_per_node == 0 and self.tasks_per_node is None:
            raise ConfigError("tasks_per_node: required when gpus_per_node=0 (a CPU-only job)")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                f"tasks_per_node: one task per GPU, so {self.gpus_per_node} or null, got {self.tasks_per_node}"
            )
        if self.time * 60 < self.signal_delay_s + 60:
            # Slurm may send the signal up to a minute early: before the job has any handler, it kills it.
            raise ConfigError(
                f"time: {self.time} min leaves no room for signal_delay_s={self.signal_delay_s} "
                "plus a minute; raise time or lower signal_delay_s"
            )
        if self.apptainer_image and self.pyxis_image:
            raise ConfigError("apptainer_image and pyxis_image: choose one container runtime")
        image = Path(self.apptainer_image) if self.apptainer_image else None
        if image is not None and image.is_absolute() and image.parent.is_dir() and not image.exists():
            raise ConfigError(f"apptainer_image: {image} does not exist (its folder does, here); build it with "
                              "apptainer build (docker/README.md), or name the path it has on the cluster")
        if image is not None and not image.exists():
            print(f"warning: apptainer_image {image} is not here; it must exist on the cluster's nodes",
                  file=sys.stderr, flush=True)
        for option in self.sbatch:
            name, _, value = option.removeprefix("--").partition("=")
            name = name.replace("_", "-")
            if name not in SBATCH_OPTIONS:
                close = difflib.get_close_matches(name, SBATCH_OPTIONS, n=1)
                raise ConfigError(f"sbatch: {option!r}: no such sbatch option (its long names, spelled out)"
                                  + (f"; did you mean {close[0]}?" if close else ""))
            if name in OWN_FLAGS:
                raise ConfigError(f"sbatch: {option!r} is set by its own key, {OWN_FLAGS[name]} "
                                  f"(--{OWN_FLAGS[name].replace('_', '-')}), which is checked; give it there")
            if key := self.asked_already(name, value):
                raise ConfigError(f"sbatch: {option!r} asks Slurm for what {key} (--{key.replace('_', '-')}) "
                                  "already asks; give only one of them")

    def asked_already(self, name: str, value: str) -> str | None:
        """The own key whose sbatch option asks for what sbatch option ``name=value`` asks, if the script has
        that option: ``mem`` and GPUs only when set, so that ``mem-per-cpu`` or GPUs by ``gres`` stay open."""
        key = SAME_AS.get(name)
        if name == "gres" and not any(g.partition(":")[0].removeprefix("gres/") == "gpu" for g in value.split(",")):
            return None
        if key in ("mem", "gpus_per_node") and not getattr(self, key):
            return None
        return key

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU unless set."""
        return self.tasks_per_node or self.gpus_per_node


def read_slurm_config(path: str | None, flags: dict[str, Any]) -> SlurmConfig:
    """The YAML file's keys, then the command-line flags over them, checked key by key."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--slurm-config: cannot read {path}: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--slurm-config: {path} must hold a mapping at the top level")
    return from_dict(SlurmConfig, tree | flags)


def run_noting_signals(run: Callable[[], int]) -> tuple[int, set[int]]:
    """``run()``, and the signals this process got meanwhile, whichever handler took them.

    The trainer's handler replaces submitit's and records no signal number, so the wakeup fd
    (written by Python's C-level handler for every signal that has a Python handler) is the witness.
    """
    read_fd, write_fd = os.pipe()
    for fd in (read_fd, write_fd):
        os.set_blocking(fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        result = run()
    finally:
        signal.set_wakeup_fd(previous)
    try:
        noted = os.read(read_fd, 1 << 16)
    except BlockingIOError:
        noted = b""
    finally:
        os.close(read_fd)
        os.close(write_fd)
    return result, set(noted)


class SlurmTrainTask:
    """What every Slurm task runs: torchrun's variables from submitit's job environment, then the trainer.

    Preemption and timeout: submitit's USR2 handler (installed before this call) would checkpoint,
    requeue and exit at once, mid-step. The trainer's own handler replaces it and stops at the next
    step boundary with a checkpoint saved (exit 75). Only then, and only if USR2 came, does rank 0 run
    submitit's handler, outside any signal, so that submitit's requeue logic (checkpoint(), timeout
    countdown, scontrol requeue, exit) decides. A stop by SIGTERM alone is a scancel (or a preemption
    that Slurm requeues itself): requeueing would revive a cancelled job. Every task that does not
    requeue waits to be killed by whoever stopped the job: a result pickle would make it look finished.
    """

    def __call__(self, argv: list[str]) -> int:
        preempt = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
        requeue = signal.getsignal(preempt)
        if not callable(requeue):
            raise RuntimeError("SlurmTrainTask runs inside a submitit Slurm job: no preemption handler found")
        # The trainer places rank r on cuda:LOCAL_RANK, so every task must keep seeing all the node's GPUs.
        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # gloo and NCCL talk over the interface that reaches the other nodes (netif.py says why).
        job = submitit.JobEnvironment()
        peer = job.hostnames[1] if job.node == 0 and job.num_nodes > 1 else job.hostnames[0]
        os.environ.update(netif.socket_ifname(peer, os.environ))
        # Before torch loads OpenMP, which reads it once: waiting threads sleep rather than spin on
        # cores that the node's other tasks need, unless the job's environment chose.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from gan_dist import train  # torch and friends: seconds that submitting should not pay

        status, signals = run_noting_signals(lambda: train.main(argv))
        if status == 0:
            return status
        if status != cli.EXIT_REQUEUE:
            raise RuntimeError(f"gan_dist.train exited with status {status}: see this task's log")
        if env.rank == 0 and preempt in signals:
            requeue(preempt, None)
            raise RuntimeError("submitit's handler returned without requeueing the job")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a requeue's SIGTERM ends this task at once
        time.sleep(STOPPED_WAIT_S)
        raise RuntimeError(
            f"rank {env.rank}: stopped by a signal with a checkpoint saved, but nothing ended "
            f"the job within {STOPPED_WAIT_S}s; see rank 0's log"
        )

    def checkpoint(self, argv: list[str]) -> DelayedSubmission:
        """The same call again: the trainer resumes from run_dir's newest checkpoint.

        submitit calls this inside its handler, on global rank 0 only, so nothing collective here.
        """
        return DelayedSubmission(self, argv)


@dataclass(frozen=True)
class Submission:
    """Everything a submission needs, resolved once for both submitting and --dry-run."""

    cfg: SlurmConfig
    train_argv: list[str]
    run_dir: Path
    folder: Path

    def binds(self) -> list[str]:
        """Host paths the container must see: the working dir, run_dir, submitit's folder and extras."""
        paths = [
            str(Path.cwd()),
            str(self.run_dir),
            str(JobPaths.get_first_id_independent_folder(self.folder)),
        ]
        return list(dict.fromkeys([*paths, *self.cfg.container_mounts]))

    def python(self) -> str | None:
        """The command that starts Python in each task; None: this interpreter, as submitit does."""
        cfg = self.cfg
        if cfg.apptainer_image:
            nv = ["--nv"] if cfg.gpus_per_node else []
            return shlex.join(
                [
                    "apptainer",
                    "exec",
                    *nv,
                    "--bind",
                    ",".join(self.binds()),
                    cfg.apptainer_image,
                    cfg.container_python,
                ]
            )
        return cfg.container_python if cfg.pyxis_image else None

    def parameters(self) -> dict[str, Any]:
        """submitit's Slurm parameters (sbatch's names), shared by the submission and the dry run."""
        cfg = self.cfg
        srun_args = list(cfg.srun_args)
        if cfg.pyxis_image:
            mounts = ",".join(f"{p}:{p}" for p in self.binds())
            srun_args += [
                f"--container-image={cfg.pyxis_image}",
                f"--container-mounts={mounts}",
                f"--container-workdir={Path.cwd()}",
            ]
        extra = {}
        for option in cfg.sbatch:
            name, sep, value = option.removeprefix("--").partition("=")
            extra[name] = value if sep else True
        params: dict[str, Any] = {
            "job_name": cfg.job_name,
            "nodes": cfg.nodes,
            "ntasks_per_node": cfg.tasks,
            "cpus_per_task": cfg.cpus_per_task,
            "time": cfg.time,
            "signal_delay_s": cfg.signal_delay_s,
            "gpus_per_node": cfg.gpus_per_node or None,
            "mem": cfg.mem,
            "partition": cfg.partition,
            "account": cfg.account,
            "qos": cfg.qos,
            "constraint": cfg.constraint,
            "setup": list(cfg.setup) or None,
            "srun_args": srun_args or None,
            "additional_parameters": extra or None,
        }
        return {k: v for k, v in params.items() if v is not None}

    def sbatch_script(self) -> str:
        """The script submitit would hand to sbatch: its own template, with the command line that
        SlurmExecutor writes.

        The template is submitit's private ``_make_sbatch_string``: SlurmExecutor renders the script
        only inside ``submit()``, so no public call gives it without submitting. pyproject.toml pins
        submitit to the versions it was checked on, and tests/test_slurm.py fails, naming it, if the
        function stops taking these parameters or the script differs from what submitit submits.
        """
        python = self.python() or shlex.quote(sys.executable)
        command = f"{python} -u -m submitit.core._submit {shlex.quote(str(self.folder))}"
        return _make_sbatch_string(command=command, folder=self.folder, **self.parameters())

    def submit(self) -> submitit.Job:
        executor = submitit.AutoExecutor(
            folder=self.folder,
            cluster="slurm",
            slurm_max_num_timeout=self.cfg.max_num_timeout,
            slurm_python=self.python(),
        )
        executor.update_parameters(**{f"slurm_{k}": v for k, v in self.parameters().items()})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The job must not inherit this shell's Slurm or torchrun variables (a launch from inside a job).
        with submitit.helpers.clean_env():
            return executor.submit(SlurmTrainTask(), self.train_argv)


def flag_value(text: str, tp: Any) -> Any:
    """A cluster flag's text as its key takes it: text keys verbatim (sbatch reads ``64000``, ``[a|b]``
    and ``%j/logs`` as text too), ``null`` unsets; numbers as YAML, so ``--time 240`` is an int."""
    if text == "null":
        return None
    if str in (typing.get_args(tp) or (tp,)):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # from_dict then names the key and the value it expected


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The launcher's options and the cluster flags that were given (as a partial SlurmConfig)."""
    parser = cli.Parser(
        prog="python -m launch.slurm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--gpus 8` must not pass for --gpus-per-node
    )
    parser.add_argument("--slurm-config", help="YAML file of cluster settings (configs/slurm/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("--config", help="the trainer's YAML config, passed through")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the trainer's overrides, passed through")
    cluster = parser.add_argument_group("cluster settings (override --slurm-config)")
    hints = typing.get_type_hints(SlurmConfig)
    for f in dataclasses.fields(SlurmConfig):
        many = typing.get_origin(hints[f.name]) is tuple
        cluster.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"slurm.{f.name}",
            metavar="VALUE",
            action="append" if many else "store",
            help=f.metadata["help"].replace("%", "%%") + (" (repeatable)" if many else ""),
        )
    args = parser.parse_intermixed_args(argv)
    flags = {}
    for key, value in vars(args).items():
        if key.startswith("slurm.") and value is not None:
            name = key.removeprefix("slurm.")
            flags[name] = value if isinstance(value, list) else flag_value(value, hints[name])
    return args, flags


def prepare(args: argparse.Namespace, flags: dict[str, Any]) -> Submission:
    """Check both configs here, before anything reaches the queue."""
    cfg = read_slurm_config(args.slurm_config, flags)
    train_argv = (["--config", args.config] if args.config else []) + list(args.overrides)
    run_dir = Path(load_config(args.config, args.overrides).run_dir).resolve()
    folder = Path(cfg.folder).resolve() if cfg.folder else run_dir / "slurm" / "%j"
    return Submission(cfg, train_argv, run_dir, folder)


def main(argv: Sequence[str] | None = None) -> int:
    args, flags = parse_args(argv)
    try:
        sub = prepare(args, flags)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    cfg = sub.cfg
    layout = (
        f"{cfg.nodes} node(s) x {cfg.tasks} task(s), {cfg.gpus_per_node} GPU(s) per node, "
        f"{cfg.time} min, partition {cfg.partition or '(default)'}"
    )
    if args.dry_run:
        print(sub.sbatch_script(), end="")
        print(
            f"# dry run, nothing submitted: {layout}\n"
            f"# each task calls gan_dist.train.main({sub.train_argv!r}); run_dir {sub.run_dir}",
            file=sys.stderr,
        )
        return 0
    if shutil.which("sbatch") is None:
        print("no Slurm here: sbatch is not on PATH (--dry-run works anywhere)", file=sys.stderr)
        return EXIT_NO_SLURM
    try:
        job = sub.submit()
    except FailedJobError as e:
        print(f"sbatch refused the job: {e}", file=sys.stderr)
        return EXIT_NO_SLURM
    log = job.task(0).paths.stdout
    print(
        f"submitted job {job.job_id}: {layout}\n"
        f"  run_dir  {sub.run_dir}\n"
        f"  logs     {log} (rank 0; {log.with_suffix('.err').name} and the other ranks' beside it)\n"
        f"  follow   tail -f {log}   |   squeue -j {job.job_id}   |   sacct -j {job.job_id}\n"
        f"  stop     scancel {job.job_id}; the same command again resumes from run_dir's checkpoint",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
