"""The judge cache, the Evaluator, and the CLI (one process, two gloo ranks under torchrun, and .npz).

Everything runs on conftest's tiny datasets: in the IDX splits class c is a bright bar at its own
row band on a dark, noisy background; in the CIFAR batches and image folders the bar's band and
colour follow the class; a flat folder's images all carry the bar along their top edge. Even a
judge trained for a few steps tells the classes (or the rotations) apart.
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
from conftest import run, write_cifar, write_folder, write_idx
from torch import nn

from gan_dist import cli, evaluate
from gan_dist.config import Config, DataConfig, DatasetInfo, EvalConfig, ModelConfig
from gan_dist.data.cache import load_split
from gan_dist.data.pixels import to_unit
from gan_dist.dist import DistEnv
from gan_dist.evaluation import judge
from gan_dist.evaluation.evaluator import METRICS, ConfigError, Evaluator
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


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """CIFAR-10's format: 640 training and 320 test images, 32×32 RGB, 10 classes."""
    write_cifar(tmp_path / "cifar", 640)
    return tmp_path / "cifar"


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    """A flat folder of 300 RGB 32×32 images, no classes; data.holdout=0.2 of them is the test split."""
    write_folder(tmp_path / "flat", None, size=32, modes=("RGB",), formats=("png",), n=300)
    return tmp_path / "flat"


def data_config(root: Path, name: str = "mnist") -> DataConfig:
    return DataConfig(name=name, root=str(root), split="train", download=False, holdout=0.2,
                      cache_dir=str(root.parent / "cache"))


def eval_config(root: Path, judges: Path, n_samples: int = 200, name: str = "mnist",
                conditioning: str = "concat") -> Config:
    return Config(data=data_config(root, name), model=ModelConfig(z_dim=8, conditioning=conditioning),
                  eval=EvalConfig(n_samples=n_samples, judge_dir=str(judges), batch_size=64))


def describe(channels: int, resolution: int, classes: int, name: str) -> DatasetInfo:
    return DatasetInfo(name, channels, resolution, classes, tuple(f"c{i}" for i in range(classes)),
                       {"train": 0, "test": 0}, "tests")


class BankGenerator(nn.Module):
    """A stand-in for a good G, for any data: a training image of the asked class, picked by the latent.

    With fewer than 2 classes the whole bank is one class, as an unconditional G is asked for label 0.
    """

    def __init__(self, cfg: DataConfig, classes: int) -> None:
        super().__init__()
        split = load_split(cfg, ONE_RANK, "train")
        labels = split.labels if classes >= 2 else np.zeros_like(split.labels)
        order = np.argsort(labels, kind="stable")
        counts = torch.from_numpy(np.bincount(labels, minlength=max(classes, 1)))
        self.register_buffer("bank", to_unit(torch.from_numpy(np.array(split.images[order]))))
        self.register_buffer("counts", counts)
        self.register_buffer("starts", counts.cumsum(0) - counts)
        self.dummy = nn.Linear(1, 1)  # a parameter, as every G has

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pick = (z[:, 0].abs() * 1e4).long() % self.counts[labels]
        return self.bank[self.starts[labels] + pick]


# ------------------------------------------------------------------------------------------------ judge


def test_judge_is_cached_reused_and_invalidated_by_new_data(data_root: Path, tmp_path: Path) -> None:
    judges = tmp_path / "judges"
    first = judge.load_or_train(data_config(data_root), judges, ONE_RANK, SPEC)
    assert first.info["cache"] == "trained" and first.info["trained_on"] == "mnist/train"
    assert first.info["task"] == "classes" and first.info["shape"] == [1, 28, 28]
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


def test_an_idx_pair_cannot_be_downloaded_so_the_judge_holds_out_test(tmp_path: Path) -> None:
    write_idx(tmp_path / "data", 400, "test", seed=3)
    cfg = dataclasses.replace(data_config(tmp_path / "data", "idx"), download=True)
    assert judge.judge_data(cfg, ONE_RANK, holdout=0.2, seed=0).trained_on == "test"


