"""The Slurm launcher: its dry run anywhere, real jobs on the cluster of .ci/local_slurm.sh.

Cluster tests submit through ``launch.slurm.main``, as a user would, to a real slurmctld/slurmd with
accounting; they skip, saying why, where no such cluster answers. Every test has a fresh run_dir
(which holds its submitit folder), every wait on a job its own timeout, and the jobs a test leaves
are cancelled. The multi-node torchrun script is tested with two agents on this host.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import submitit
import torch
from conftest import REPO, base_overrides, complete_records, exited, saved_steps, wait_until, workers, write_mnist
from submitit.core.utils import JobPaths, UncompletedJobError
from submitit.slurm.slurm import _make_sbatch_string
from torch.distributed import TCPStore

from launch import slurm

pytestmark = pytest.mark.integration  # starts processes or services

LOCAL = str(REPO / "configs/slurm/local.yaml")
N_IMAGES = 2000  # 125 steps per epoch at 2 ranks x batch 8: no epoch ends mid-test to write samples
TASKS = (0, 1)
OVER_WITHIN_S = 60
"""How long Slurm may take to report a job over once its tasks are gone: well under
``slurm.STOPPED_WAIT_S``, so a task left waiting out its stop fails the wait."""
EVERY_KEY = (
    "--gpus-per-node 2 --tasks-per-node null --account lab --qos high --constraint h100 --sbatch exclusive "
    "--sbatch reservation=big --setup 'module load cuda' --srun-args=--cpu-bind=none"
)
"""Flags that, over the local cluster's settings, give every parameter the launcher can hand submitit."""
PREEMPTED_STEPS = 1000
"""A preempted job's length: over a minute of training here, so the preemption (the scheduler decides
every 5 s, after the test's own checks) finds it still running on a machine several times faster."""
RENDERER_CHANGED = (
    "launch/slurm.py's --dry-run renders the sbatch script with submitit's private "
    "submitit.slurm.slurm._make_sbatch_string, as SlurmExecutor does when it submits (there is no public "
    f"way to render it without submitting); submitit {submitit.__version__} changed that"
)
"""What a failure of the renderer checks means: say it first, so that an upgrade of submitit is not
mistaken for a bug in the launcher. The fix: Submission.sbatch_script, then pyproject.toml's range."""


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"), N_IMAGES)


def train_overrides(run_dir: Path, data: Path, max_steps: int) -> list[str]:
    """A tiny run: small MLPs, batch 8, metrics every 10 steps, saves only at the end or at a stop."""
    return base_overrides(run_dir, data, **{
        "train.batch_size": 8, "train.max_steps": max_steps, "train.epochs": 10**6, "log.every_steps": 10,
        "model.mlp.g_hidden": "[32]", "model.mlp.d_hidden": "[32]",
    })  # fmt: skip


def launch(argv: list[str]) -> str:
    """``python -m launch.slurm ARGV`` in this process; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = slurm.main(argv)
    assert status == 0, out.getvalue()
    return out.getvalue()


def dry_run(flags: str, run_dir: Path) -> str:
    """The sbatch script for the local cluster's settings, with ``flags`` over them."""
    return launch(["--slurm-config", LOCAL, "--dry-run", *shlex.split(flags), f"run_dir={run_dir}"])


# ---------------------------------------------------------------------------------- no cluster needed


def test_dry_run_prints_the_cpu_job_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = dry_run("", tmp_path / "run").splitlines()
    for option in ("ntasks-per-node=2", "cpus-per-task=1", "partition=debug", "signal=USR2@30", "time=10"):
        assert f"#SBATCH --{option}" in script
    assert not [line for line in script if "gpu" in line]
    assert script[-1].endswith(f"-m submitit.core._submit {tmp_path / 'run' / 'slurm' / '%j'}")
    assert f"train.main(['run_dir={tmp_path / 'run'}'])" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_flags_override_the_yaml_and_extras_reach_sbatch(tmp_path: Path) -> None:
    script = dry_run(
        "--nodes 2 --gpus-per-node 4 --tasks-per-node null --partition gpu --time 240 --account lab "
        "--qos high --constraint h100 --sbatch exclusive --sbatch reservation=big --setup 'module load cuda'",
        tmp_path,
    )
    for option in ("nodes=2", "gpus-per-node=4", "ntasks-per-node=4", "partition=gpu", "time=240",
                   "account=lab", "qos=high", "constraint=h100", "exclusive", "reservation=big"):  # fmt: skip
        assert f"#SBATCH --{option}" in script.splitlines()
    assert "\nmodule load cuda\n" in script


