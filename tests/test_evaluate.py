"""The judge cache, the Evaluator, and the CLI (one process, two gloo ranks under torchrun, and .npz).

Everything runs on conftest's tiny IDX splits: class c is a bright bar at its own row band on a
dark, noisy background, so even a judge trained for a few steps tells the classes apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run, write_idx
from torch import nn

from gan_dist import evaluate, judge
from gan_dist.config import Config, DataConfig, EvalConfig, ModelConfig
from gan_dist.data import NUM_CLASSES
from gan_dist.dist import DistEnv
from gan_dist.train import main as train_main

SPEC = judge.JudgeSpec(width=4, features=16, samples=2000, batch_size=32, lr=1e-2)
ONE_RANK = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
MNIST = Path("/work/shared/data/mnist")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a shared, busy machine their spin-waits cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """640 training and 400 test images, flat in one folder."""
    root = tmp_path / "data"
    write_idx(root, 640, "train", seed=1)
    write_idx(root, 400, "test", seed=2)
    return root


def data_config(root: Path) -> DataConfig:
    return DataConfig(name="mnist", root=str(root), split="train", download=False)


def eval_config(root: Path, judges: Path, n_samples: int = 200) -> Config:
    return Config(data=data_config(root), model=ModelConfig(z_dim=8),
                  eval=EvalConfig(n_samples=n_samples, judge_dir=str(judges), batch_size=64))


class BarGenerator(nn.Module):
    """A stand-in for a good G: conftest's bar of the class on a latent-driven dark texture."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        bars = torch.full((NUM_CLASSES, 1, 28, 28), -1.0)
        for c in range(NUM_CLASSES):
            bars[c, 0, 2 + 2 * c:5 + 2 * c, 4:24] = 0.8  # pixel 230 of 0..255
        self.register_buffer("bars", bars)
        self.texture = nn.Linear(z_dim, 28 * 28)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        texture = -1 + 0.3 * torch.sigmoid(self.texture(z)).view(-1, 1, 28, 28)  # pixels 0..38, as in the data
        return torch.maximum(self.bars[labels], texture)


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

    images = data_root / "train-images-idx3-ubyte"
    pixels = bytearray(images.read_bytes())
    pixels[16 + 300] ^= 0xFF  # one pixel of the first training image: other data
    images.write_bytes(bytes(pixels))
    changed = judge.load_or_train(data_config(data_root), judges, ONE_RANK, SPEC)
    assert changed.info["cache"] == "trained" and changed.info["key"] != first.info["key"]

    other_recipe = judge.load_or_train(data_config(data_root), judges, ONE_RANK, dataclasses.replace(SPEC, samples=640))
    assert other_recipe.info["key"] != changed.info["key"]


def test_unreadable_cache_is_retrained(data_root: Path, tmp_path: Path) -> None:
    first = judge.load_or_train(data_config(data_root), tmp_path, ONE_RANK, SPEC)
    Path(first.info["path"]).write_bytes(b"not a checkpoint")
    again = judge.load_or_train(data_config(data_root), tmp_path, ONE_RANK, SPEC)
    assert again.info["cache"] == "trained" and again.info["key"] == first.info["key"]


def test_without_a_train_split_the_judge_holds_out_part_of_test(tmp_path: Path) -> None:
    write_idx(tmp_path / "data", 400, "test", seed=3)
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


