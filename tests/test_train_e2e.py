"""End to end: the real entry point under torchrun on a tiny written IDX set."""

from __future__ import annotations

import json
import sys

import yaml
from conftest import base_overrides, run, torchrun_cmd


def test_torchrun_two_ranks_writes_run_dir_from_rank0_only(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = run(torchrun_cmd(2, base_overrides(run_dir, idx_root, **{"train.epochs": 2})))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "global batch 32" in proc.stdout  # 16 per rank × 2 ranks
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 16 and cfg["run_dir"] == str(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 256 images / 2 ranks / 16 = 8 steps per epoch, 2 epochs, a record every 2 steps: written once each.
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 14, 16]
    for r in records:
        assert {"step", "epoch", "d_loss", "g_loss", "d_real", "d_fake", "images_per_s"} <= r.keys()
        assert 0 < r["d_real"] < 1 and r["images_per_s"] > 0
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_16.png", "step_8.png"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_16.pt"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "samples"]


def test_single_process_without_torchrun(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(run_dir, idx_root, **{"train.max_steps": 3})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 1" in proc.stdout and (run_dir / "checkpoints" / "step_3.pt").exists()
    assert (run_dir / "samples" / "step_3.png").exists()  # the end of training writes a grid


def test_missing_data_exits_2_with_one_clear_line(tmp_path):
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(tmp_path / "run", tmp_path / "nodata")])
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
