"""What a stage runs on: the device under test, the recipes and how much of each to run there."""

import sys
from dataclasses import dataclass
from pathlib import Path

from gan_dist.config import Config
from gan_dist.configio import load_config
from gan_dist.evaluation.judge import DEFAULT_SPEC, JudgeSpec

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass(frozen=True)
class Recipe:
    """A config file (None: the defaults) and overrides on top; ``arch`` is the model.arch they give."""

    config: str | None
    arch: str
    overrides: tuple[str, ...] = ()


# The defaults are the tutorial's recipe (configs/mnist_cgan.yaml's values), so the BatchNorm DCGAN is that
# recipe with conv nets: concat conditioning, BCE, and BatchNorm in D (spectral norm off). It starts from
# the defaults, not from the file: the file's model.mlp section does not apply to model.arch=dcgan.
RECIPES = {
    "mlp": Recipe("configs/mnist_cgan.yaml", "mlp"),
    "dcgan": Recipe("configs/mnist_dcgan.yaml", "dcgan"),
    "dcgan_bn": Recipe(None, "dcgan", ("model.arch=dcgan",)),
    # configs/folder_small.yaml's networks and loss on the stage's data (the file's data section is an RGB folder's)
    "resnet": Recipe(None, "resnet", ("model.arch=resnet", "model.conditioning=projection", "model.spectral_norm=true",
                                      "loss.kind=hinge", "ema.enabled=true")),
}


@dataclass(frozen=True)
class Sizes:
    """How much each stage runs: the full check on a GPU, or a smoke of the same code on a CPU."""

    batch: int
    model: dict[str, tuple[str, ...]]  # per model.arch, the overrides that shrink its networks
    warmup: int  # steps before the checked ones (lazy initialisation may sync once)
    steps: int  # checked steps per combination, per rank configuration, per sweep point
    resumed: tuple[str, ...]  # recipes of the SIGTERM -> resume comparison; the last one is evaluated
    run_steps: int  # train.max_steps of the entry-point runs
    signal_after: int  # the killed run gets SIGTERM once it logged this step
    log_every: int
    worlds: tuple[int, ...]  # ranks sharing the device over gloo
    agreement_calls: int
    bench: tuple[str, ...]  # benchmarks/bench.py's --steps and --warmup
    sweep: tuple[int, ...]  # batch sizes
    rgb_batch: int  # batch of the RGB recipes' throughput
    n_per_class: int  # evaluated samples per class
    judge: JudgeSpec


SIZES = {
    # Sized for one call of a few minutes: the steps are cheap on a GPU, each process's start and CUDA init are not.
    "cuda": Sizes(batch=64, model={}, warmup=3, steps=20, resumed=("mlp",), run_steps=300, signal_after=20,
                  log_every=10, worlds=(2,), agreement_calls=300, bench=("--steps", "100", "--warmup", "10"),
                  sweep=(64, 1024, 16384), rgb_batch=256, n_per_class=200, judge=DEFAULT_SPEC),
    "cpu": Sizes(batch=16, model={"mlp": ("model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]"),
                                  "dcgan": ("model.dcgan.width=8",),
                                  "resnet": ("model.resnet.g_width=8", "model.resnet.d_width=8")},
                 warmup=1, steps=2, resumed=("mlp",), run_steps=24, signal_after=8, log_every=2, worlds=(2,),
                 agreement_calls=50, bench=("--steps", "1", "--warmup", "0"), sweep=(8, 16), rgb_batch=16,
                 n_per_class=10, judge=JudgeSpec(width=4, features=16, samples=2000, batch_size=32, lr=1e-2)),
}


@dataclass(frozen=True)
class Mode:
    """The device under test, where stages keep their files, where results go, and the data overrides."""

    device: str
    work: Path
    out: Path
    data: tuple[str, ...]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def sizes(self) -> Sizes:
        return SIZES[self.device]

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    def argv(self) -> list[str]:
        """The command-line form of this mode, for the stage's own subprocesses."""
        return ["--device", self.device, "--work", str(self.work), "--out", str(self.out), *self.data]

    def model(self, arch: str) -> tuple[str, ...]:
        """The overrides that size networks of ``arch`` for this mode."""
        return self.sizes.model.get(arch, ())

    def overrides(self, recipe: str, *extra: str) -> list[str]:
        """A recipe's overrides, then the mode's data, device, batch and model size, then ``extra``."""
        r = RECIPES[recipe]
        return [*r.overrides, *self.data, f"dist.device={self.device}", f"train.batch_size={self.sizes.batch}",
                *self.model(r.arch), *extra]

    def config_args(self, recipe: str) -> list[str]:
        """``--config FILE`` of the recipe for a command line; none when it starts from the defaults."""
        file = RECIPES[recipe].config
        return ["--config", str(REPO / file)] if file else []

    def config(self, recipe: str, *extra: str) -> Config:
        file = RECIPES[recipe].config
        return load_config(REPO / file if file else None, self.overrides(recipe, *extra))
