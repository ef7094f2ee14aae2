"""Training across hosts: node1, node2 as network namespaces (tests/hosts.py), one torchrun agent on each
through launch/torchrun_multinode.sh with the c10d rendezvous at node1, and the faults of a real cluster:
a host that dies, a partition, rank 0's host dying mid-save, a slow link. Every wait has a deadline."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    REPO,
    assert_same_weights,
    base_overrides,
    saved_steps,
    wait_for_checkpoint,
    wait_until,
    workers,
    write_mnist,
)
from hosts import CLUSTER_NET, Host, Hosts, unavailable

from gan_dist import cli
from gan_dist.checkpoint import load_file

pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.skipif((why := unavailable()) is not None, reason=f"no hosts: {why}")]

STEPS = 30
TIMEOUT_S = 15
"""dist.timeout_s of these runs: a rank waits this long for a silent peer."""
EXIT_MARGIN_S = 10
"""What a rank may take beyond TIMEOUT_S to notice, say why, and exit."""
CUT_OFF_HOST_S = 150
"""How long every process of a host cut off from the rendezvous may outlive the cut, torchrun's agent
included: its ranks end after TIMEOUT_S, and the launcher kills an agent that stays blocked on the
unreachable store a minute later."""
RDZV = f"{CLUSTER_NET}.1:29400"


def overrides(run_dir: Path, root: Path, **extra: object) -> list[str]:
    """A small run whose ranks use one thread each, so 1×2 and 2×1 compute alike to the bit."""
    return base_overrides(run_dir, root, **{"train.max_steps": STEPS, "checkpoint.every_steps": 5,
                                            "dist.timeout_s": TIMEOUT_S, "dist.threads": 1} | extra)


ENDLESS = {"train.max_steps": 10**6, "train.epochs": 10**6}
"""A run that cannot finish before a fault lands."""


@dataclass
class Agent:
    """One host's torchrun agent, its output in a file (a pipe could fill and stall it)."""

    host: Host
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.host.name}'s agent still running after {timeout:.0f}s:\n{self.text()[-3000:]}")

    def ranks(self) -> list[int]:
        """The agent's running ranks (its other children come and go: the launcher's route lookup)."""
        alive = []
        for pid in workers(self.proc):
            with contextlib.suppress(OSError):
                if b"gan_dist.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    alive.append(pid)
        return alive

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def agent(host: Host, args: Sequence[str], log: Path, nnodes: int = 2, nproc: int = 1, **env: str) -> Agent:
    base = os.environ | {"PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                         "NNODES": str(nnodes), "NPROC_PER_NODE": str(nproc), "RDZV_ENDPOINT": RDZV,
                         "RUN_ID": log.parent.name}
    with open(log, "ab") as out:
        proc = host.popen(["bash", REPO / "launch" / "torchrun_multinode.sh", *args], env=base | env, cwd=REPO,
                          stdout=out, stderr=subprocess.STDOUT)
    return Agent(host, proc, log)


def start(hosts: Sequence[Host], args: Sequence[str], logs: Path, tag: str, **env: str) -> list[Agent]:
    logs.mkdir(parents=True, exist_ok=True)
    return [agent(h, args, logs / f"{tag}-{h.name}.log", len(hosts), **env) for h in hosts]


def finish(agents: Sequence[Agent], timeout: float = 240) -> None:
    for a in agents:
        code = a.wait(timeout)
        assert code == 0, f"{a.host.name} exited {code}:\n{a.text()[-3000:]}"


def ended(agents: Sequence[Agent]) -> Callable[[], str | None]:
    """``wait_until``'s ``alive``: the first agent to exit, with its log."""

    def why() -> str | None:
        for a in agents:
            if a.proc.poll() is not None:
                return f"{a.host.name}'s agent exited {a.proc.returncode}:\n{a.text()[-3000:]}"
        return None

    return why


def endless(hosts: Sequence[Host], run_dir: Path, data: Path, logs: Path, tag: str, saved: int) -> list[Agent]:
    """The agents of a run that cannot finish before a fault lands, once step ``saved``'s checkpoint is on
    disk: the fault strikes a run that has something to resume from."""
    agents = start(hosts, overrides(run_dir, data, **ENDLESS), logs, tag)
    wait_for_checkpoint(run_dir, saved, 180, ended(agents))
    return agents


