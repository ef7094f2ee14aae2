"""The shell launchers set OpenMP's wait policy for the ranks, and leave a caller's own choice alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("script", ["launch/torchrun_multinode.sh", "docker/entrypoint.sh"])
@pytest.mark.parametrize(("preset", "expected"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_wait_policy_defaults_to_passive_and_respects_the_caller(tmp_path, script, preset, expected):
    # A stand-in for the program each launcher starts (its PYTHON; the entry point's first argument).
    printer = tmp_path / "python"
    printer.write_text(f"#!{sys.executable}\nimport json, os\nprint(json.dumps(dict(os.environ)))\n")
    printer.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | preset
    env |= {"PYTHON": str(printer), "NNODES": "1", "RDZV_ENDPOINT": "127.0.0.1:1"}
    args = [str(printer)] if script == "docker/entrypoint.sh" else []
    out = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["OMP_WAIT_POLICY"] == expected
