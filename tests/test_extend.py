"""README: "Adding one touches one module and one recipe". A module outside the package registers an
architecture, a loss, a term of D's loss and a data source through the public registries; a recipe names them with their
options, and the real trainer trains on them, end to end, on one CPU process."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from conftest import base_overrides, run

from gan_dist.config import ARCHITECTURES, DATASETS, LOSSES, TERMS
from gan_dist.configio import describe, load_config
from gan_dist.train import main

MODULE = "my_gan_parts"
PLUGIN = '''
"""A user's own architecture, loss, loss term and data source, kept outside gan_dist."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import ARCHITECTURES, DATASETS, LOSSES, TERMS, DataError, DatasetInfo, ModelConfig, opt
from gan_dist.training.objectives import Objective
from gan_dist.training.terms import Term
from gan_dist.models.base import Architecture, label_count
from gan_dist.data.sources import Decoded, Source, convert_arrays


@dataclass(frozen=True)
class TinyOptions:
    hidden: int = opt(32, "hidden width of G and D", ge=1)


class TinyGenerator(nn.Module):
    """z and the label's one-hot code -> hidden -> C·H·W."""

    def __init__(self, cfg: ModelConfig, info: DatasetInfo) -> None:
        super().__init__()
        self.classes, self.shape = label_count(cfg, info), info.shape
        self.net = nn.Sequential(nn.Linear(cfg.z_dim + self.classes, cfg.options.hidden), nn.ReLU(),
                                 nn.Linear(cfg.options.hidden, math.prod(self.shape)), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = F.one_hot(labels, self.classes).to(z.dtype)
        return self.net(torch.cat([z, code], 1)).view(-1, *self.shape)


def tiny_trunk(cfg: ModelConfig, info: DatasetInfo, label_in: int) -> tuple[nn.Module, int]:
    trunk = nn.Sequential(nn.Linear(math.prod(info.shape) + label_in, cfg.options.hidden), nn.LeakyReLU(0.2))
    return trunk, cfg.options.hidden


ARCHITECTURES.register("tiny", TinyOptions)(Architecture(TinyGenerator, tiny_trunk, flat=True))


@dataclass(frozen=True)
class LeastSquaresOptions:
    target: float = opt(1.0, "the score D is pulled to on real images, and G on fakes", gt=0)


@LOSSES.register("least_squares", LeastSquaresOptions)
class LeastSquares(Objective):
    extra = ("ls_real", "ls_fake")

    def __init__(self, options: LeastSquaresOptions) -> None:
        self.target = options.target

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = 0.5 * ((real - self.target).square().mean() + fake.square().mean())
        return loss, {"ls_real": real.detach().mean(), "ls_fake": fake.detach().mean()}

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (fake - self.target).square().mean()


@dataclass(frozen=True)
class DriftOptions:
    weight: float = opt(0.0, "weight ε of ε·E[D(x)²] on real images (0: off)", ge=0)


@TERMS.register("drift", DriftOptions)
class Drift(Term):
    """ProGAN's drift penalty: keeps D's scores on real images near 0."""

    metrics = ("drift",)

    @staticmethod
    def on(options: DriftOptions) -> bool:
        return options.weight > 0

    def __call__(self, phase):
        drift = phase.real_logits.square().mean()
        return self.options.weight * drift, {"drift": drift.detach()}

    def __str__(self) -> str:
        return f"drift ε={self.options.weight:g}"


class NpzSource(Source):
    """<root>/<split>.npz: uint8 images [N, H, W] and their labels."""

    def path(self, split: str) -> Path:
        return self.root / f"{split}.npz"

    def has(self, split: str) -> bool:
        return self.path(split).is_file()

    def missing(self, split: str) -> DataError:
        return DataError(f"{self.cfg.name} {split} split not found: put {split}.npz in {self.root}")

    def files(self) -> list[Path]:
        return [self.path(s) for s in ("train", "test") if self.has(s)]

    def read(self) -> Decoded:
        arrays = {}
        for split in ("train", "test"):
            if self.has(split):
                with np.load(self.path(split)) as f:
                    arrays[split] = f["images"], f["labels"]
        classes = 1 + max(int(labels.max()) for _, labels in arrays.values())
        return convert_arrays(self.cfg, arrays, tuple(f"class_{c}" for c in range(classes)), str(self.root))


DATASETS.register("npz")(NpzSource)
'''
ADDED = {ARCHITECTURES: "tiny", LOSSES: "least_squares", TERMS: "drift", DATASETS: "npz"}
RECIPE = {"data": {"name": "npz"}, "model": {"arch": "tiny", "tiny": {"hidden": 24}},
          "loss": {"kind": "least_squares", "least_squares": {"target": 0.5}, "drift": {"weight": 0.01}},
          "train": {"max_steps": 4}}
"""The one recipe: the new names, and options of the new architecture, loss and term."""


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[ModuleType]:
    """The user's module, written outside the package and imported, as their own launcher script would
    before calling ``gan_dist.train.main``. The registries have no way to drop a name, so each gets a copy
    of its entries for the test, and its own back after it: no other test sees the names."""
    path = tmp_path / f"{MODULE}.py"
    path.write_text(PLUGIN)
    with pytest.MonkeyPatch.context() as mp:
        for registry in ADDED:
            mp.setattr(registry, "_entries", dict(registry.entries))
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, MODULE, module)  # where dataclasses and type hints look the module up
        spec.loader.exec_module(module)
        yield module
    assert not [name for registry, name in ADDED.items() if name in registry.names()], "the names outlived the test"


def write_npz(root: Path, n: int) -> None:
    """Train and test splits of ``n`` 12×12 images in two classes, a bright top or bottom half."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.arange(n) % 2
        images = rng.integers(0, 40, size=(n, 12, 12), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[6 * label: 6 * label + 6] += 200
        np.savez(root / f"{split}.npz", images=images, labels=labels)


def test_a_module_and_a_recipe_add_an_architecture_a_loss_and_a_source(
        plugin: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, root, recipe = tmp_path / "run", tmp_path / "npz", tmp_path / "tiny.yaml"
    write_npz(root, 64)
    recipe.write_text(yaml.safe_dump(RECIPE))
    status = main(["--config", str(recipe), *base_overrides(run_dir, root)])
    out = capsys.readouterr()
    assert status == 0, out.err[-3000:]
    assert "npz test (64 images, 1×12×12, 2 classes)" in out.out
    # The loss's own metrics reach metrics.jsonl by their names.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all({"d_loss", "g_loss", "ls_real", "ls_fake", "drift"} <= r.keys() for r in records)
    assert "drift ε=0.01" in out.out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["model"]["tiny"], saved["loss"]["least_squares"], saved["loss"]["drift"]) == (
        {"hidden": 24}, {"target": 0.5}, {"weight": 0.01})
    weights = torch.load(run_dir / "checkpoints" / "step_4.pt", weights_only=True)["engine"]["generator"]
    assert weights["net.0.weight"].shape == (24, 100 + 2)  # z and the source's 2 classes, into the recipe's width
    assert (run_dir / "samples" / "step_4.png").is_file()


def test_the_config_takes_the_new_names_and_their_options(plugin: ModuleType) -> None:
    cfg = load_config(None, ["model.arch=tiny", "model.tiny.hidden=8", "loss.kind=least_squares", "data.name=npz"])
    assert (cfg.model.options, cfg.loss.options) == (plugin.TinyOptions(8), plugin.LeastSquaresOptions())
    shown = "\n".join(describe())
    assert "model.arch ('mlp' | 'dcgan' | 'resnet' | 'r3gan' | 'tiny')" in shown
    assert "model.tiny.hidden (int) = 32" in shown


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.arch=tinny"], "model.arch: unknown architecture 'tinny'; known: mlp, dcgan, resnet, r3gan, tiny"),
    (["loss.kind=least_square"], "loss.kind: unknown loss 'least_square'; known: bce, hinge, rpgan, least_squares"),
    (["data.name=npy"], "data.name: unknown dataset 'npy'; known: mnist, fashion_mnist, idx, cifar10, cifar100, "
                        "folder, npz"),
    (["model.arch=tiny", "model.tiny.hidden=0"], "model.tiny.hidden: expected values >= 1"),
    (["model.tiny.hidden=8"], "model.tiny.hidden: applies with model.arch=tiny"),
], ids=["arch", "loss", "source", "option out of range", "option of an arch not chosen"])  # fmt: skip
def test_a_wrong_name_or_option_is_one_line_naming_the_key(plugin: ModuleType, overrides: list[str], message: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(overrides) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.integration
def test_imports_names_the_module_for_the_command_line(tmp_path: Path) -> None:
    """``imports`` loads the user's module in the trainer's own process (every rank runs it), and a sampler
    of its checkpoint, with nothing but the config; a module that cannot be imported is a config error."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / f"{MODULE}.py").write_text(PLUGIN)
    run_dir, root, recipe = tmp_path / "run", tmp_path / "npz", tmp_path / "tiny.yaml"
    write_npz(root, 32)
    recipe.write_text(yaml.safe_dump(RECIPE | {"imports": [MODULE]}))
    env = {"PYTHONPATH": str(tmp_path / "plugins")}
    trained = run([sys.executable, "-m", "gan_dist.train", "--config", recipe, *base_overrides(run_dir, root)],
                  env_extra=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    sampled = run([sys.executable, "-m", "gan_dist.sample", "--checkpoint", run_dir / "checkpoints" / "step_4.pt",
                   "--grid", tmp_path / "grid.png"], env_extra=env)
    assert sampled.returncode == 0 and (tmp_path / "grid.png").is_file(), sampled.stderr[-3000:]
    missing = run([sys.executable, "-m", "gan_dist.train", "imports=[no_such_module]", "--dry-run"])
    assert missing.returncode == 2 and missing.stderr.startswith("config error: imports: cannot import"), \
        missing.stderr


def test_a_term_that_reports_a_taken_metric_name_is_refused_at_build(plugin: ModuleType, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A term's metric names are checked once, when the loss is built: one line naming the name, exit 2."""

    class Clash(plugin.Drift):
        metrics = ("d_loss",)

    TERMS.register("clash", plugin.DriftOptions)(Clash)
    write_npz(tmp_path / "npz", 16)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    status = main(["--config", str(recipe), *base_overrides(tmp_path / "run", tmp_path / "npz"), "loss.clash.weight=1"])
    err = capsys.readouterr().err
    assert status == 2 and "the metric names d_loss are reported twice" in err and len(err.splitlines()) == 1, err
