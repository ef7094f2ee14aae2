"""Two-node Slurm jobs on a real multi-host cluster: hosts are network namespaces (tests/hosts.py).

The module's fixture makes hosts node1 and node2 and starts a second, separate Slurm cluster in
them with ``.ci/local_slurm.sh hosts-start``: slurmdbd and slurmctld on node1, a slurmd on each host
under its own name and address (10.231.0.k), munged and MariaDB shared through their unix sockets.
Every host sees that cluster's configuration at /etc/slurm (a bind mount of its own), and its
controller is reachable only from the hosts, so jobs are submitted on node1 (the script's ``run-on
node1``), with ``python -m launch.slurm --nodes 2 --tasks-per-node 1`` as a user there would. This
process stays in the root namespace; it watches the jobs with submitit and test_slurm's helpers,
whose ``sacct``, ``squeue``, ``sbatch`` and ``scancel`` are the script's wrappers (first on PATH),
each of which runs the real command on node1. The daemons stop and the hosts go when the module
ends, also on failure.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit
from conftest import REPO
from hosts import CLUSTER_NET, Host, Hosts, unavailable
from submitit.helpers import TorchDistributedEnvironment
from test_slurm import PREEMPTED_STEPS as STEPS
from test_slurm import Run, log_of, mnist_root, preempted_and_resumed, trains_20_steps, wait_for  # noqa: F401

SCRIPT = REPO / ".ci/local_slurm.sh"
WRAPPERS = Path("/run/gan_dist-slurm-hosts/bin")
"""Written by hosts-start: ``run-on HOST CMD...``, and sbatch, squeue, sacct, scontrol, scancel, sinfo run on node1."""
EXIT_NO_PACKAGES = 3
"""hosts-start's status when Slurm is missing and cannot be installed."""
UP_S = 300  # a fresh machine installs the packages first (about 10-20 s), then starts in about 2 s
DOWN_S = 120
TWO_NODES = ("--nodes", "2", "--tasks-per-node", "1")

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def _script(command: str, *args: str, log: Path, timeout: float) -> int:
    """``.ci/local_slurm.sh COMMAND ARGS``, its output appended to ``log`` (a file, not a pipe: the
    daemons it starts must not hold our end open)."""
    with log.open("a") as out:
        return subprocess.run(["bash", str(SCRIPT), command, *args], stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Host]]:
    """node1 and node2, each a Slurm node of the cluster ``hosts``; node1 also its controller."""
    reason = unavailable() or next((f"no `{t}` here (util-linux)" for t in ("nsenter", "unshare")
                                    if shutil.which(t) is None), None)
    if reason:
        pytest.skip(f"no hosts for a multi-host cluster: {reason}")
    log = tmp_path_factory.mktemp("slurm_hosts") / "local_slurm.log"
    with Hosts(2) as nodes, pytest.MonkeyPatch.context() as mp:
        try:
            started = time.monotonic()
            status = _script("hosts-start", *(f"{h.name}={h.ns}@{h.addr}" for h in nodes), log=log, timeout=UP_S)
            if status == EXIT_NO_PACKAGES:
                pytest.skip(f"Slurm is not installed and could not be: {log.read_text()[-2000:]}")
            assert status == 0, f"hosts-start failed ({status}):\n{log.read_text()[-4000:]}"
            print(f"hosts cluster up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            mp.setenv("PATH", f"{WRAPPERS}{os.pathsep}{os.environ['PATH']}")
            yield nodes
        finally:
            started = time.monotonic()
            _script("hosts-stop", log=log, timeout=DOWN_S)
            print(f"hosts cluster down in {time.monotonic() - started:.1f}s", file=sys.stderr)


class HostsRun(Run):
    """A run_dir whose two-node jobs are submitted on node1; the jobs it leaves are cancelled."""

    def __init__(self, run_dir: Path, data: Path, head: Host) -> None:
        super().__init__(run_dir, data)
        self.head = head

    def argv(self, max_steps: int, *extra: str) -> list[str]:
        return super().argv(max_steps, *TWO_NODES, *extra)

    def submit(self, max_steps: int, *extra: str) -> submitit.Job:
        """``python -m launch.slurm`` on node1; the job inherits this environment, less the wrappers."""
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(WRAPPERS))
        env = os.environ | {"PATH": path, "OMP_NUM_THREADS": "1"}
        argv = [str(WRAPPERS / "run-on"), self.head.name, sys.executable, "-m", "launch.slurm",
                *self.argv(max_steps, *extra)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert re.search(r"^submitted job \d+: 2 node\(s\) x 1 task\(s\)", out.stdout, re.MULTILINE), out.stdout
        return self.track(out.stdout)


@pytest.fixture
def run(cluster: list[Host], tmp_path: Path, mnist_root: Path) -> Iterator[HostsRun]:  # noqa: F811
    run = HostsRun(tmp_path / "run", mnist_root, cluster[0])
    yield run
    for job in run.jobs:
        subprocess.run(["scancel", job.job_id], check=False, timeout=30)


def node_lists(job: submitit.Job) -> list[str]:
    """The nodes of each run of the job, requeues included."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "--parsable2", "-j", job.job_id, "-o", "NodeList"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.split()


def task_process(host: Host, job: submitit.Job, rank: int) -> tuple[int, dict[str, str]]:
    """The PID of the job's task ``rank`` on ``host``, and the environment Slurm started it with."""
    for pid in host.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        env = dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)
        if b"submitit.core._submit" in cmdline and env.get("SLURM_JOB_ID") == job.job_id \
                and env.get("SLURM_PROCID") == str(rank):
            return pid, env
    pytest.fail(f"no task {rank} of job {job.job_id} on {host.name}\n{log_of(job)}")


