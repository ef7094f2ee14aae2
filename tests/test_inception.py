"""eval.features=inception: torch-fidelity's InceptionV3, its FID, KID and IS, gan_dist's sharding and cache.

The real weights cannot be had here, so the tests build torch-fidelity's InceptionV3 with random weights
and save them in its weights-file format. Its own initialisation leaves the pool3 features near 1e-8
(every FID 0), so the convolutions are re-initialised (Kaiming normal), and the logits read the
features' differences from their mean, so that IS is not 1 everywhere. At 299×299 on a shared CPU an
image costs about 0.2 s: every set here is a few dozen images. Tests that need torch-fidelity skip
without it (it is the ``metrics`` extra, which ``dev`` pulls in).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import _class_pattern, run, write_cifar, write_idx
from test_evaluate import ONE_RANK, data_config, one_thread, train_tiny  # noqa: F401 (one_thread: autouse)
from torch import nn

import gan_dist.evaluation
from gan_dist import cli, evaluate
from gan_dist.config import Config, EvalConfig, ModelConfig
from gan_dist.evaluation import scores as metrics
from gan_dist.evaluation.evaluator import INCEPTION_METRICS, Evaluator
from gan_dist.train import main as train_main


def fidelity():
    return pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's InceptionV3 with random weights, as its weights file holds them (a state dict)."""
    fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # its own init, no weights
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(
            folder / "empty.pt"))
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, generator=gen)
    rgb = np.stack([_class_pattern(np.random.default_rng(c), c, 28, 28) for c in range(6)]).transpose(0, 3, 1, 2)
    probe = torch.from_numpy(np.concatenate([rgb[:3], rgb[3:].max(1, keepdims=True).repeat(3, 1)]))
    with torch.no_grad():
        (features,) = net(probe)  # colour and grey images: both kinds the tests score
        mean = features.mean(0)
        logits = torch.randn(1008, 2048, generator=gen)
        logits -= (logits @ mean)[:, None] * mean / (mean @ mean)  # the mean image's logits are 0
        net.fc.weight.copy_(logits * 3 / (features @ logits.T).std(0).mean())  # logits spread by about 3
    torch.save(net.state_dict(), folder / "weights-random.pth")
    return folder / "weights-random.pth"


def inception_args(weights: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["eval.features=inception", f"eval.inception_weights={weights}",
            f"eval.features_dir={tmp_path / 'features'}", "eval.batch_size=8", "dist.device=cpu", *extra]


def npz_args(npz: Path, out: Path, root: Path, *extra: str) -> list[str]:
    return ["--npz", str(npz), "--out", str(out), f"data.root={root}", "data.download=false",
            f"data.cache_dir={root.parent / 'cache'}", *extra]


class Images(torch.utils.data.Dataset):
    """uint8 [N, 3, H, W] as a dataset, torch-fidelity's input."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ------------------------------------------------------------------------------ torch-fidelity's numbers


@pytest.mark.integration
def test_scores_equal_torch_fidelity_calculate_metrics(weights: Path, tmp_path: Path) -> None:
    """An npz scored end to end against CIFAR's test split equals ``calculate_metrics`` on the same images
    (without labels: Inception's scores read none, even on labelled data)."""
    reals = write_cifar(tmp_path / "cifar", 40)["test"][0]  # 20 images [N, 32, 32, 3]
    rng = np.random.default_rng(7)
    fakes = np.stack([_class_pattern(rng, c % 10, 32, 32) for c in range(12)])
    fakes[::3] = rng.integers(0, 256, fakes[::3].shape, dtype=np.uint8)  # a third noise: far from the reals
    np.savez(tmp_path / "fakes.npz", images=fakes)
    assert evaluate.main([*npz_args(tmp_path / "fakes.npz", tmp_path / "out.json", tmp_path / "cifar", "--no-floors",
                                    "data.name=cifar10"),
                          *inception_args(weights, tmp_path)]) == 0
    ours = json.loads((tmp_path / "out.json").read_text())

    theirs = fidelity().calculate_metrics(
        input1=Images(torch.from_numpy(fakes).permute(0, 3, 1, 2)), input2=Images(torch.from_numpy(reals).permute(
            0, 3, 1, 2)), isc=True, fid=True, kid=True, prc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), kid_subset_size=12, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True)
    assert ours["kid_subset_size"] == 12 and ours["n_samples"] == 12 and ours["n_reference"] == 20
    pairs = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean",
             "kid_std": "kernel_inception_distance_std", "is": "inception_score_mean", "is_std": "inception_score_std",
             "precision": "precision", "recall": "recall"}
    assert {k: ours[k] for k in pairs} == pytest.approx({k: theirs[v] for k, v in pairs.items()}, rel=1e-3)
    assert ours["fid"] > 1 and ours["kid"] > 1e-3 and ours["is"] > 1.1  # no comparison is 0 = 0
    assert ours["features"] == "inception" and ours["input"] == "uint8 RGB" and not ours["weights_official"]
    assert ours["resize"] == "torch-fidelity's TensorFlow-1-compatible bilinear resize, 32×32 to 299×299"
    assert ours["extractor"].startswith("torch-fidelity 0.4") and ours["reference"] == "cifar10/test"


