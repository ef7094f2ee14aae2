"""End to end: the real entry points under torchrun and alone, on tiny written IDX sets, image folders
and CIFAR batches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml
from conftest import base_overrides, run, torchrun_cmd, write_cifar, write_folder
from PIL import Image

from gan_dist import evaluate
from gan_dist.evaluation import judge

pytestmark = pytest.mark.integration  # starts processes or services


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
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["saved.json", "step_16.pt"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "samples"]


def test_single_process_without_torchrun(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(run_dir, idx_root, **{"train.max_steps": 3})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 1" in proc.stdout and (run_dir / "checkpoints" / "step_3.pt").exists()
    assert (run_dir / "samples" / "step_3.png").exists()  # the end of training writes a grid


def test_a_sample_cadence_replaces_the_grid_of_each_epoch(tmp_path, idx_root):
    """256 images at batch 16: 16 steps per epoch; grids every 10 steps, and the last one, and none at 16 or 32."""
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(
        run_dir, idx_root, **{"train.max_steps": 35, "log.samples_every_steps": 10, "log.every_steps": 35})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_10.png", "step_20.png", "step_30.png", "step_35.png"]


def test_missing_data_exits_2_with_one_clear_line(tmp_path):
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(tmp_path / "run", tmp_path / "nodata")])
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------- any dataset

SMALL_DCGAN = {"model.arch": "dcgan", "model.dcgan.width": 8, "train.max_steps": 4, "data.split": "train"}
# replaces SMALL_DCGAN's model keys; channels_last runs the whole loop, z_spread included, in the other layout
SMALL_RESNET = {"model.arch": "resnet", "model.resnet.g_width": 8, "model.resnet.d_width": 8,
                "model.resnet.attention": 8, "model.spectral_norm": True, "loss.kind": "hinge", "ema.enabled": True,
                "amp.memory_format": "channels_last"}


def folder_run(tmp_path, classes: dict[str, int] | None, **extra: object) -> tuple[list[str], object]:
    """Overrides for a tiny run on a 16×16 image folder written here, and the run's outcome."""
    root = tmp_path / "images"
    write_folder(root, classes, size=16, n=48)
    small = {k: v for k, v in SMALL_DCGAN.items() if "model.arch" not in extra or not k.startswith("model.")}
    overrides = base_overrides(tmp_path / "run", root, **{"data.name": "folder", "data.resolution": 16}
                               | small | extra)
    return overrides, run([sys.executable, "-m", "gan_dist.train", *overrides])


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_rgb_folder_trains_then_samples_and_scores_from_the_checkpoint(tmp_path, arch):
    extra = SMALL_RESNET if arch == "resnet" else {}
    _, proc = folder_run(tmp_path, {"cat": 40, "dog": 40, "owl": 40}, **{"model.conditioning": "projection"} | extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "folder train (108 images, 3×16×16, 3 classes)" in proc.stdout
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["z_spread_min"] <= r["z_spread"] for r in logged) and len(logged) == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4.pt"
    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    sampled = run([sys.executable, "-m", "gan_dist.sample", "--checkpoint", checkpoint, "--grid", grid,
                   "--npz", npz, "--n-per-class", "4"])
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert Image.open(grid).mode == "RGB" and Image.open(grid).size == (10 * 18 + 2, 3 * 18 + 2)
    with np.load(npz) as arrays:
        assert arrays["images"].shape == (12, 16, 16, 3) and arrays["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    out = tmp_path / "scores.json"
    spec = judge.JudgeSpec(width=4, features=16, samples=400, batch_size=32)
    argv = ["--checkpoint", str(checkpoint), "--n-per-class", "4", "--out", str(out),
            f"eval.judge_dir={tmp_path / 'judges'}"]
    assert evaluate.main(argv, spec) == 0
    scores = json.loads(out.read_text())
    assert {"fid", "intra_fid", "cond_acc", "precision", "recall"} <= scores.keys()


def test_a_flat_folder_is_unconditional_and_a_conditional_recipe_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    overrides, refused = folder_run(tmp_path, None, **{"model.conditioning": "projection"})
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("has none (a flat folder); set model.conditioning=none")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # nothing written or lost

    trained = run([sys.executable, "-m", "gan_dist.train", *overrides, "model.conditioning=none"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "3×16×16, unconditional" in trained.stdout
    assert (tmp_path / "run" / "samples" / "step_4.png").exists()


@pytest.mark.parametrize("classes", [1, 12])
def test_one_class_and_many_class_folders_train(tmp_path, classes):
    _, proc = folder_run(tmp_path, {f"c{i:02d}": 40 // classes + 8 for i in range(classes)}, **{"data.channels": 1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"1×16×16, {classes} classes" in proc.stdout
    assert ("data: one class: conditioning on it changes nothing" in proc.stdout) == (classes == 1)


def test_cifar10_batches_train_through_torchvision(tmp_path):
    write_cifar(tmp_path / "cifar", 40)
    proc = run([sys.executable, "-m", "gan_dist.train", *base_overrides(
        tmp_path / "run", tmp_path / "cifar", **{"data.name": "cifar10"} | SMALL_DCGAN)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cifar10 train" in proc.stdout and "3×32×32, 10 classes" in proc.stdout


def test_a_corrupt_image_exits_2_naming_it_and_keeps_the_run_dir(tmp_path):
    overrides, first = folder_run(tmp_path, {"a": 20, "b": 20})
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    broken = tmp_path / "images" / "a" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    proc = run([sys.executable, "-m", "gan_dist.train", *overrides, "train.max_steps=6"])
    assert proc.returncode == 2 and str(broken) in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    skipped = run([sys.executable, "-m", "gan_dist.train", *overrides, "train.max_steps=6", "data.skip_bad=true"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipped 1 unreadable" in skipped.stdout and "resuming from" in skipped.stdout


def test_resuming_on_a_folder_that_shrank_below_the_saved_position_says_so_and_goes_on(tmp_path):
    """Saved at batch 5 of 6 (96 training images, batch 16); 40 images gone: the epoch now ends before it."""
    overrides, first = folder_run(tmp_path, {"a": 60, "b": 60}, **{"data.holdout": 0.2, "train.max_steps": 5,
                                                                     "data.verify": "content"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 steps per epoch" in first.stdout and "cache keyed by content hashes" in first.stdout
    for path in sorted((tmp_path / "images" / "a").iterdir())[:40]:
        path.unlink()
    proc = run([sys.executable, "-m", "gan_dist.train", *overrides, "train.max_steps=8"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "at step 5 (epoch 1, batch 0)" in proc.stdout
    assert "data: differs from the checkpoint's (train: 96 images then, 64 now; test: 24 images then, 16 now); " \
           "the run goes on from the same step, and is no longer bit-exact" in proc.stdout
    assert "done: 8 steps" in proc.stdout


def test_a_size_the_conv_nets_cannot_take_is_refused_before_the_data_is_read(tmp_path):
    overrides, proc = folder_run(tmp_path, {"a": 8, "b": 8}, **{"data.resolution": 27})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == ("error (rank 0): data.resolution: the conv architectures need an even size above 7 (they "
                           "halve it while it is even and above 7: 28 → 7, 32 → 4, 18 → 9), got 27\n")
    assert not (tmp_path / "data_cache").exists()


def test_progress_without_a_terminal_prints_a_line_with_the_eta(capsys):
    """A Slurm log is no terminal: the bar gives way to a plain line every log.progress_seconds."""
    import torch

    from gan_dist.config import LogConfig
    from gan_dist.dist import DistEnv
    from gan_dist.training.monitor import Progress

    env = DistEnv(0, 0, 1, 1, torch.device("cpu"))
    progress = Progress(LogConfig(progress_seconds=1e-9), env, total=100, done=10, images_per_step=64)
    progress.update(30)
    progress.close()
    line = capsys.readouterr().err.strip()
    assert line.startswith("progress: step 30/100 (30.0%), ") and " img/s, ETA " in line