@pytest.mark.skipif(not (MNIST / "MNIST" / "raw").is_dir(), reason="the real MNIST test digits are not here")
def test_real_mnist_without_train_split_falls_back_to_held_out_test(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist", root=str(MNIST), split="test", download=False, cache_dir=str(tmp_path))
    data = judge.judge_data(cfg, ONE_RANK, holdout=0.2, seed=0)
    assert data.trained_on == "test"
    assert (len(data.train[1]), len(data.heldout[1])) == (8000, 2000)


def test_the_net_follows_the_description() -> None:
    """28×28 keeps the MNIST judge's layers; 32 and 64 go down to 8; the head has a logit per class or rotation."""
    assert [judge.judge_stages(r) for r in (7, 8, 16, 28, 32, 64, 100)] == [1, 1, 1, 2, 2, 3, 4]
    mnist = judge.JudgeNet(SPEC, describe(1, 28, 10, "mnist"))
    layers = [(type(m).__name__, tuple(m.weight.shape)) for m in mnist.modules() if hasattr(m, "weight")]
    assert layers == [("Conv2d", (4, 1, 5, 5)), ("Conv2d", (8, 4, 3, 3)), ("Linear", (16, 8 * 7 * 7)),
                      ("Linear", (10, 16))]
    for info, outputs in ((describe(3, 64, 100, "cifar100"), 100), (describe(3, 32, 0, "folder"), 4),
                          (describe(1, 32, 1, "folder"), 4)):
        features, logits = judge.JudgeNet(SPEC, info)(torch.zeros(2, *info.shape))
        assert features.shape == (2, SPEC.features) and logits.shape == (2, outputs)


def test_shifts_move_every_channel_alike_and_turns_are_quarter_rotations() -> None:
    x = torch.rand(5, 3, 9, 9) * 2 - 1
    rgb = judge.shifted(x, 2, torch.Generator().manual_seed(7))
    for c in range(3):
        assert torch.equal(rgb[:, c:c + 1], judge.shifted(x[:, c:c + 1], 2, torch.Generator().manual_seed(7)))
    assert not torch.equal(rgb, x) and torch.equal(judge.shifted(x, 0, torch.Generator()), x)
    turns = torch.tensor([0, 1, 2, 3, 1])
    expected = torch.stack([torch.rot90(im, int(k), (1, 2)) for im, k in zip(x, turns, strict=True)])
    assert torch.equal(judge.turned(x, turns), expected)


def test_judge_on_rgb_32_trains_and_caches(cifar_root: Path, tmp_path: Path) -> None:
    cfg = data_config(cifar_root, "cifar10")
    first = judge.load_or_train(cfg, tmp_path / "judges", ONE_RANK, SPEC)
    assert first.info["trained_on"] == "cifar10/train" and first.info["task"] == "classes"
    assert first.info["shape"] == [3, 32, 32] and (first.info["n_train"], first.info["n_heldout"]) == (640, 320)
    assert first.info["accuracy"] > 0.9 and first.net.head.out_features == 10
    assert Path(first.info["path"]).name.startswith("cifar10-train-")
    assert judge.load_or_train(cfg, tmp_path / "judges", ONE_RANK, SPEC).info["cache"] == "hit"


def test_without_classes_the_judge_learns_rotations(flat_root: Path, tmp_path: Path) -> None:
    cfg = data_config(flat_root, "folder")
    first = judge.load_or_train(cfg, tmp_path / "judges", ONE_RANK, SPEC)
    assert first.info["task"] == "rotation" and first.net.head.out_features == judge.ROTATIONS
    assert first.info["trained_on"] == "folder/train" and (first.info["n_train"], first.info["n_heldout"]) == (240, 60)
    assert first.info["accuracy"] > 0.9  # the bar along the top edge tells every quarter turn apart
    again = judge.load_or_train(cfg, tmp_path / "judges", ONE_RANK, SPEC)
    assert again.info["cache"] == "hit" and again.info["task"] == "rotation"


def test_the_task_and_the_shape_are_in_the_key(data_root: Path) -> None:
    """The same pixels described with no classes, or as another shape, are another judge."""
    data = judge.judge_data(data_config(data_root), ONE_RANK, holdout=0.2, seed=0)
    keys = {judge.content_hash(dataclasses.replace(data, info=info), SPEC)
            for info in (data.info, dataclasses.replace(data.info, num_classes=0, class_names=()),
                         dataclasses.replace(data.info, channels=3))}
    assert len(keys) == 3


# -------------------------------------------------------------------------------------------- Evaluator


def test_evaluator_scores_a_good_generator_near_real_and_far_from_noise(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    evaluator = Evaluator(cfg, ONE_RANK, SPEC)
    torch.manual_seed(0)
    good = evaluator.run(BankGenerator(cfg.data, 10))
    floors = evaluator.floors()
    assert set(good) == {*METRICS, "n_samples", "seconds"} and good["n_samples"] == 200
    assert good["cond_acc"] > 0.9 and floors["floor_real_cond_acc"] > 0.9
    assert good["fid"] < floors["floor_noise_fid"] / 10 and floors["floor_real_fid"] < floors["floor_noise_fid"] / 10
    noise_kid = floors["floor_noise_kid"]
    assert abs(good["kid"]) < noise_kid / 10 and abs(floors["floor_real_kid"]) < noise_kid / 10
    assert 0 < good["kid_std"] < noise_kid / 10
    assert good["intra_fid"] < floors["floor_noise_intra_fid"] / 10
    assert floors["floor_real_precision"] > 0.5 and floors["floor_noise_precision"] < 0.1
    assert evaluator.due(0) is False and evaluator.info["n_reference"] == 400


def test_run_is_score_images_of_the_fixed_latents(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    evaluator = Evaluator(cfg, ONE_RANK, SPEC)
    generator = BankGenerator(cfg.data, 10)
    by_run = evaluator.run(generator)
    by_images = evaluator.score_images(generator(evaluator.z, evaluator.labels), evaluator.labels)
    assert {k: by_run[k] for k in METRICS} == pytest.approx({k: by_images[k] for k in METRICS})
    assert torch.bincount(evaluator.labels).tolist() == [20] * 10


def test_due_follows_every_steps(data_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(data_root, tmp_path / "judges")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every_steps=50))
    evaluator = Evaluator(cfg, ONE_RANK, SPEC)
    assert [s for s in range(1, 160) if evaluator.due(s)] == [50, 100, 150]


def test_evaluator_on_rgb_data(cifar_root: Path, tmp_path: Path) -> None:
    """Conditional on CIFAR's shape: every metric; unconditional on the same data: no class metrics."""
    cfg = eval_config(cifar_root, tmp_path / "judges", name="cifar10")
    evaluator = Evaluator(cfg, ONE_RANK, SPEC)
    good, floors = evaluator.run(BankGenerator(cfg.data, 10)), evaluator.floors()
    assert evaluator.info["shape"] == [3, 32, 32] and evaluator.info["conditioned_on"] == 10
    assert set(good) == {*METRICS, "n_samples", "seconds"}
    assert good["cond_acc"] > 0.9 and good["fid"] < floors["floor_noise_fid"] / 10

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conditioning="none"))
    evaluator = Evaluator(plain, ONE_RANK, SPEC)
    assert evaluator.info["judge_task"] == "classes" and evaluator.info["judge_cache"] == "hit"  # the same judge
    assert evaluator.metrics == ("fid", "kid", "kid_std", "precision", "recall") and not evaluator.labels.any()
    scores = evaluator.run(BankGenerator(cfg.data, 0))
    assert set(scores) == {*evaluator.metrics, "n_samples", "seconds"} and scores["n_samples"] == 200
    assert set(evaluator.floors()) == {f"floor_{end}_{k}" for end in ("real", "noise") for k in evaluator.metrics}


