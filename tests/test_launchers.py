"""The shell launchers set the ranks' environment (OpenMP's wait policy, the network interface), and leave
a caller's own choice alone; the Slurm launcher passes on only the extra sbatch options that sbatch knows and
that ask for nothing it asks for itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from launch import slurm

LOCAL = str(REPO / "configs/slurm/local.yaml")


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


@pytest.mark.parametrize(("flags", "message"), [
    ("--sbatch partitoin=debug", "sbatch: 'partitoin=debug': no such sbatch option (its long names, spelled out); "
                                 "did you mean partition?"),
    ("--sbatch part=debug", "did you mean partition?"),  # sbatch takes prefixes: this one would pass the checks
    ("--gpus-per-node 4 --tasks-per-node null --sbatch gres=gpu:8",
     "sbatch: 'gres=gpu:8' asks Slurm for what gpus_per_node (--gpus-per-node) already asks; give only one of them"),
    ("--gpus-per-node 4 --tasks-per-node null --sbatch gpus-per-task=1", "what gpus_per_node (--gpus-per-node)"),
    ("--sbatch ntasks=8", "what tasks_per_node (--tasks-per-node)"),
    ("--sbatch cpus_per_gpu=2", "what cpus_per_task (--cpus-per-task)"),
    ("--sbatch=--mem-per-cpu=1G", "what mem (--mem)"),
])  # fmt: skip
def test_sbatch_options_are_sbatchs_own_and_ask_for_nothing_twice(flags, message, capsys):
    assert slurm.main(["--slurm-config", LOCAL, "--dry-run", *shlex.split(flags)]) == slurm.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_sbatch_options_for_what_the_script_does_not_ask_reach_it(tmp_path, capsys):
    """The local cluster's job asks for no GPU: GPUs by gres, or memory per CPU once mem is unset, are free."""
    flags = "--mem null --sbatch mem-per-cpu=1G --sbatch gres=gpu:1,nvme:1 --sbatch mail-type=END --sbatch exclusive"
    assert slurm.main(["--slurm-config", LOCAL, "--dry-run", *shlex.split(flags), f"run_dir={tmp_path}"]) == 0
    script = capsys.readouterr().out.splitlines()
    for option in ("mem-per-cpu=1G", "gres=gpu:1,nvme:1", "mail-type=END", "exclusive"):
        assert f"#SBATCH --{option}" in script


@pytest.mark.integration  # sbatch reads the configuration of a running cluster
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch here")
def test_the_table_of_sbatch_options_has_every_option_of_the_installed_sbatch():
    shown = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"--([a-z][a-z0-9-]+)", shown)) - slurm.SBATCH_OPTIONS == set()