def ranks_gone_after(agents: Sequence[Agent], since: float, timeout: float) -> list[float]:
    """Seconds from ``since`` until each agent had no rank left running."""
    gone: dict[int, float] = {}

    def all_gone() -> bool:
        for i, a in enumerate(agents):
            if i not in gone and not a.ranks():
                gone[i] = time.monotonic() - since
        return len(gone) == len(agents)

    wait_until(all_gone, "the end of every rank after the fault", since + timeout - time.monotonic(),
               detail=lambda: "still running on " + ", ".join(a.host.name for i, a in enumerate(agents)
                                                               if i not in gone))
    return [gone[i] for i in range(len(agents))]


def partial_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(".*.tmp*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("multihost") / "data")


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    with Hosts(2) as made:
        yield made


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The final checkpoint of an undisturbed 2 hosts × 1 rank run, which every recovery must reproduce."""
    work = tmp_path_factory.mktemp("straight")
    with Hosts(2) as made:
        finish(start(made, overrides(work / "run", data), work / "logs", "straight"))
    return work / "run" / "checkpoints" / f"step_{STEPS}.pt"


def test_two_hosts_match_one_host_with_two_ranks(tmp_path, data, straight):
    with Hosts(1) as (node1,):
        one = agent(node1, overrides(tmp_path / "one", data), tmp_path / "one.log", nnodes=1, nproc=2)
        finish([one])
    assert "world size 2" in one.text()
    assert_same_weights(straight, tmp_path / "one" / "checkpoints" / f"step_{STEPS}.pt")


@pytest.mark.parametrize("side", [1, 2])
def test_ranks_talk_over_the_interface_that_reaches_the_rendezvous_host(tmp_path, data, side):
    """Host ``side`` has two networks and resolves its own name to the one that reaches nobody, which is
    also its first interface. Its ranks get the interface that routes to node1, and the run trains.
    On node1 this also needs the launcher to tell torchrun that the rendezvous address is its own: by
    hostname alone, torchrun serves no rendezvous there and every agent times out."""
    with Hosts(2, side=side) as made:
        host = made[side - 1]
        for target, expected in ((RDZV.partition(":")[0], f"eth1 {'local' if side == 1 else 'remote'}"),
                                 (host.name, "eth0 local")):
            picked = host.run([sys.executable, REPO / "launch" / "netif.py", target])
            assert picked.stdout.strip() == expected, (target, picked.stdout, picked.stderr)
        agents = start(made, overrides(tmp_path / "run", data, **{"train.max_steps": 6}), tmp_path, "routed")
        wait_until(agents[side - 1].ranks, f"a rank on {made[side - 1].name}", 180, alive=ended(agents))
        environ = Path(f"/proc/{agents[side - 1].ranks()[0]}/environ").read_bytes().split(b"\0")
        assert {b"GLOO_SOCKET_IFNAME=eth1", b"NCCL_SOCKET_IFNAME=eth1"} <= set(environ)
        finish(agents)


def test_a_dead_host_ends_the_run_within_the_timeout_and_a_relaunch_resumes_bit_exactly(
        tmp_path, data, hosts, straight):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    agents = endless(hosts, run_dir, data, logs, "killed", saved=10)
    t0 = time.monotonic()
    hosts[1].kill()
    (rank0_gone,) = ranks_gone_after(agents[:1], t0, TIMEOUT_S + EXIT_MARGIN_S)
    code = agents[0].wait(EXIT_MARGIN_S)
    print(f"node2 killed: node1's rank exited after {rank0_gone:.1f}s, its agent after {time.monotonic() - t0:.1f}s")
    assert code != 0
    text = agents[0].text()
    assert f"exit {cli.EXIT_LOST_PEER}" in text or f"exitcode  : {cli.EXIT_LOST_PEER}" in text, text[-3000:]
    assert "error (rank 0): lost a peer: a collective failed" in text and f"{CLUSTER_NET}.2" in text, text[-3000:]

    finish(start(hosts, overrides(run_dir, data), logs, "relaunch"))
    assert "resuming from" in (logs / "relaunch-node1.log").read_text()
    assert_same_weights(straight, run_dir / "checkpoints" / f"step_{STEPS}.pt")


def test_with_max_restarts_a_relaunched_host_rejoins_and_the_job_finishes(tmp_path, data, hosts, straight):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = overrides(run_dir, data)
    agents = start(hosts, args, logs, "elastic", MAX_RESTARTS="1")
    wait_for_checkpoint(run_dir, 10, 180, ended(agents))
    hosts[1].kill()
    wait_until(lambda: not agents[0].ranks(), "the end of node1's rank", TIMEOUT_S + EXIT_MARGIN_S,
               alive=ended(agents[:1]))
    time.sleep(2)
    assert agents[0].proc.poll() is None, f"node1's agent gave up:\n{agents[0].text()[-3000:]}"
    rejoined = agent(hosts[1], args, logs / "rejoin-node2.log", MAX_RESTARTS="1")
    finish([agents[0], rejoined])
    assert "resuming from" in agents[0].text()
    assert_same_weights(straight, run_dir / "checkpoints" / f"step_{STEPS}.pt")


def test_a_partition_ends_every_rank_within_the_timeout_and_leaves_complete_checkpoints(tmp_path, data, hosts):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    agents = endless(hosts, run_dir, data, logs, "cut", saved=10)
    t0 = time.monotonic()
    hosts[1].link(up=False)
    gone = ranks_gone_after(agents, t0, TIMEOUT_S + EXIT_MARGIN_S)
    code = agents[0].wait(EXIT_MARGIN_S)
    agent1_gone = time.monotonic() - t0
    cut_off = agents[1].wait(t0 + CUT_OFF_HOST_S - time.monotonic())
    agent2_gone = time.monotonic() - t0
    while (left := hosts[1].pids()) and time.monotonic() < t0 + CUT_OFF_HOST_S:
        time.sleep(0.1)
    print(f"node2 cut off: ranks gone after {gone[0]:.1f}s (node1) and {gone[1]:.1f}s (node2), agents after "
          f"{agent1_gone:.1f}s (node1) and {agent2_gone:.1f}s (node2), node2 empty after {time.monotonic() - t0:.1f}s")
    assert not left, f"node2 still runs {left} {CUT_OFF_HOST_S}s after the cut"
    assert gone[0] >= TIMEOUT_S - 1, "a silent peer is waited for dist.timeout_s"
    assert code != 0 and cut_off != 0
    for a in agents:
        assert "lost a peer: a collective failed" in a.text(), a.text()[-3000:]
    assert "torchrun, blocked on the rendezvous store that this node cannot reach" in agents[1].text()
    assert not partial_files(run_dir)
    newest = saved_steps(run_dir)[-1]
    assert load_file(run_dir / "checkpoints" / f"step_{newest}.pt")["step"] == newest


def test_rank0s_host_dying_mid_save_keeps_the_previous_checkpoint(tmp_path, data, hosts, straight):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    agents = endless(hosts, run_dir, data, logs, "save", saved=5)
    wait_until(lambda: partial_files(run_dir), "a save in progress", 180, poll=0.001, alive=ended(agents))
    t0 = time.monotonic()
    hosts[0].kill()
    caught = partial_files(run_dir)
    (gone,) = ranks_gone_after(agents[1:], t0, TIMEOUT_S + EXIT_MARGIN_S)
    assert caught, "the kill landed after the save had finished"
    kept_step = saved_steps(run_dir)[-1]
    kept = run_dir / "checkpoints" / f"step_{kept_step}.pt"
    print(f"node1 killed while writing {caught[0].name}: node2's rank exited after {gone:.1f}s")
    assert load_file(kept)["step"] == kept_step

    finish(start(hosts, overrides(run_dir, data), logs, "relaunch"))
    assert f"resuming from {kept}" in (logs / "relaunch-node1.log").read_text()
    assert not partial_files(run_dir)
    assert_same_weights(straight, run_dir / "checkpoints" / f"step_{STEPS}.pt")


def test_a_slow_link_slows_training_but_it_goes_on(tmp_path, data, hosts, straight):
    hosts[1].throttle("200mbit")
    finish(start(hosts, overrides(tmp_path / "run", data), tmp_path, "slow"))
    assert_same_weights(straight, tmp_path / "run" / "checkpoints" / f"step_{STEPS}.pt")


def test_the_multihost_benchmark_reports_the_communication_share(tmp_path, data):
    cmd = [sys.executable, REPO / "benchmarks" / "multihost.py", "--steps", "3", "--warmup", "1", "--rounds", "1",
           "--rate", "100mbit", *base_overrides(tmp_path / "run", data)]
    out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "comm share" in out.stdout and "slow (100mbit)" in out.stdout and "slow / clean step time" in out.stdout