def test_our_kid_for_the_judge_is_torch_fidelitys_kid() -> None:
    fidelity()
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_kid import kid_features_to_metric

    ours = {"kid_subsets": metrics.KID_SUBSETS, "kid_subset_size": metrics.KID_SUBSET_SIZE,
            "rng_seed": metrics.KID_SEED}
    assert ours == {k: DEFAULTS[k] for k in ours}  # the judge's KID follows torch-fidelity's protocol
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 64, generator=gen), torch.randn(200, 64, generator=gen) * 1.2 + 0.1
    theirs = kid_features_to_metric(fake, real, kid_subset_size=200, verbose=False)
    assert metrics.kid(real, fake) == pytest.approx(
        (theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]), rel=1e-4)


@pytest.mark.integration
def test_one_channel_is_replicated_and_float_images_are_rounded_to_pixels(weights: Path) -> None:
    from gan_dist.evaluation.inception import Inception

    space = Inception(str(weights), torch.device("cpu"))
    grey = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features, logits = space(grey, 1)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.equal(features, space(grey.repeat(1, 3, 1, 1), 1)[0])
    assert torch.equal(features, space(grey.float() / 127.5 - 1, 2)[0])


# ------------------------------------------------------------------------------------ ranks, cache, training


@pytest.mark.integration
def test_checkpoint_two_gloo_ranks_equal_one_rank_on_one_channel_data(weights: Path, tmp_path: Path) -> None:
    """MNIST-format data (one channel, replicated): 2 ranks embed and cache the reference, 1 rank agrees."""
    write_idx(tmp_path / "data", 32, "train", seed=1)
    write_idx(tmp_path / "data", 20, "test", seed=2)
    checkpoint = train_tiny(tmp_path / "data", tmp_path, "model.conditioning=none")
    common = ["--checkpoint", str(checkpoint), "--n-per-class", "10", "--no-floors"]
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "gan_dist.evaluate", *common, "--out", tmp_path / "two.json", *inception_args(weights, tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["reference_cache"] == "computed"

    assert evaluate.main([*common, "--out", str(tmp_path / "one.json"),
                          *inception_args(weights, tmp_path / "alone")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["world_size"] == 1 and one["reference_cache"] == "computed"
    assert one["input"] == "uint8 RGB: the data's one channel replicated to three"
    assert one["reference"] == "mnist/test" and one["n_reference"] == 20 and one["n_samples"] == 10
    assert set(INCEPTION_METRICS) <= one.keys() and "cond_acc" not in one and one["fid"] > 1
    numbers = [k for k, v in one.items() if isinstance(v, float) and k != "seconds"]
    assert {k: two[k] for k in numbers} == pytest.approx({k: one[k] for k in numbers}, rel=1e-4, abs=1e-6)
    for name in ("features", "logits"):
        shared = torch.load(tmp_path / "features" / f"{one['reference_key']}.pt")[name]
        alone = torch.load(tmp_path / "alone" / "features" / f"{one['reference_key']}.pt")[name]
        assert (shared - alone).abs().max() <= 1e-5 * shared.abs().max()  # float32 sums over other batches


@pytest.mark.integration
def test_reference_features_are_cached_per_content_split_and_weights(weights: Path, tmp_path: Path) -> None:
    write_idx(tmp_path / "data", 8, "train", seed=1)
    write_idx(tmp_path / "data", 4, "test", seed=2)
    cfg = Config(data=data_config(tmp_path / "data"), model=ModelConfig(z_dim=8, conditioning="none"),
                 eval=EvalConfig(n_samples=10, features="inception", inception_weights=str(weights), reference="train",
                                 features_dir=str(tmp_path / "features"), batch_size=8))
    first = Evaluator(cfg, ONE_RANK)
    assert first.info["reference_cache"] == "computed" and first.info["reference"] == "mnist/train"
    assert first.info["reference_is_training_data"] and first.info["kid_subset_size"] == 8
    assert first.info["reference_key"].startswith("mnist-train-") and len(first.info["weights_sha256"]) == 64
    again = Evaluator(cfg, ONE_RANK)
    assert again.info["reference_cache"] == "hit" and again.info["reference_key"] == first.info["reference_key"]
    assert torch.equal(again.real.features, first.real.features) and torch.equal(again.real.logits, first.real.logits)
    floors = again.floors()
    assert set(floors) == {f"floor_{end}_{k}" for end in ("real", "noise") for k in INCEPTION_METRICS}
    assert floors["floor_real_fid"] < floors["floor_noise_fid"] and floors["floor_real_kid"] < floors["floor_noise_kid"]

    images = tmp_path / "data" / "train-images-idx3-ubyte"
    pixels = bytearray(images.read_bytes())
    pixels[16 + 300] ^= 0xFF  # one pixel of the first image: other data
    images.write_bytes(bytes(pixels))
    changed = Evaluator(cfg, ONE_RANK)
    assert changed.info["reference_cache"] == "computed"
    assert changed.info["reference_key"] != first.info["reference_key"]


@pytest.mark.integration
def test_training_evaluates_in_inceptions_space_and_keeps_best_by_its_fid(weights: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_idx(tmp_path / "data", 32, "train", seed=1)
    write_idx(tmp_path / "data", 10, "test", seed=2)
    checkpoint = train_tiny(tmp_path / "data", tmp_path, "eval.every_steps=1", "eval.n_samples=10",
                            *inception_args(weights, tmp_path))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval/fid" in line]
    assert [e["step"] for e in evals] == [1, 2]
    assert all({f"eval/{k}" for k in INCEPTION_METRICS} <= e.keys() for e in evals)
    assert "eval/cond_acc" not in evals[0] and (checkpoint.parent / "best.pt").exists()
    assert f"new best FID {evals[0]['eval/fid']:.3f}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("weights_arg, message", [
    (None, "config error: eval.inception_weights: unset; eval.features=inception needs torch-fidelity's "
           "weights-inception-2015-12-05-6726825d.pth, from https://github.com/toshas/torch-fidelity/releases/"),
    ("missing.pth", "config error: eval.inception_weights: missing.pth does not exist; "),
    (".", "config error: eval.inception_weights: . is not a file; "),
])
def test_unset_or_missing_weights_exit_2_before_any_work(weights_arg: str | None, message: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Neither the npz nor the data exist: the weights are what is checked first."""
    fidelity()
    monkeypatch.chdir(tmp_path)
    args = ["--npz", "none.npz", "data.root=nowhere", "eval.features=inception"]
    assert evaluate.main(args + ([f"eval.inception_weights={weights_arg}"] if weights_arg else [])) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(message) and "(gan_dist never downloads it)" in err and len(err.splitlines()) == 1


def wrong_files(weights: Path, folder: Path) -> dict[str, str]:
    """Files that are not the weights, each with what the error says of it."""
    state = torch.load(weights, weights_only=True)
    torch.save(state | {"fc.weight": torch.zeros(1000, 2048)}, folder / "imagenet_1000.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")} | {"head.weight": torch.zeros(2)},
               folder / "other_net.pth")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    torch.save({"nested": {"a": torch.zeros(1)}}, folder / "nested.pth")
    (folder / "text.pth").write_text("not weights\n")
    return {"imagenet_1000.pth": "its fc.weight is (1000, 2048), InceptionV3's is (1008, 2048)",
            "other_net.pth": "and has 1 others ['head.weight']",
            "tensor.pth": "it holds a Tensor of other things, not a state dict of tensors",
            "nested.pth": "it holds a dict of other things",
            "text.pth": "is not a PyTorch weights file: torch.load(weights_only=True) refuses it (UnpicklingError)"}


def test_a_wrong_weights_file_exits_2_naming_what_differs(weights: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name, message in wrong_files(weights, tmp_path).items():
        code = evaluate.main(["--npz", "none.npz", "eval.features=inception",
                              f"eval.inception_weights={tmp_path / name}"])
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
        assert err.startswith(f"config error: eval.inception_weights: {tmp_path / name} ") and message in err, err


def test_training_checks_the_weights_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fidelity()
    code = train_main([f"run_dir={tmp_path / 'run'}", "data.root=nowhere", "data.download=false", "eval.every_steps=10",
                       "eval.features=inception", f"eval.inception_weights={tmp_path / 'x.pth'}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and "eval.inception_weights" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_without_torch_fidelity_inception_is_a_config_error(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import torch_fidelity now fails
    monkeypatch.delitem(sys.modules, "gan_dist.evaluation.inception", raising=False)
    monkeypatch.delattr(gan_dist.evaluation, "inception", raising=False)
    assert evaluate.main(["--npz", "none.npz", "eval.features=inception", "eval.inception_weights=w.pth"]) == 2
    assert capsys.readouterr().err == ("config error: eval.features=inception needs torch-fidelity: "
                                       "pip install -e '.[metrics]'\n")
