"""The judge cache, the Evaluator, and the CLI (one process, two gloo ranks under torchrun, and .npz).

Everything runs on a tiny synthetic dataset in IDX format: class c is a bright square at its own
place on a noisy background, so even a judge trained for a few steps tells the classes apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gan_dist import evaluate, judge
from gan_dist.config import Config, DataConfig, EvalConfig, ModelConfig
from gan_dist.data import NUM_CLASSES
from gan_dist.dist import DistEnv
from gan_dist.train import main as train_main

SPEC = judge.JudgeSpec(width=4, features=16, epochs=3, batch_size=32, lr=1e-2)
ONE_RANK = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
MNIST = Path("/work/shared/data/mnist")


def templates() -> torch.Tensor:
    """One 28×28 uint8 picture per class: a 6×6 square in one of 2×5 places."""
    pictures = torch.zeros(NUM_CLASSES, 28, 28, dtype=torch.uint8)
    for c in range(NUM_CLASSES):
        row, col = 4 + 12 * (c // 5), 1 + 5 * (c % 5)
        pictures[c, row:row + 6, col:col + 6] = 255
    return pictures


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    background = torch.randint(0, 80, (n, 28, 28), generator=gen, dtype=torch.uint8)
    return torch.maximum(templates()[labels], background), labels


def write_idx(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The IDX format: big-endian magic 0x803 + N, 28, 28 for images; 0x801 + N for labels."""
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    n = labels.shape[0]
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28)
                                                         + images.numpy().tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n)
                                                         + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_idx(root, "train", *synthetic(640, seed=1))
    write_idx(root, "test", *synthetic(400, seed=2))
    return root


def data_config(root: Path) -> DataConfig:
    return DataConfig(name="mnist", root=str(root), split="train", download=False)


def eval_config(root: Path, judges: Path, n_samples: int = 200) -> Config:
    return Config(data=data_config(root), model=ModelConfig(z_dim=8),
                  eval=EvalConfig(n_samples=n_samples, judge_dir=str(judges), batch_size=64))


