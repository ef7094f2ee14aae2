"""W&B for real, offline: one run from rank 0, read back with W&B's own tooling (``wandb leet inspect``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_overrides, run, torchrun_cmd, write_folder

pytestmark = pytest.mark.integration  # starts processes or services

SECRET = "0123456789abcdef0123456789abcdef01234567"


def wandb_overrides(run_dir: Path, root: Path, **extra: object) -> list[str]:
    return base_overrides(run_dir, root, **{"log.wandb.mode": "offline", "log.samples_every_steps": 3} | extra)


def run_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def records(path: Path) -> list[dict]:
    proc = run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", path], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def history(path: Path) -> list[dict]:
    return [r["history"]["item"] for r in records(path) if r.get("type") == "history"]


def run_id(path: Path) -> str:
    return path.stem.removeprefix("run-")


def test_two_ranks_make_one_offline_run_with_scalars_and_images(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = run(torchrun_cmd(2, wandb_overrides(run_dir, idx_root, **{"train.max_steps": 6, "augment.kind": "ada"})),
               cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = run_files(run_dir)
    assert len(files) == 1
    assert not (tmp_path / "wandb").exists()  # no rank wrote a W&B folder outside the run_dir
    rows = history(files[0])
    scalars = [r for r in rows if "train/d_loss" in r]
    assert [r["_step"] for r in scalars] == [2, 4, 6]
    assert {"train/g_loss", "train/d_real", "train/d_fake", "train/images_per_s", "lr/g", "lr/d",
            "train/z_spread", "train/z_spread_min", "train/augment_p", "train/ada_rt"} <= scalars[0].keys()
    images = [r for r in rows if "samples/grid.path" in r]
    assert [r["_step"] for r in images] == [3, 6]
    digits = ", ".join(f"{c} - {name}" for c, name in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))
    for r in images:
        assert (files[0].parent / "files" / r["samples/grid.path"]).is_file()
        assert r["samples/grid.caption"] == (f"step {r['_step']}: one class per row ({digits}), "
                                             "the same latent down each column; fixed noise")
    logged = next(r["run"]["config"]["update"] for r in records(files[0]) if r.get("type") == "run")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 6
    assert {key: logged[key] for key in resolved} == resolved  # every section, every value, as the run ran


def test_resume_continues_the_same_run_with_rising_steps(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    first = run([sys.executable, "-m", "gan_dist.train",
                 *wandb_overrides(run_dir, idx_root, **{"train.max_steps": 6, "checkpoint.every_steps": 2})])
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "checkpoints" / "step_6.pt").unlink()  # as if killed after step 6 was logged, before its save
    second = run([sys.executable, "-m", "gan_dist.train",
                  *wandb_overrides(run_dir, idx_root, **{"train.max_steps": 10, "checkpoint.every_steps": 2})])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "(replayed)" in second.stdout
    files = run_files(run_dir)
    assert len(files) == 2 and run_id(files[0]) == run_id(files[1])  # the same W&B run, reopened
    steps = [row["_step"] for f in files for row in history(f)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicate or backwards step
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("replayed")] == [6]


def test_disabled_and_env_override_create_nothing(tmp_path, idx_root):
    for name, env in (("disabled", {}), ("env", {"WANDB_MODE": "disabled"})):
        run_dir = tmp_path / name
        mode = "disabled" if name == "disabled" else "offline"
        proc = run([sys.executable, "-m", "gan_dist.train",
                    *wandb_overrides(run_dir, idx_root, **{"train.max_steps": 2, "log.wandb.mode": mode})],
                   cwd=tmp_path, env_extra=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not (run_dir / "wandb").exists() and not (tmp_path / "wandb").exists()


def test_wandb_that_cannot_start_does_not_stop_training(tmp_path, idx_root):
    home = tmp_path / "home"
    home.mkdir()
    env = {"WANDB_MODE": "online", "HOME": str(home), "WANDB_API_KEY": ""}
    proc = run([sys.executable, "-m", "gan_dist.train", *wandb_overrides(tmp_path / "run", idx_root,
                                                                        **{"train.max_steps": 2})],
               env_extra=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "W&B did not start" in line]
    assert len(warnings) == 1
    assert (tmp_path / "run" / "checkpoints" / "step_2.pt").exists()


def test_api_key_is_never_written(tmp_path, idx_root):
    """Every file the run writes (its run_dir, its working dir, HOME and TMPDIR are all in tmp_path)."""
    run_dir, home, tmp = tmp_path / "run", tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    proc = run([sys.executable, "-m", "gan_dist.train", *wandb_overrides(run_dir, idx_root, **{"train.max_steps": 2})],
               cwd=tmp_path, env_extra={"WANDB_API_KEY": SECRET, "HOME": str(home), "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert run_files(run_dir)[0] in written  # the scan sees W&B's own files
    assert [path for path in written if SECRET.encode() in path.read_bytes()] == []


def artifacts(path: Path) -> list[tuple[str, list[str], dict]]:
    return [(a["name"], sorted(a["aliases"]), json.loads(a["metadata"])) for r in records(path)
            if r.get("type") == "artifact" for a in [r["artifact"]]]


def test_checkpoints_become_model_artifacts_with_aliases_across_a_resume(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"a": 40, "b": 40}, size=16)
    run_dir, env = tmp_path / "run", {"WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    for steps in (4, 6):
        proc = run([sys.executable, "-m", "gan_dist.train", *wandb_overrides(run_dir, root, **{
            "data.name": "folder", "data.split": "train", "train.max_steps": steps, "checkpoint.every_steps": 2,
            "eval.every_steps": 2, "eval.n_samples": 40, "eval.judge_dir": tmp_path / "judges",
            "log.wandb.log_model": "all"})], env_extra=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (artifacts(f) for f in run_files(run_dir))
    name = f"model-{run_id(run_files(run_dir)[0])}"
    assert {n for n, _, _ in first + second} == {name}  # one sequence, continued by the resumed run
    rolling = [(aliases, meta) for _, aliases, meta in first + second if meta["file"] != "best.pt"]
    assert rolling == [(["latest", f"step-{s}"], {"step": s, "file": f"step_{s}.pt"}) for s in (2, 4, 6)]
    best = [(meta["file"], meta["step"]) for _, aliases, meta in first + second if "best" in aliases]
    assert best[0] == ("best.pt", 2) and {file for file, _ in best} == {"best.pt"}  # W&B adds latest to each


def test_log_model_last_logs_the_newest_checkpoint_once(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "gan_dist.train", *wandb_overrides(run_dir, idx_root, **{
        "train.max_steps": 4, "checkpoint.every_steps": 2, "log.wandb.log_model": "last"})],
        env_extra={"WANDB_DATA_DIR": str(tmp_path / "wandb_data")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = run_files(run_dir)
    assert [(aliases, meta) for _, aliases, meta in artifacts(path)] == [
        (["latest", "step-4"], {"step": 4, "file": "step_4.pt"})]
