"""Checkpoints: weights_only contents, retention, fallback past broken files, refusals with exit 2."""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, run

from gan_dist.checkpoint import FORMAT_VERSION, load_file
from gan_dist.train import main


def train(run_dir: Path, root: Path, **extra: object) -> int:
    return main(base_overrides(run_dir, root, **extra))


@pytest.fixture
def trained(tmp_path, idx_root) -> Path:
    """A run of 5 steps that saved every step and kept 2."""
    run_dir = tmp_path / "run"
    assert train(run_dir, idx_root, **{"train.max_steps": 5, "checkpoint.every_steps": 1,
                                       "checkpoint.keep_last": 2}) == 0
    return run_dir


def test_keep_last_prunes_and_nothing_temporary_is_left(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_4.pt", "step_5.pt"]


def test_contents_load_with_weights_only(trained):
    state = torch.load(trained / "checkpoints" / "step_5.pt", weights_only=True)
    assert state["format_version"] == FORMAT_VERSION
    assert (state["step"], state["epoch"], state["batch"], state["world_size"]) == (5, 0, 5, 1)
    assert {"generator", "discriminator", "opt_g", "opt_d", "scaler", "rng", "config", "wandb_run_id"} <= state.keys()
    assert state["config"]["train"]["max_steps"] == 5
    assert state["opt_d"]["state"]  # Adam moments are there


def test_auto_resume_says_so_and_continues(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"train.max_steps": 7, "checkpoint.every_steps": 1}) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(trained / "checkpoints" / "step_7.pt", weights_only=True)["step"] == 7


def test_corrupt_newest_falls_back_with_a_warning(trained, idx_root, capsys):
    newest = trained / "checkpoints" / "step_5.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step_5.pt"):
        assert train(trained, idx_root, **{"train.max_steps": 6}) == 0
    assert f"resuming from {trained / 'checkpoints' / 'step_4.pt'}" in capsys.readouterr().out


def test_resume_never_refuses_to_overwrite(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"train.resume": "never"}) == 2
    assert "train.resume=never" in capsys.readouterr().err


def test_resume_from_an_explicit_path(trained, idx_root, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other, idx_root, **{"train.max_steps": 6, "train.resume": trained / "checkpoints" / "step_4.pt"}) == 0
    assert "at step 4" in capsys.readouterr().out


def test_other_model_shape_exits_2_saying_what_differs(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"model.g_hidden": "[128,512,1024]"}) == 2
    err = capsys.readouterr().err
    assert "generator.net.0.weight" in err and "(256, 110)" in err and "(128, 110)" in err


def test_unknown_format_version_exits_2(trained, idx_root, capsys):
    path = trained / "checkpoints" / "step_5.pt"
    state = torch.load(path, weights_only=True)
    torch.save(state | {"format_version": 99}, path)
    assert train(trained, idx_root) == 2
    assert "format version 99" in capsys.readouterr().err


def test_disk_full_names_the_path_and_keeps_older_checkpoints(trained, idx_root):
    """A file-size limit makes the next save fail mid-write, as a full disk would."""
    before = {p.name: p.read_bytes() for p in (trained / "checkpoints").iterdir()}

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = run([sys.executable, "-m", "gan_dist.train",
                *base_overrides(trained, idx_root, **{"train.max_steps": 8, "checkpoint.every_steps": 1})],
               preexec_fn=limit)
    assert proc.returncode == 2
    assert f"saving checkpoint {trained / 'checkpoints' / 'step_6.pt'} failed" in proc.stderr
    after = {p.name: p.read_bytes() for p in (trained / "checkpoints").iterdir()}
    assert after == before  # old files intact, no step_6.pt, no temporary left behind


def test_load_file_rejects_non_checkpoints(tmp_path):
    from gan_dist.checkpoint import CheckpointError

    torch.save({"hello": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_file(tmp_path / "x.pt")