class TemplateGenerator(nn.Module):
    """A stand-in for a good G: the class picture plus a little latent-driven texture."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.register_buffer("pictures", templates().float().div(127.5).sub(1).unsqueeze(1))
        self.texture = nn.Linear(z_dim, 28 * 28)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        texture = 0.3 * torch.sigmoid(self.texture(z)).view(-1, 1, 28, 28)
        return torch.maximum(self.pictures[labels], texture * 2 - 1)


# ------------------------------------------------------------------------------------------------ judge


def test_judge_is_cached_reused_and_invalidated_by_new_data(data_root: Path, tmp_path: Path) -> None:
    judges = tmp_path / "judges"
    first = judge.load_or_train(data_config(data_root), judges, ONE_RANK, SPEC)
    assert first.info["cache"] == "trained" and first.info["trained_on"] == "mnist/train"
    assert first.info["n_train"] == 640 and first.info["n_heldout"] == 400
    assert first.info["accuracy"] > 0.9
    assert Path(first.info["path"]).name.startswith("mnist-train-")

    again = judge.load_or_train(data_config(data_root), judges, ONE_RANK, SPEC)
    assert again.info["cache"] == "hit" and again.info["key"] == first.info["key"]
    assert again.info["accuracy"] == first.info["accuracy"]
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    images, labels = synthetic(640, seed=1)
    images[0] = 255 - images[0]  # one changed training picture is other data
    write_idx(data_root, "train", images, labels)
    changed = judge.load_or_train(data_config(data_root), judges, ONE_RANK, SPEC)
    assert changed.info["cache"] == "trained" and changed.info["key"] != first.info["key"]

    other_recipe = judge.load_or_train(data_config(data_root), judges, ONE_RANK, dataclasses.replace(SPEC, epochs=1))
    assert other_recipe.info["key"] != changed.info["key"]


def test_unreadable_cache_is_retrained(data_root: Path, tmp_path: Path) -> None:
    first = judge.load_or_train(data_config(data_root), tmp_path, ONE_RANK, SPEC)
    Path(first.info["path"]).write_bytes(b"not a checkpoint")
    again = judge.load_or_train(data_config(data_root), tmp_path, ONE_RANK, SPEC)
    assert again.info["cache"] == "trained" and again.info["key"] == first.info["key"]


def test_without_a_train_split_the_judge_holds_out_part_of_test(tmp_path: Path) -> None:
    write_idx(tmp_path / "data", "test", *synthetic(400, seed=3))
    found = judge.load_or_train(data_config(tmp_path / "data"), tmp_path / "judges", ONE_RANK, SPEC)
    assert found.info["trained_on"] == "mnist/test"
    assert (found.info["n_train"], found.info["n_heldout"]) == (320, 80)
    assert Path(found.info["path"]).name.startswith("mnist-test-")


@pytest.mark.skipif(not (MNIST / "MNIST" / "raw").is_dir(), reason="the real MNIST test digits are not here")
def test_real_mnist_without_train_split_falls_back_to_held_out_test() -> None:
    cfg = DataConfig(name="mnist", root=str(MNIST), split="test", download=False)
    data = judge.judge_data(cfg, ONE_RANK, holdout=0.2, seed=0)
    assert data.trained_on == "test"
    assert (data.train[1].shape[0], data.heldout[1].shape[0]) == (8000, 2000)


# -------------------------------------------------------------------------------------------- Evaluator


def test_evaluator_ranks_a_good_generator_between_the_floors(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    evaluator = evaluate.Evaluator(cfg, ONE_RANK, SPEC)
    torch.manual_seed(0)
    good = evaluator.run(TemplateGenerator(cfg.model.z_dim))
    floors = evaluator.floors()
    assert set(good) == {*evaluate.METRICS, "n_samples", "seconds"} and good["n_samples"] == 200
    assert good["cond_acc"] > 0.9 and floors["floor_real_cond_acc"] > 0.9
    assert floors["floor_real_fid"] < good["fid"] < floors["floor_noise_fid"]
    assert good["intra_fid"] < floors["floor_noise_intra_fid"]
    assert floors["floor_real_precision"] > 0.5 and floors["floor_noise_precision"] < 0.1
    assert evaluator.due(0) is False and evaluator.info["n_reference"] == 400


def test_run_is_score_images_of_the_fixed_latents(data_root: Path, tmp_path: Path) -> None:
    evaluator = evaluate.Evaluator(eval_config(data_root, tmp_path / "judges"), ONE_RANK, SPEC)
    torch.manual_seed(0)
    generator = TemplateGenerator(8)
    by_run = evaluator.run(generator)
    by_images = evaluator.score_images(generator(evaluator.z, evaluator.labels).detach(), evaluator.labels)
    assert {k: by_run[k] for k in evaluate.METRICS} == pytest.approx({k: by_images[k] for k in evaluate.METRICS})
    assert torch.bincount(evaluator.labels).tolist() == [20] * NUM_CLASSES


def test_due_follows_every_steps(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_steps=50))
    evaluator = evaluate.Evaluator(cfg, ONE_RANK, SPEC)
    assert [s for s in range(1, 160) if evaluator.due(s)] == [50, 100, 150]


# -------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def checkpoint(data_root: Path, tmp_path: Path) -> Path:
    """A real gan_dist checkpoint: two steps of a tiny MLP GAN on the synthetic data."""
    run_dir = tmp_path / "run"
    status = train_main([f"run_dir={run_dir}", f"data.root={data_root}", "data.download=false",
                         "log.wandb.mode=disabled", "log.progress=false", "model.g_hidden=[16]",
                         "model.d_hidden=[16]", "train.batch_size=16", "train.max_steps=2", "dist.device=cpu"])
    assert status == 0
    return run_dir / "checkpoints" / "step_2.pt"


def run_cli(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert evaluate.main(list(args)) == 0
    return json.loads(out.read_text())


def test_cli_one_rank_equals_two_gloo_ranks(checkpoint: Path, tmp_path: Path) -> None:
    common = ["--checkpoint", str(checkpoint), "--n-per-class", "10", f"eval.judge_dir={tmp_path / 'judges'}",
              "dist.device=cpu"]
    one = run_cli(*common, "--out", str(tmp_path / "one.json"))
    assert one["world_size"] == 1 and one["kind"] == "checkpoint" and one["n_samples"] == 100
    assert one["judge_trained_on"] == "mnist/train" and not one["reference_is_training_data"]
    for key in evaluate.METRICS:
        assert {key, f"floor_real_{key}", f"floor_noise_{key}"} <= one.keys()

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "gan_dist.evaluate", *common, "--out", str(tmp_path / "two.json")],
        env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    assert len(done.stdout.strip().splitlines()) == 1  # one JSON line, from rank 0
    numbers = [k for k, v in one.items() if isinstance(v, float) and k != "seconds"]
    assert {k: two[k] for k in numbers} == pytest.approx({k: one[k] for k in numbers}, rel=1e-5, abs=1e-6)


def test_cli_scores_an_npz(data_root: Path, tmp_path: Path) -> None:
    """The reference itself, as uint8: FID ~0, precision and recall 1, accuracy = the judge's on test."""
    images, labels = synthetic(400, seed=2)
    np.savez(tmp_path / "samples.npz", images=images.numpy(), labels=labels.numpy())
    record = run_cli("--npz", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "npz.json"),
                     f"data.root={data_root}", "data.download=false", f"eval.judge_dir={tmp_path / 'judges'}",
                     "dist.device=cpu")
    assert record["kind"] == "npz" and record["n_samples"] == 400
    assert record["fid"] == pytest.approx(0.0, abs=1e-3)
    assert (record["precision"], record["recall"]) == (1.0, 1.0)
    assert record["cond_acc"] == pytest.approx(record["judge_accuracy"])


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((20, 28, 28), np.float32), "labels": np.arange(20) % 10}, "uint8"),
    ({"images": np.zeros((20, 28, 28), np.uint8), "labels": np.arange(20) % 10 + 1}, "0..9"),
    ({"images": np.zeros((20, 28, 28), np.uint8)}, "cannot read"),
])
def test_cli_rejects_a_malformed_npz(arrays: dict, message: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    assert evaluate.main(["--npz", str(tmp_path / "bad.npz")]) == evaluate.EXIT_USAGE
    assert message in capsys.readouterr().err