def test_evaluator_on_unlabelled_data(flat_root: Path, tmp_path: Path) -> None:
    cfg = eval_config(flat_root, tmp_path / "judges", n_samples=60, name="folder", conditioning="none")
    evaluator = Evaluator(cfg, ONE_RANK, SPEC)
    assert evaluator.info["judge_task"] == "rotation" and evaluator.info["num_classes"] == 0
    good, floors = evaluator.run(BankGenerator(cfg.data, 0)), evaluator.floors()
    unconditional = ("fid", "kid", "kid_std", "precision", "recall")
    assert set(good) == {*unconditional, "n_samples", "seconds"} and good["n_samples"] == 60
    assert set(floors) == {f"floor_{end}_{k}" for end in ("real", "noise") for k in unconditional}
    assert good["fid"] < floors["floor_noise_fid"] / 10 and floors["floor_noise_precision"] < 0.1


def test_evaluator_refuses_too_few_samples_per_class(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval.n_samples: needs at least 20 \(2 per class of 10"):
        Evaluator(eval_config(cifar_root, tmp_path, n_samples=19, name="cifar10"), ONE_RANK, SPEC)


# ---------------------------------------------------------------------------------------------- read_npz


@pytest.mark.parametrize("info, arrays, message", [
    (describe(3, 32, 10, "cifar10"), {"images": np.zeros((20, 28, 28), np.uint8)},
     "'images' are 28×28 with 1 channel, the dataset (cifar10) is 32×32 with 3 channels"),
    (describe(3, 32, 10, "cifar10"), {"images": np.zeros((20, 32, 32), np.uint8)},
     "'images' are 32×32 with 1 channel, the dataset (cifar10) is 32×32 with 3 channels"),
    (describe(1, 28, 10, "mnist"), {"images": np.zeros((20, 28, 28, 3), np.uint8)},
     "'images' are 28×28 with 3 channels, the dataset (mnist) is 28×28 with 1 channel"),
    (describe(3, 32, 10, "cifar10"), {"images": np.zeros((20, 3, 32, 32), np.uint8)},
     "'images' must be [N, H, W] (1 channel) or [N, H, W, 3] (RGB), got shape (20, 3, 32, 32)"),
    (describe(1, 28, 10, "mnist"), {"images": np.zeros((20, 28, 28), np.float32)},
     "'images' must be uint8 pixels 0..255, got float32"),
    (describe(3, 32, 10, "cifar10"), {"images": np.zeros((22, 32, 32, 3), np.uint8), "labels": np.arange(22) % 11},
     "2 of 22 labels are outside 0..9 (the 10 classes of cifar10), e.g. 10"),
    (describe(3, 32, 10, "cifar10"), {"images": np.zeros((19, 32, 32, 3), np.uint8), "labels": np.arange(19) % 10},
     "class 9 has 1 sample(s); intra-class FID needs at least 2 of every class 0..9"),
    (describe(1, 28, 10, "mnist"), {"images": np.zeros((20, 28, 28), np.uint8), "labels": np.zeros((20, 2), int)},
     "'labels' must be integers [20], one per image, got int64 (20, 2)"),
    (describe(1, 28, 10, "mnist"), {"images": np.zeros((20, 28, 28), np.uint8)},
     "no 'labels' (int64 [20]) for a model of 10 classes; model.conditioning=none scores the images without them"),
    (describe(1, 28, 10, "mnist"), {"labels": np.zeros(20, int)}, "cannot read 'images'"),
    (describe(3, 32, 0, "folder"), {"images": np.zeros((3, 32, 32, 3), np.uint8)},
     "3 images; the k-NN precision/recall needs at least 4"),
])
def test_read_npz_says_what_differs_from_the_dataset(info: DatasetInfo, arrays: dict, message: str,
                                                     tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(evaluate.NpzError) as error:
        evaluate.read_npz(tmp_path / "bad.npz", info, info.num_classes)
    assert str(error.value).startswith(f"{tmp_path / 'bad.npz'}: {message}")


def test_read_npz_of_rgb_without_classes_needs_no_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images)
    pixels, labels = evaluate.read_npz(tmp_path / "rgb.npz", describe(3, 32, 10, "cifar10"), 0)
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, 32, 32)
    assert np.array_equal(pixels.permute(0, 2, 3, 1).numpy(), images) and labels.tolist() == [0] * 6


# -------------------------------------------------------------------------------------------------- CLI


def train_tiny(data_root: Path, tmp_path: Path, *extra: str) -> Path:
    """A real gan_dist checkpoint: two steps of a tiny MLP GAN on a test-written split (``extra``: overrides)."""
    run_dir = tmp_path / "run"
    status = train_main([f"run_dir={run_dir}", f"data.root={data_root}", "data.download=false",
                         f"data.cache_dir={tmp_path / 'cache'}", "log.wandb.mode=disabled", "log.progress=false",
                         "model.mlp.g_hidden=[16]", "model.mlp.d_hidden=[16]", "train.batch_size=16",
                         "train.max_steps=2", "dist.device=cpu", *extra])
    assert status == 0
    return run_dir / "checkpoints" / "step_2.pt"


@pytest.fixture
def checkpoint(data_root: Path, tmp_path: Path) -> Path:
    return train_tiny(data_root, tmp_path)


def run_cli(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert evaluate.main(list(args), SPEC) == 0
    return json.loads(out.read_text())


@pytest.mark.integration
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
    for key in METRICS:
        assert {key, f"floor_real_{key}", f"floor_noise_{key}"} <= one.keys()
    numbers = [k for k, v in one.items() if isinstance(v, float) and k != "seconds"]
    assert {k: two[k] for k in numbers} == pytest.approx({k: one[k] for k in numbers}, rel=1e-5, abs=1e-6)


def npz_args(npz: Path, out: Path, root: Path, *extra: str) -> list[str]:
    return ["--npz", str(npz), "--out", str(out), f"data.root={root}", "data.download=false", "data.holdout=0.2",
            f"data.cache_dir={root.parent / 'cache'}", f"eval.judge_dir={root.parent / 'judges'}", "dist.device=cpu",
            *extra]


@pytest.mark.integration
def test_cli_scores_an_npz(data_root: Path, tmp_path: Path) -> None:
    """The reference itself, as uint8: FID ~0, precision and recall 1, accuracy = the judge's on test."""
    images, labels = write_idx(data_root, 400, "test", seed=2)  # the same reference, written again
    np.savez(tmp_path / "samples.npz", images=images, labels=labels.astype(np.int64))
    record = run_cli(*npz_args(tmp_path / "samples.npz", tmp_path / "npz.json", data_root))
    assert record["kind"] == "npz" and record["n_samples"] == 400
    assert record["fid"] == pytest.approx(0.0, abs=1e-3)
    assert (record["precision"], record["recall"]) == (1.0, 1.0)
    assert record["cond_acc"] == pytest.approx(record["judge_accuracy"])


@pytest.mark.integration
def test_cli_scores_an_rgb_npz(tmp_path: Path) -> None:
    """CIFAR-10's own test images in the npz layout [N, 32, 32, 3] score as the reference itself."""
    images, labels = write_cifar(tmp_path / "cifar", 640)["test"]
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels)
    record = run_cli(*npz_args(tmp_path / "rgb.npz", tmp_path / "rgb.json", tmp_path / "cifar", "data.name=cifar10"))
    assert record["shape"] == [3, 32, 32] and record["n_samples"] == 320
    assert record["fid"] == pytest.approx(0.0, abs=1e-3) and (record["precision"], record["recall"]) == (1.0, 1.0)
    assert record["cond_acc"] == pytest.approx(record["judge_accuracy"])


@pytest.mark.integration
def test_cli_scores_unlabelled_samples_of_unlabelled_data(flat_root: Path, tmp_path: Path) -> None:
    """A flat folder has no classes: the npz needs no labels, and there are no class metrics."""
    cfg = data_config(flat_root, "folder")
    test = load_split(cfg, ONE_RANK, "test")
    np.savez(tmp_path / "flat.npz", images=np.asarray(test.images).transpose(0, 2, 3, 1))
    record = run_cli(*npz_args(tmp_path / "flat.npz", tmp_path / "flat.json", flat_root, "data.name=folder"))
    assert record["judge_task"] == "rotation" and record["conditioned_on"] == 0 and record["n_samples"] == 60
    assert record["fid"] == pytest.approx(0.0, abs=1e-3)
    assert not {"cond_acc", "intra_fid", "floor_real_cond_acc", "floor_noise_intra_fid"} & record.keys()


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((20, 28, 28), np.float32), "labels": np.arange(20) % 10}, "uint8"),
    ({"images": np.zeros((20, 28, 28), np.uint8), "labels": np.arange(20) % 10 + 1}, "outside 0..9"),
    ({"images": np.zeros((20, 32, 32), np.uint8), "labels": np.arange(20) % 10},
     "'images' are 32×32 with 1 channel, the dataset (mnist) is 28×28 with 1 channel"),
    ({"images": np.zeros((20, 28, 28), np.uint8)}, "no 'labels'"),
])
def test_cli_rejects_a_malformed_npz(arrays: dict, message: str, data_root: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    assert evaluate.main(npz_args(tmp_path / "bad.npz", tmp_path / "out.json", data_root)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_reference_of_another_shape(checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar(tmp_path / "cifar", 40)
    code = evaluate.main(["--checkpoint", str(checkpoint), "data.name=cifar10", f"data.root={tmp_path / 'cifar'}",
                          "data.download=false", f"data.cache_dir={tmp_path / 'cache'}"], SPEC)
    assert code == cli.EXIT_USAGE
    assert (f"checkpoint {checkpoint}: its G makes mnist's 28×28 with 1 channel and 10 classes; the reference "
            "(cifar10 test split) has 32×32 with 3 channels and 10 classes") in capsys.readouterr().err


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
    assert exit.value.code == cli.EXIT_USAGE and message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_non_finite_checkpoint(checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["engine"]["generator"]["net.0.bias"].fill_(float("inf"))
    torch.save(state, tmp_path / "diverged.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "diverged.pt")]) == cli.EXIT_USAGE
    assert f"checkpoint {tmp_path / 'diverged.pt'}: generator has non-finite values" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path / "none.pt")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


if __name__ == "__main__":  # the CLI with this file's tiny judge, for the two-rank run under torchrun
    sys.exit(evaluate.main(sys.argv[1:], SPEC))
