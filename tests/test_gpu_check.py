"""The CPU mode of ``benchmarks/gpu_check.sh``: every stage a CPU can run, on tiny sizes, so the GPU
check cannot rot before a GPU runs it. Nothing here needs or touches CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run

MAX_FILES = 8  # what the device tool brings back from $OUT


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_check(idx_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "DATA_ROOT": str(idx_root),
           "DATA_NAME": "mnist", "DATA_SPLIT": "test"}
    proc = run(["bash", REPO / "benchmarks" / "gpu_check.sh", "--cpu"], timeout=900, env_extra=env)
    assert proc.returncode == 0, proc.stdout[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["all_checks_passed"]
    stages = summary["stages"]
    assert [s["stage"] for s in stages if s["status"] != "passed"] == []
    assert {"throughput_rgb32_dcgan_b16", "throughput_rgb32_resnet_b16"} <= {s["stage"] for s in stages}
    assert all(c["ok"] for s in stages for c in s["checks"]) and sum(len(s["checks"]) for s in stages) > 50
    assert {"gpu_check.log", "summary.json", "bench.json", "samples_grid.png"} <= {p.name for p in out.iterdir()}
    assert len(list(out.rglob("*"))) <= MAX_FILES
    assert "every correctness check passed" in (out / "gpu_check.log").read_text()
