"""Smoke test of ``python benchmarks/bench.py``: every case, the torchrun one included, runs end to end on
a tiny setting and lands in the JSON report; a --compare twin gets its override; ``python -m
benchmarks.bench`` is the same command. Timings are never asserted: they belong to the machine, not to
the code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run, write_folder
from shapes import DIGITS, info

from benchmarks import bench
from gan_dist.amp import native_bf16
from gan_dist.configio import load_config

pytestmark = pytest.mark.integration  # starts processes or services

MLP = load_config(None, [])

BY_PATH = [sys.executable, REPO / "benchmarks" / "bench.py"]
AS_MODULE = [sys.executable, "-m", "benchmarks.bench"]
TINY = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--rounds", "1", "--batch", "8", "--nproc", "2"]


@pytest.mark.slow
def test_bench_runs_every_case_and_writes_json(idx_root: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    proc = run([*BY_PATH, *TINY, "--json", report_path, f"data.root={idx_root}", "data.split=test",
                "data.download=false", "model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    cases = {c["key"]: c for c in report["cases"]}
    assert list(cases) == ["a", "b", "c"]
    for case in cases.values():
        assert len(case["rounds"]) == 1 and case["summary"]["images_per_s"] > 0
        assert case["summary"]["flops_per_image"] > 0 and case["summary"]["peak_rss_mb_per_rank"] > 0
    ranks = cases["c"]["rounds"][0]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["threads"] == 1 for r in ranks)
    assert all(r["phases_ms"]["comm"] is not None for r in ranks)  # gloo all-reduce timed by the comm hook
    assert cases["a"]["summary"]["phases_ms"]["comm"] is None and cases["a"]["summary"]["x_ref"] == 1.0
    chosen = "bfloat16" if native_bf16(torch.device("cpu"))[0] else "float32"  # amp.dtype=auto on this CPU
    assert cases["b"]["summary"]["precision"] == chosen and cases["b"]["summary"]["first_step_s"] > 0
    assert [t["ratio"] for t in report["targets"]] == ["(b) / (a)", "(c) / (b)"]
    assert report["table"] in proc.stdout
    assert f"python benchmarks/bench.py {' '.join(TINY)} --json " in report["command"]


def test_compare_adds_twins_that_carry_the_override(tmp_path: Path) -> None:
    args = bench.parse_args([*TINY, "--compare", "amp.enabled=false", "data.split=test"])
    cases = bench.plan(args, MLP, DIGITS)
    assert [c.key for c in cases] == ["a", "b", "c", "b'", "c'"]
    twin = bench.worker_argv(args, cases[-1], tmp_path)
    assert "torch.distributed.run" in twin and "--nproc_per_node=2" in twin
    assert str(REPO / "benchmarks" / "bench.py") in twin  # by path: it runs however the parent was started
    assert twin[-2:] == ["data.split=test", "amp.enabled=false"]  # the twin's override comes last, so it wins
    assert "amp.enabled=false" not in bench.worker_argv(args, cases[1], tmp_path)


def test_a_conv_recipe_is_held_against_a_plain_loop_and_compares_streamed_with_resident(tmp_path: Path) -> None:
    write_folder(tmp_path / "images", {"a": 12, "b": 12}, size=16)
    report_path = tmp_path / "bench.json"
    proc = run([*AS_MODULE, *TINY[:-2], "--nproc", "1", "--json", report_path, "--compare", "data.resident=off",
                "--config", REPO / "configs" / "folder64_dcgan.yaml", f"data.root={tmp_path / 'images'}",
                "data.resolution=16", f"data.cache_dir={tmp_path / 'cache'}", "data.workers=0",
                "model.dcgan.width=8", "augment.kind=diffaug"], timeout=300)  # the plain loop augments too
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert [c["key"] for c in report["cases"]] == ["a", "b", "b'"] and report["settings"]["reference"] == "plain"
    assert report["cases"][0]["label"] == "(a) reference: plain PyTorch loop"
    assert report["cases"][0]["summary"]["precision"] == report["cases"][1]["summary"]["precision"]
    assert [t["ratio"] for t in report["targets"]] == ["(b) / (a)"] and report["targets"][0]["target"] == 0.95
    assert proc.stdout.rstrip().splitlines()[-1] == f"gan_dist/plain: {report['targets'][0]['value']:.2f}"
    assert report["cases"][1]["summary"]["z_spread_ms"] > 0 and "z_spread (each log step) in b: " in proc.stdout
    assert [t["ratio"] for t in report["twins"]] == ["(b') / (b)"] and report["twins"][0]["value"] > 0
    assert "twin (b') / (b) = " in proc.stdout and "(data.resident=off)" in proc.stdout


def test_the_tutorial_reference_refuses_data_it_cannot_take() -> None:
    args = bench.parse_args([*TINY, "--reference", "tutorial"])
    rgb = info(3, 32, 10)
    assert [c.key for c in bench.plan(args, MLP, rgb)] == ["b", "c"]
    assert bench.reference_misfit("tutorial", MLP, rgb).startswith("the tutorial's networks need 28×28 grayscale")
    dcgan = load_config(None, ["model.arch=dcgan"])
    assert bench.reference_of(bench.parse_args(TINY), dcgan, DIGITS) == "plain"  # like for like
    assert bench.reference_of(bench.parse_args(TINY), MLP, DIGITS) == "tutorial"


def test_compare_env_gives_the_twins_its_variables_only(tmp_path: Path) -> None:
    args = bench.parse_args([*TINY, "--compare-env", "OMP_WAIT_POLICY=PASSIVE", "--load", "1"])
    cases = bench.plan(args, MLP, DIGITS)
    assert [c.key for c in cases] == ["a", "b", "c", "b'", "c'"] and args.load == 1
    assert [c.env for c in cases] == [(), (), (), ("OMP_WAIT_POLICY=PASSIVE",), ("OMP_WAIT_POLICY=PASSIVE",)]
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--compare-env", "PASSIVE"])


def test_bench_reports_missing_data_with_exit_2(tmp_path: Path) -> None:
    """By path from another folder: one line, exit 2."""
    proc = run([*BY_PATH, "--device", "cpu", "--json", "", f"data.root={tmp_path}", "data.download=false"],
               timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
