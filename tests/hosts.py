"""Cluster hosts on one machine: network namespaces on a private switch, sharing the file system.

    with Hosts(2) as hosts:                  # node1 10.231.0.1, node2 10.231.0.2
        proc = hosts[1].popen(["python", "-m", "gan_dist.train", ...])
        hosts[1].kill()                       # SIGKILL every process of node2
        hosts[1].link(up=False)               # cut node2 off the switch
        hosts[1].throttle("50mbit")            # a slow link

Each host is a network namespace with loopback up and ``eth0`` on a bridge. The bridge sits in a
namespace of its own (the switch), so no address of a host is ever routed out of the machine, and
the root namespace gets no address. Every command starts in a UTS namespace of its own whose
hostname is the host's name, and ``ip netns exec`` gives it ``/etc/netns/<ns>/hosts`` as
``/etc/hosts``, which names every host. The hosts share the file system, as cluster nodes share
a parallel file system. Leaving the ``with`` block kills every process of every host and deletes
the namespaces and files, also when the test failed. Root only: ``unavailable()`` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "gdh"
"""Namespaces of this module are named gdh<pid>-<role>: leftovers of a dead test process are recognised."""
NETNS_ETC = Path("/etc/netns")
CLUSTER_NET = "10.231.0"
SIDE_NET = "10.232.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` here (iproute2, util-linux)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` failed: {e.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


def _remove_stale() -> None:
    """Delete the namespaces of test processes that died before cleaning up."""
    for ns in _namespaces():
        owner = ns.removeprefix(PREFIX).partition("-")[0]
        if ns.startswith(PREFIX) and owner.isdecimal() and not Path(f"/proc/{owner}").exists():
            _delete(ns)


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
    return [int(p) for p in out.split()]


def _kill(ns: str) -> list[int]:
    pids = _pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _delete(ns: str) -> None:
    _kill(ns)
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    addr: str
    dev: str
    """The interface on the cluster network."""
    switch: str
    port: str
    """The host's veth end on the switch: taking it down cuts the host off."""

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: its network namespace, and its own hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *map(str, argv)]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kw)

    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def kill(self) -> list[int]:
        """SIGKILL every process on this host (a power cut); returns their PIDs."""
        return _kill(self.ns)

    def pids(self) -> list[int]:
        return _pids(self.ns)

    def link(self, up: bool) -> None:
        """Plug this host into the switch, or pull its cable: its peers see no reset, only silence."""
        _ip("-n", self.switch, "link", "set", self.port, "up" if up else "down")

    def throttle(self, rate: str) -> None:
        """Everything this host sends leaves at ``rate`` (``tc`` token bucket, e.g. ``50mbit``): a slow link.

        A token bucket rather than netem's delay: it needs no ``sch_netem``, which kernels may lack.
        """
        subprocess.run(["tc", "-n", self.ns, "qdisc", "replace", "dev", self.dev, "root", "tbf", "rate", rate,
                        "burst", "256kb", "latency", "2s"], check=True, capture_output=True, timeout=30)


class Hosts:
    """``n`` hosts named node1..noden on one switch; ``side=k`` gives host k a second network.

    The side network reaches no other host, comes first on host k (``eth0``; the cluster network is
    ``eth1`` there), and host k resolves its own name to it, as Debian's 127.0.1.1 or a management
    network do, while the other hosts resolve it to its cluster address. A rank on host k that picks its
    interface by hostname or by order advertises an address that no peer reaches.
    """

    def __init__(self, n: int, side: int | None = None) -> None:
        self.n, self.side = n, side
        self.tag = f"{PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []

    def __enter__(self) -> list[Host]:
        _remove_stale()
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def _netns(self, role: str) -> str:
        ns = f"{self.tag}-{role}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _switch(self, role: str) -> str:
        ns = self._netns(role)
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "link", "set", "br0", "up")
        return ns

    def _plug(self, host_ns: str, dev: str, switch: str, port: str, addr: str) -> None:
        _ip("link", "add", dev, "netns", host_ns, "type", "veth", "peer", "name", port, "netns", switch)
        _ip("-n", switch, "link", "set", port, "master", "br0")
        _ip("-n", switch, "link", "set", port, "up")
        _ip("-n", host_ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", host_ns, "link", "set", dev, "up")

    def _build(self) -> None:
        switch = self._switch("sw")
        side = self._switch("side") if self.side is not None else None
        for k in range(1, self.n + 1):
            ns, addr = self._netns(f"h{k}"), f"{CLUSTER_NET}.{k}"
            dev = "eth0"
            if k == self.side:
                self._plug(ns, "eth0", side, f"p{k}", f"{SIDE_NET}.{k}")
                dev = "eth1"
            self._plug(ns, dev, switch, f"p{k}", addr)
            self.hosts.append(Host(f"node{k}", ns, addr, dev, switch, f"p{k}"))
        for host in self.hosts:
            own = host.name == f"node{self.side}"
            names = "".join(f"{SIDE_NET if own and h is host else CLUSTER_NET}.{k} {h.name}\n"
                            for k, h in enumerate(self.hosts, 1))
            (NETNS_ETC / host.ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.ns / "hosts").write_text("127.0.0.1 localhost\n" + names)

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.namespaces):
            _delete(ns)
        self.namespaces.clear()