def test_evaluator_scores_a_good_generator_near_real_and_far_from_noise(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    evaluator = evaluate.Evaluator(cfg, ONE_RANK, SPEC)
    torch.manual_seed(0)
    good = evaluator.run(BarGenerator(cfg.model.z_dim))
    floors = evaluator.floors()
    assert set(good) == {*evaluate.METRICS, "n_samples", "seconds"} and good["n_samples"] == 200
    assert good["cond_acc"] > 0.9 and floors["floor_real_cond_acc"] > 0.9
    assert good["fid"] < floors["floor_noise_fid"] / 10 and floors["floor_real_fid"] < floors["floor_noise_fid"] / 10
    assert good["intra_fid"] < floors["floor_noise_intra_fid"] / 10
    assert floors["floor_real_precision"] > 0.5 and floors["floor_noise_precision"] < 0.1
    assert evaluator.due(0) is False and evaluator.info["n_reference"] == 400


def test_run_is_score_images_of_the_fixed_latents(data_root: Path, tmp_path: Path) -> None:
    evaluator = evaluate.Evaluator(eval_config(data_root, tmp_path / "judges"), ONE_RANK, SPEC)
    torch.manual_seed(0)
    generator = BarGenerator(8)
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
    """A real gan_dist checkpoint: two steps of a tiny MLP GAN on the tiny split."""
    run_dir = tmp_path / "run"
    status = train_main([f"run_dir={run_dir}", f"data.root={data_root}", "data.download=false",
                         "log.wandb.mode=disabled", "log.progress=false", "model.g_hidden=[16]",
                         "model.d_hidden=[16]", "train.batch_size=16", "train.max_steps=2", "dist.device=cpu"])
    assert status == 0
    return run_dir / "checkpoints" / "step_2.pt"


def run_cli(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert evaluate.main(list(args), SPEC) == 0
    return json.loads(out.read_text())


def test_cli_two_gloo_ranks_equal_one_rank(checkpoint: Path, tmp_path: Path) -> None:
    """Two ranks train the judge together (DDP) and cache it; one rank then reuses it and agrees."""
    common = ["--checkpoint", str(checkpoint), "--n-per-class", "10", f"eval.judge_dir={tmp_path / 'judges'}",
              "dist.device=cpu"]
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                __file__, *common, "--out", tmp_path / "two.json"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # one JSON line, from rank 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["judge_cache"] == "trained"

    one = run_cli(*common, "--out", str(tmp_path / "one.json"))
    assert one["world_size"] == 1 and one["judge_cache"] == "hit" and one["judge_key"] == two["judge_key"]
    assert one["kind"] == "checkpoint" and one["n_samples"] == 100
    assert one["judge_trained_on"] == "mnist/train" and not one["reference_is_training_data"]
    for key in evaluate.METRICS:
        assert {key, f"floor_real_{key}", f"floor_noise_{key}"} <= one.keys()
    numbers = [k for k, v in one.items() if isinstance(v, float) and k != "seconds"]
    assert {k: two[k] for k in numbers} == pytest.approx({k: one[k] for k in numbers}, rel=1e-5, abs=1e-6)


def test_cli_scores_an_npz(data_root: Path, tmp_path: Path) -> None:
    """The reference itself, as uint8: FID ~0, precision and recall 1, accuracy = the judge's on test."""
    images, labels = write_idx(data_root, 400, "test", seed=2)  # the same reference, written again
    np.savez(tmp_path / "samples.npz", images=images, labels=labels.astype(np.int64))
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


@pytest.mark.parametrize("args, message", [
    (["--out", "missing/scores.json"], "argument --out: missing/scores.json: the folder missing does not exist"),
    (["--out", "."], "argument --out: . is a folder; name a file in it"),
    (["model.z_dim=7"], "model.z_dim=7: the checkpoint's weights fix its model; model.* overrides cannot apply"),
    (["--n-per-class", "0"], "argument --n-per-class: expected an integer >= 2, got '0'"),
])
def test_cli_refuses_bad_arguments_before_any_work(args: list[str], message: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """One line and exit 2 before the checkpoint is even opened (it does not exist here)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", "none.pt", *args])
    err = capsys.readouterr().err
    assert exit.value.code == evaluate.EXIT_USAGE and message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_non_finite_checkpoint(checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["generator"]["net.0.bias"].fill_(float("inf"))
    torch.save(state, tmp_path / "diverged.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "diverged.pt")]) == evaluate.EXIT_USAGE
    assert f"checkpoint {tmp_path / 'diverged.pt'}: generator has non-finite values" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt")]) == evaluate.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


if __name__ == "__main__":  # the CLI with this file's tiny judge, for the two-rank run under torchrun
    sys.exit(evaluate.main(sys.argv[1:], SPEC))