def test_apptainer_runs_each_task_in_the_image(tmp_path: Path) -> None:
    flags = "--gpus-per-node 2 --apptainer-image /images/gan_dist.sif --container-mounts /datasets"
    script = dry_run(flags, tmp_path)
    binds = ",".join([os.getcwd(), str(tmp_path), str(tmp_path / "slurm"), "/datasets"])
    assert f"apptainer exec --nv --bind {binds} /images/gan_dist.sif python3 -u -m submitit.core._submit" in script


def test_pyxis_runs_each_task_in_the_image(tmp_path: Path) -> None:
    script = dry_run("--pyxis-image nvcr.io#nvidia/pytorch:24.05-py3", tmp_path)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun
    assert f"--container-mounts={os.getcwd()}:{os.getcwd()},{tmp_path}:{tmp_path}," in srun
    assert f"--container-workdir={os.getcwd()} python3 -u -m submitit.core._submit" in srun


def test_help_names_every_cluster_key(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        slurm.main(["--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    for key in slurm.SlurmConfig.__dataclass_fields__:
        assert f"--{key.replace('_', '-')} VALUE" in shown


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--gpus-per-node 0 --tasks-per-node null", "tasks_per_node: required when gpus_per_node=0"),
        ("--gpus-per-node 4 --tasks-per-node 2", "one task per GPU"),
        ("--time 1", "time: 1 min leaves no room"),
        ("--nodes 0", "nodes: expected values >= 1"),
        ("--apptainer-image a.sif --pyxis-image b", "choose one container runtime"),
        ("train.batch_size=0", "train.batch_size: expected values >= 1"),
        ("--sbatch time=1", "sbatch: 'time=1' is set by its own key, time (--time)"),
        ("--sbatch=--gpus-per-node=8", "sbatch: '--gpus-per-node=8' is set by its own key, gpus_per_node"),
        ("--time '%j'", "time: expected int, got '%j'"),
    ],
)
def test_bad_settings_stop_before_submitting(flags: str, message: str, capsys: pytest.CaptureFixture) -> None:
    assert slurm.main(["--slurm-config", LOCAL, "--dry-run", *shlex.split(flags)]) == slurm.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags", ["--gpus 8", "--part debug", "--nodes"])
def test_unknown_or_shortened_flags_are_usage_errors(flags: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        slurm.main(["--slurm-config", LOCAL, "--dry-run", *shlex.split(flags)])
    err = capsys.readouterr().err
    assert exit.value.code == slurm.EXIT_USAGE and len(err.splitlines()) == 1
    assert err.startswith("python -m launch.slurm: error: ") and err.endswith(" (see --help)\n")


def test_values_sbatch_takes_as_text_pass_through(tmp_path: Path) -> None:
    script = dry_run(f"--mem 64000 --constraint '[a100|h100]' --folder '{tmp_path}/%j/logs'", tmp_path).splitlines()
    assert "#SBATCH --mem=64000" in script and "#SBATCH --constraint='[a100|h100]'" in script
    assert f"#SBATCH --output={tmp_path}/%j/logs/%j_0_log.out" in script


def test_submitits_private_renderer_takes_every_parameter_the_launcher_gives(tmp_path: Path) -> None:
    sub = slurm.prepare(*slurm.parse_args(["--slurm-config", LOCAL, *shlex.split(EVERY_KEY), f"run_dir={tmp_path}"]))
    given = sub.parameters()
    # A key that Submission.parameters gains must be given here too, or this check would not see it.
    assert set(given) == {
        "job_name", "nodes", "ntasks_per_node", "cpus_per_task", "time", "signal_delay_s", "gpus_per_node", "mem",
        "partition", "account", "qos", "constraint", "setup", "srun_args", "additional_parameters",
    }, "Submission.parameters gives a new key: add a flag that sets it to EVERY_KEY"  # fmt: skip
    accepted = inspect.signature(_make_sbatch_string).parameters
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = sorted(k for k in ["command", "folder", *given] if k not in accepted or accepted[k].kind not in by_name)
    assert not missing, f"{RENDERER_CHANGED}: it no longer takes {missing} by name"


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``sbatch`` and ``srun`` stand-ins first on PATH: sbatch takes any script as job 4242 and runs nothing;
    srun only has to exist (submitit will not make a Slurm executor without it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": "echo 'Submitted batch job 4242'", "srun": "exit 1"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return "4242"


@pytest.mark.parametrize(
    "flags",
    ["", EVERY_KEY, "--gpus-per-node 2 --apptainer-image /images/gan_dist.sif --container-mounts /datasets",
     "--pyxis-image nvcr.io#nvidia/pytorch:24.05-py3"],
    ids=["local", "every-key", "apptainer", "pyxis"],
)
def test_dry_run_is_the_script_submitit_submits(flags: str, tmp_path: Path, fake_sbatch: str) -> None:
    """Without a cluster: the launcher submits through submitit to a stand-in sbatch, and the script that
    submitit wrote for it is the one --dry-run prints. On the cluster, the two-task job checks it again."""
    argv = ["--slurm-config", LOCAL, *shlex.split(flags), f"run_dir={tmp_path / 'run'}"]
    try:
        printed = launch([*argv, "--dry-run"])
        out = launch(argv)
    except (TypeError, ValueError) as e:  # a parameter that submitit's renderer or executor refuses
        pytest.fail(f"{RENDERER_CHANGED}: {type(e).__name__}: {e}")
    assert re.search(rf"^submitted job {fake_sbatch}:", out, re.MULTILINE), out
    submitted = JobPaths(tmp_path / "run/slurm/%j", job_id=fake_sbatch).submission_file.read_text()
    assert printed == submitted, f"{RENDERER_CHANGED}: the script it submits is not the one --dry-run prints"


@pytest.fixture
def rendezvous() -> Iterator[str]:
    """A c10d rendezvous endpoint served by this test, on a port the OS chose and this process holds.

    The agents find the port taken and join the store as clients; no other process can take the port
    between choosing it and binding it, as it could with a port picked first and bound later.
    """
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield f"127.0.0.1:{store.port}"
    del store


@pytest.fixture
def two_nodes(tmp_path: Path, rendezvous: str, start: Callable[..., subprocess.Popen]
              ) -> Callable[..., list[subprocess.Popen]]:
    """``two_nodes(args, **env)``: launch/torchrun_multinode.sh twice, two one-rank "nodes" on this host that
    meet at this test's rendezvous; killed, ranks included, after the test."""
    settings = {"NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": rendezvous, "RUN_ID": tmp_path.name,
                "PYTHON": sys.executable}

    def launch(args: Sequence[str], **env: str) -> list[subprocess.Popen]:
        return [start([REPO / "launch/torchrun_multinode.sh", *args], **settings | env) for _ in range(2)]

    return launch


def both_finish(nodes: list[subprocess.Popen]) -> str:
    """The nodes' output, once both have exited 0."""
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)
    return "".join(logs)


@pytest.mark.slow
def test_torchrun_multinode_script_joins_two_agents(tmp_path: Path, mnist_root: Path,
                                                    two_nodes: Callable[..., list[subprocess.Popen]]) -> None:
    """Two "nodes" on this host, one rank each, meet through the c10d rendezvous and train together."""
    assert "world size 2" in both_finish(two_nodes(train_overrides(tmp_path / "run", mnist_root, 20)))
    assert (tmp_path / "run/checkpoints/step_20.pt").is_file()


@pytest.mark.slow
def test_torchrun_multinode_script_restarts_both_nodes_after_a_kill(
        tmp_path: Path, mnist_root: Path, two_nodes: Callable[..., list[subprocess.Popen]]) -> None:
    """SIGKILL of one node's worker: both agents restart, meet again, and the run resumes and finishes.

    Restart counts are per agent, so the script gives each attempt its own store: without that, a
    restarted rank can read the address a dead peer left in the shared one (pytorch/pytorch#135712).
    """
    run_dir = tmp_path / "run"
    args = [*train_overrides(run_dir, mnist_root, 60), "checkpoint.every_steps=10", "dist.timeout_s=30"]
    nodes = two_nodes(args, MAX_RESTARTS="2")
    wait_until((run_dir / "checkpoints/step_10.pt").exists, "step 10's checkpoint", 240, alive=exited(*nodes))
    os.kill(workers(nodes[1])[0], signal.SIGKILL)
    assert "resuming from" in both_finish(nodes)
    assert (run_dir / "checkpoints/step_60.pt").is_file()


# ------------------------------------------------------------------------------ the real cluster


def cluster_missing() -> str | None:
    """Why the Slurm tests cannot run here, or None."""
    start = "`.ci/local_slurm.sh start` installs and starts one"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"no Slurm client here (sinfo, sbatch); {start}"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%R %t"], capture_output=True, text=True, timeout=30)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} did not answer in 30 s; {start}"
    if nodes.returncode:
        return f"no Slurm controller answers ({nodes.stderr.strip()}); {start}"
    states = dict(line.split() for line in nodes.stdout.splitlines())
    if not {"debug", "urgent"} <= states.keys():
        return f"not the cluster of .ci/local_slurm.sh (partitions: {', '.join(states)})"
    if states["debug"] not in ("idle", "mix", "alloc"):
        return f"the Slurm node is {states['debug']}, not in service; {start}"
    if acct.returncode:
        return f"Slurm accounting is off ({acct.stderr.strip()}): submitit would wait forever on a dead job"
    return None


@pytest.fixture(scope="session")
def cluster() -> None:
    reason = cluster_missing()
    if reason:
        pytest.skip(reason)


class Run:
    """One run_dir, submitted to through the launcher; the jobs it leaves are cancelled."""

    def __init__(self, run_dir: Path, data: Path) -> None:
        self.dir, self.data = run_dir, data
        self.jobs: list[submitit.Job] = []

    def argv(self, max_steps: int, *extra: str) -> list[str]:
        """Launcher arguments; ``extra`` (flags or overrides) come last, so they win."""
        return ["--slurm-config", LOCAL, *train_overrides(self.dir, self.data, max_steps), *extra]

    def submit(self, max_steps: int, *extra: str) -> submitit.Job:
        return self.track(launch(self.argv(max_steps, *extra)))

    def track(self, out: str) -> submitit.Job:
        """The job that the launcher's output ``out`` says it submitted, cancelled after the test."""
        job_id = re.search(r"^submitted job (\d+):", out, re.MULTILINE)
        assert job_id, out
        job = submitit.SlurmJob(folder=self.dir / "slurm" / "%j", job_id=job_id[1], tasks=TASKS)
        self.jobs.append(job)
        return job

    def checkpoints(self) -> list[int]:
        return saved_steps(self.dir)

    def logged_steps(self) -> list[int]:
        return [record["step"] for record in complete_records(self.dir / "metrics.jsonl")]


@pytest.fixture
def run(cluster: None, tmp_path: Path, mnist_root: Path) -> Iterator[Run]:
    run = Run(tmp_path / "run", mnist_root)
    yield run
    for job in run.jobs:
        subprocess.run(["scancel", job.job_id], check=False, timeout=30)


def log_of(job: submitit.Job) -> str:
    paths = job.task(0).paths
    return "".join(p.read_text()[-3000:] for p in (paths.stdout, paths.stderr) if p.exists())


def wait_for(what: str, ready: Callable[[], bool], timeout: float, job: submitit.Job) -> None:
    """``wait_until``, every half second as a poll may ask sacct; a timeout shows the job's state and rank 0's log."""
    wait_until(ready, what, timeout, poll=0.5, detail=lambda: f"job {job.job_id}: {job.state}\n{log_of(job)}")


def finished(job: submitit.Job) -> Callable[[], bool]:
    """Whether every task is done, asking sacct each time (submitit's own polling slows to minutes)."""
    return lambda: all(job.task(t).done(force_check=True) for t in TASKS)


def states(job: submitit.Job) -> list[str]:
    """Every Slurm state the job went through, requeues included ("CANCELLED by 0" counts as CANCELLED)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-D", "--parsable2", "-j", job.job_id, "-o", "State"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [line.split()[0] for line in out.splitlines()]


def in_queue(job: submitit.Job) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True, timeout=30).stdout
    return bool(out.strip())


def requeued_and_over(job: submitit.Job) -> Callable[[], bool]:
    """Whether a job that was requeued has left the queue and every task is done. squeue must agree
    with sacct: between the requeue and the next run, sacct alone once reported the job CANCELLED."""
    done = finished(job)
    return lambda: not in_queue(job) and done()


def over_without_result(job: submitit.Job, reason: str) -> None:
    """The job is reported over within ``OVER_WITHIN_S`` of its tasks' end, and its result is an error matching
    ``reason``: submitit must not wait on a job that wrote none."""
    wait_for("the job to be reported over", finished(job), OVER_WITHIN_S, job)
    with pytest.raises(UncompletedJobError, match=reason):
        job.results()


def trains_20_steps(run: Run) -> submitit.Job:
    """Submit a 20-step run and check that it ran to the end on 2 ranks, as ``--dry-run`` showed it."""
    job = run.submit(20)
    wait_for("the job to finish", finished(job), 240, job)
    assert job.results() == [0, 0], log_of(job)
    assert run.checkpoints() == [20]
    assert run.logged_steps() == [10, 20]
    assert "world size 2 on cpu" in job.task(0).stdout()
    # --dry-run shows exactly the script that was submitted.
    assert launch([*run.argv(20), "--dry-run"]) == job.paths.submission_file.read_text()
    return job


def preempted_and_resumed(run: Run, job: submitit.Job, steps: int, urgent: str, out: Path) -> tuple[int, set[str]]:
    """Preempt the running ``job`` by submitting ``urgent`` (sbatch arguments), then check that it saved,
    was requeued once, resumed at the saved step and finished at ``steps``; returns that step and the
    W&B run ids of its checkpoints (one, asserted)."""
    subprocess.run([*shlex.split(f"sbatch --partition=urgent {urgent} --wrap='sleep 1'"), f"--output={out}"],
                   check=True, timeout=30)
    wait_for("a checkpoint at preemption", lambda: bool(run.checkpoints()), 60, job)
    saved = run.checkpoints()[0]
    assert saved < steps
    wait_for("the requeued job to finish", requeued_and_over(job), 480, job)
    assert job.results() == [0, 0], f"{states(job)}\n{log_of(job)}"
    assert run.checkpoints() == [saved, steps]
    assert f"resuming from {run.dir}/checkpoints/step_{saved}.pt at step {saved} " in job.task(0).stdout()
    assert states(job)[:-1] == ["REQUEUED"]  # once; the last run may still be leaving
    run_ids = {torch.load(run.dir / f"checkpoints/step_{s}.pt", weights_only=True)["run"]["wandb_run_id"]
               for s in (saved, steps)}
    assert len(run_ids) == 1 and None not in run_ids
    return saved, run_ids


@pytest.mark.slurm
def test_two_task_cpu_job_trains_to_the_end(run: Run) -> None:
    trains_20_steps(run)


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_resumes(run: Run, tmp_path: Path) -> None:
    """A job in the `urgent` partition preempts ours: USR2, save, requeue, resume, finish; same W&B run."""
    job = run.submit(PREEMPTED_STEPS, "log.wandb.mode=offline")
    wait_for("training to start", lambda: bool(run.logged_steps()), 180, job)
    preempted_and_resumed(run, job, PREEMPTED_STEPS, "--ntasks=1 --cpus-per-task=2", tmp_path / "urgent.out")


@pytest.mark.slurm
@pytest.mark.slow
def test_timeout_requeues_and_resumes(run: Run) -> None:
    """At 2 min, USR2 comes 30 s (plus up to a minute) before the limit: save, requeue, resume.

    The resumed run would time out again; the fixture cancels it once it has shown the resume."""
    job = run.submit(100_000, "--time", "2")
    wait_for("a checkpoint before the time limit", lambda: bool(run.checkpoints()), 180, job)
    saved = run.checkpoints()[0]
    resumed = f"resuming from {run.dir}/checkpoints/step_{saved}.pt at step {saved} "
    wait_for("the requeued job to resume", lambda: resumed in (job.task(0).stdout() or ""), 120, job)
    assert "this job is timed-out" in job.task(0).stderr()
    assert states(job)[0] == "REQUEUED"


@pytest.mark.slurm
def test_cancelled_job_saves_and_is_not_requeued(run: Run) -> None:
    """scancel's SIGTERM stops the trainer with a checkpoint, and the job stays cancelled."""
    job = run.submit(100_000)
    wait_for("training to start", lambda: bool(run.logged_steps()), 180, job)
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    over_without_result(job, "CANCELLED")
    # Once no task is left, none can requeue the job: it must be gone from the queue, not pending again.
    wait_for("the job to leave the queue", lambda: not in_queue(job), 60, job)
    assert states(job) == ["CANCELLED"]
    assert len(run.checkpoints()) == 1
    assert "stopped by signal (" in job.task(0).stdout()


def task_pids(job: submitit.Job) -> list[int]:
    """The PIDs of the job's tasks (step 0, one per rank) on this node."""
    out = subprocess.run(["scontrol", "listpids", job.job_id], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    return [int(row[0]) for row in rows if row[2] == "0" and row[3] != "-"]


@pytest.mark.slurm
def test_killed_job_is_reported_failed_within_seconds(run: Run) -> None:
    """Every rank dies by SIGKILL (as by the OOM killer): no result is written, sacct says FAILED."""
    job = run.submit(100_000)
    wait_for("the tasks to start", lambda: len(task_pids(job)) == len(TASKS), 120, job)
    for pid in task_pids(job):
        os.kill(pid, signal.SIGKILL)
    over_without_result(job, r"has not produced any output \(state: FAILED\)")
