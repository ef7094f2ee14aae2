"""The shell launchers set the ranks' environment (OpenMP's wait policy, the network interface), and leave
a caller's own choice alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def launched_env(tmp_path: Path, script: str, preset: dict[str, str]) -> dict[str, str]:
    """The environment a launcher gives the program it starts (its PYTHON; the entry point's first
    argument), seen by a stand-in that prints it; other uses of PYTHON (launch/netif.py) run for real."""
    printer = tmp_path / "python"
    printer.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                       f"if sys.argv[1:2] != ['-m'] and sys.argv[1:]: os.execv({sys.executable!r}, "
                       f"[{sys.executable!r}, *sys.argv[1:]])\n"
                       "print(json.dumps(dict(os.environ)))\n")
    printer.chmod(0o755)
    keys = ("OMP_WAIT_POLICY", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items() if k not in keys} | preset
    env |= {"PYTHON": str(printer), "NNODES": "1", "RDZV_ENDPOINT": "127.0.0.1:1"}
    args = [str(printer)] if script == "docker/entrypoint.sh" else []
    out = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("script", ["launch/torchrun_multinode.sh", "docker/entrypoint.sh"])
@pytest.mark.parametrize(("preset", "expected"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_wait_policy_defaults_to_passive_and_respects_the_caller(tmp_path, script, preset, expected):
    assert launched_env(tmp_path, script, preset)["OMP_WAIT_POLICY"] == expected


@pytest.mark.parametrize(("preset", "gloo", "nccl"), [({}, "lo", "lo"), ({"GLOO_SOCKET_IFNAME": ""}, "", "lo"),
                                                      ({"NCCL_SOCKET_IFNAME": "ib0"}, "lo", "ib0")])
def test_socket_interface_defaults_to_the_route_to_the_rendezvous_and_respects_the_caller(tmp_path, preset, gloo,
                                                                                           nccl):
    """Here the rendezvous is on loopback; tests/test_multihost.py checks a host with two networks."""
    env = launched_env(tmp_path, "launch/torchrun_multinode.sh", preset)
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == (gloo, nccl)