def rendezvous_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT as launch.slurm's task exports them, from the task's own Slurm
    environment (the task sets them in its process, where /proc cannot show them)."""
    with monkeypatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_", "MASTER_"))]:
            mp.delenv(key)
        for key, value in env.items():
            if key.startswith(("SLURM_", "SUBMITIT_")):
                mp.setenv(key, value)
        rendezvous = TorchDistributedEnvironment()
    return rendezvous.master_addr, rendezvous.master_port


def endpoint(text: str) -> str:
    """``ss``'s ``addr:port`` with an IPv4-mapped IPv6 address (``[::ffff:10.231.0.1]:29500``) as IPv4."""
    addr, _, port = text.rpartition(":")
    ip = ipaddress.ip_address(addr.strip("[]"))
    return f"{getattr(ip, 'ipv4_mapped', None) or ip}:{port}"


def peers(host: Host, pid: int) -> set[str]:
    """The far ends of the established TCP connections of process ``pid`` on ``host``."""
    out = host.run(["ss", "-Htnp", "state", "established"], timeout=30)
    assert out.returncode == 0, out.stderr
    return {endpoint(cols[3]) for cols in map(str.split, out.stdout.splitlines()) if f"pid={pid}," in cols[-1]}


def test_two_node_job_trains_across_the_hosts(run: HostsRun) -> None:
    """One rank on each host, gloo between them: 20 steps, a checkpoint and metrics, on node[1-2]."""
    job = trains_20_steps(run)
    assert "world size 2 on cpu (gloo process group)" in job.task(0).stdout()
    assert node_lists(job) == ["node[1-2]"]
    for rank, host in enumerate(("node1", "node2")):
        assert f"hostname={host}, local_rank=0(1), node={rank}(2), global_rank={rank}(2)" in job.task(rank).stdout()
    # The script that was submitted, which --dry-run showed, is the two-node one.
    script = job.paths.submission_file.read_text().splitlines()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script


def test_preempted_two_node_job_is_requeued_and_resumes(run: HostsRun, cluster: list[Host], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 on node2 meets rank 0 at node1's address; an `urgent` job preempts the two-node job:
    USR2 on both hosts, save, requeue, resume at the saved step, finish, all in one W&B run."""
    node1, node2 = cluster
    job = run.submit(STEPS, "log.wandb.mode=offline")
    wait_for("training to start", lambda: bool(run.logged_steps()), 180, job)

    # The rank on node2 was given node1 as MASTER_ADDR, which resolves there to node1's address, and
    # it holds its store connection to that address and MASTER_PORT: not a loopback address.
    pid, env = task_process(node2, job, rank=1)
    assert env["SLURMD_NODENAME"] == "node2" and env["SLURM_JOB_NODELIST"] == "node[1-2]"
    master_addr, master_port = rendezvous_of(env, monkeypatch)
    assert master_addr == "node1"
    resolved = node2.run(["getent", "hosts", master_addr], timeout=30).stdout.split()
    assert resolved[:1] == [node1.addr], resolved
    far = peers(node2, pid)
    assert f"{node1.addr}:{master_port}" in far, far
    assert all(peer.startswith(f"{CLUSTER_NET}.") for peer in far), far  # gloo's pairs too: no loopback

    # Both nodes are taken: the urgent job can only run by preempting ours.
    saved, run_ids = preempted_and_resumed(run, job, STEPS, "--nodes=2 --ntasks-per-node=1 --cpus-per-task=2",
                                           tmp_path / "urgent.out")
    assert node_lists(job) == ["node[1-2]", "node[1-2]"]
    # Every step logged once, in order: every 10 steps, and the stop's own step; the resumed run
    # picks up after that record.
    assert run.logged_steps() == sorted({*range(10, STEPS + 1, 10), saved})
    # Each of the two runs of the job wrote its offline files under that one run id.
    offline = sorted(p.name for p in (run.dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {name.rpartition("-")[2] for name in offline} == run_ids, offline
