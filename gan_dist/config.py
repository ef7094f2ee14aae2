"""The torch-free core: the typed run configuration's schema, the description of a dataset that every
network is built from (``DatasetInfo``), and the errors every command line reports in one line.

Defaults live in the dataclasses below; ``gan_dist.configio`` layers a YAML file and dotted overrides
on top and checks them field by field against this schema.

Architectures, losses and datasets are named in the config and registered by the modules that
build them (``Registry``). An architecture or a loss may bring its own options, a section named
after it (``model.dcgan.width``): a section of one that is not chosen is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class UsageError(Exception):
    """A user's mistake (config, data, checkpoint, arguments): every command line prints its message
    as one line and exits with status 2."""


class ConfigError(UsageError, ValueError):
    """A bad key or value; the message names the key."""


def write_reason(e: BaseException) -> str:
    """Why a write failed, in words: torch.save reports a cut-short write as its own internals."""
    return e.strerror if isinstance(e, OSError) and e.strerror else "the write was cut short"


class WriteError(UsageError):
    """A file of the run could not be written (a full disk, a quota): one line, exit 2."""

    def __init__(self, path: Path, e: BaseException) -> None:
        super().__init__(f"writing {path} failed: {write_reason(e)} (disk full?); every checkpoint on disk "
                         "is complete")


class DataError(UsageError, RuntimeError):
    """Data that cannot be found or read."""


class Diverged(RuntimeError):
    """Training produced non-finite losses or weights: the run stops, and nothing non-finite is saved."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the data is, measured from the data itself: every network, metric and grid is built from it.

    It travels in every checkpoint, so sampling and evaluation rebuild G without the data.
    """

    name: str
    """``data.name`` of the source."""
    channels: int
    resolution: int
    num_classes: int
    """0: unconditional (a flat folder: every label is 0)."""
    class_names: tuple[str, ...]
    sizes: dict[str, int]
    """Images per split, e.g. ``{"train": 60000, "test": 10000}``."""
    source: str
    """Where it came from: a folder, a file, or a download."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.resolution, self.resolution

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_dict(self) -> dict:
        """Builtins only: safe for YAML, JSON, W&B and ``torch.load(weights_only=True)``."""
        return dataclasses.asdict(self) | {"class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        return cls(**(dict(d) | {"class_names": tuple(d["class_names"]), "sizes": dict(d["sizes"])}))


class Registry:
    """The names a config key may take, each with its builder and the dataclass of its own options
    (None: it has none). The modules that define the built-in builders register them when imported;
    the registry imports them at its first lookup, so this module (the config) loads no torch."""

    def __init__(self, key: str, what: str, *builtins: str) -> None:
        self.key, self.what, self.builtins = key, what, builtins
        self._entries: dict[str, tuple[Any, type | None]] = {}
        self._modules: dict[str, str] = {}
        """Which module registered each name: the built-in ones are listed in ``builtins``' order."""

    def register(self, name: str, options: type | None = None) -> Callable[[T], T]:
        module = sys._getframe(1).f_globals.get("__name__", "")

        def add(builder: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._entries[name], self._modules[name] = (builder, options), module
            return builder
        return add

    @property
    def entries(self) -> dict[str, tuple[Any, type | None]]:
        """Every entry: the built-in ones in their modules' order (whichever was imported first), then the rest."""
        for module in self.builtins:
            importlib.import_module(module)  # registers on first import; a no-op after
        rank = {m: i for i, m in enumerate(self.builtins)}
        order = sorted(self._entries, key=lambda n: rank.get(self._modules[n], len(rank)))  # stable
        return {n: self._entries[n] for n in order}

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def check(self, name: str) -> None:
        if name not in self.entries:
            raise ConfigError(f"{self.key}: unknown {self.what} {name!r}; known: {', '.join(self.entries)}")

    def __getitem__(self, name: str) -> Any:
        self.check(name)
        return self.entries[name][0]

    def options(self, name: str) -> type | None:
        self.check(name)
        return self.entries[name][1]


ARCHITECTURES = Registry("model.arch", "architecture", "gan_dist.models.mlp", "gan_dist.models.dcgan",
                         "gan_dist.models.resnet", "gan_dist.models.r3gan")
LOSSES = Registry("loss.kind", "loss", "gan_dist.training.objectives")
TERMS = Registry("loss", "loss term", "gan_dist.training.terms")
DATASETS = Registry("data.name", "dataset", "gan_dist.data.sources")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, registry: Registry | None = None, options_of: str | None = None,
        sections_of: Registry | None = None):
    """A config field with its documentation and an optional numeric range.

    A section's default is given as its dataclass, built anew for each config. ``registry``: the
    field names an entry of it. ``options_of``: the field holds the options of the entry that the
    field named here chooses; its YAML key is that entry's name. ``sections_of``: the field holds every entry's
    options of that registry, each under its entry's name.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "registry": registry, "options_of": options_of,
            "sections_of": sections_of}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _fill_options(section: Any, selector: str, options: str) -> None:
    """``section.<options>`` defaults to the options of the entry that ``section.<selector>`` names,
    and must be of that entry's kind (``dataclasses.replace`` of the selector alone would not be)."""
    registry: Registry = next(f for f in dataclasses.fields(section) if f.name == selector).metadata["registry"]
    name = getattr(section, selector)
    kind = registry.options(name)
    value = getattr(section, options)
    if value is None and kind is not None:
        object.__setattr__(section, options, kind())
    elif (value is None) != (kind is None) or (kind is not None and not isinstance(value, kind)):
        raise ConfigError(f"{registry.key}={name}: its options must be {kind.__name__ if kind else 'absent'}, "
                          f"got {type(value).__name__}")


@dataclass(frozen=True)
class DataConfig:
    name: str = opt(
        "mnist", "mnist, fashion_mnist, idx (any MNIST-format pair), cifar10, cifar100 (torchvision's readers), "
        "or folder (<root>/<class>/<image>; a flat folder is unconditional)", registry=DATASETS
    )
    root: str = opt("data", "where the source lives: IDX files (flat or <root>/<MNIST|FashionMNIST>/raw/), "
                            "CIFAR's batches, or the image folder")
    split: Literal["train", "test"] = opt("train", "split to train on")
    download: bool = opt(True, "mnist, fashion_mnist, cifar10, cifar100: download into root when missing")
    resolution: int | None = opt(None, "square size the images are converted to (null: the source's own)", ge=1)
    channels: Literal[1, 3] | None = opt(None, "channels the images are converted to (null: the source's own)")
    flip: bool = opt(False, "random horizontal flips (for data where mirror images are natural)")
    holdout: float = opt(0.1, "folder without train/ and test/: seeded share held out as the test split",
                         gt=0.0, le=0.5)
    skip_bad: bool = opt(False, "skip (and count) unreadable images instead of stopping")
    cache_dir: str = opt("~/.cache/gan_dist/data", "where converted uint8 datasets are cached")
    verify: Literal["names", "content"] = opt(
        "names", "what keys the cache to the files: names (path, size, mtime and inode change time, which every "
        "rewrite moves, cp -p and rsync -a included: one stat per file) or content (hashes every file at each start)")
    resident: Literal["auto", "on", "off"] = opt(
        "auto", "on: the split as one tensor on the training device; off: streamed from the memory-mapped "
        "cache by DataLoader workers; auto: on when it fits data.resident_max_gb"
    )
    resident_max_gb: float = opt(4.0, "data.resident=auto: largest split (uint8) kept on the device", ge=0)
    workers: int | None = opt(
        None, "streamed: DataLoader worker processes per rank (0: read in the training process); null: 0 when "
        "training on CPU, where workers would take cores from the training threads and handing a batch between "
        "processes costs more than gathering it from the memory map, else 2", ge=0)
    prefetch: int = opt(4, "streamed: batches each worker prepares ahead", ge=1)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("mlp", "mlp: the tutorial's networks; dcgan: conditional conv nets; resnet: SNGAN/BigGAN residual "
                    "nets; r3gan: R3GAN's normalisation-free residual nets; options: model.<arch>.*",
                    registry=ARCHITECTURES)
    z_dim: int = opt(100, "latent size", ge=1)
    embed_dim: int = opt(10, "size of the label embedding fed to G (and to D with concat conditioning)", ge=1)
    conditioning: Literal["concat", "projection", "none"] = opt(
        "concat", "how D sees the label: concatenated embedding, a projection head (Miyato 2018), or none "
        "(unconditional: neither G nor D takes a label)"
    )
    spectral_norm: bool = opt(False, "spectral normalisation on every weight layer of D")
    options: Any = opt(None, "the chosen architecture's own section", options_of="arch")

    def __post_init__(self) -> None:
        _fill_options(self, "arch", "options")


Operation = Literal["color", "translation", "cutout"]
"""The differentiable augmentations (``gan_dist.training.augment.OPERATIONS``)."""


@dataclass(frozen=True)
class LossConfig:
    kind: str = opt("bce", "bce: the tutorial's loss on logits; hinge: the SNGAN loss; rpgan: the relativistic "
                    "pairing loss softplus(D(fake) - D(real)) (R3GAN); options: loss.<kind>.*",
                    registry=LOSSES)
    options: Any = opt(None, "the chosen loss's own section", options_of="kind")
    terms: Any = opt(None, "each term's own section (loss.r1, loss.r2, loss.lecam, loss.bcr, and any registered "
                           "by an imports: module), with any loss.kind; a term is on when its weight is above 0",
                     sections_of=TERMS)

    def __post_init__(self) -> None:
        _fill_options(self, "kind", "options")
        given = self.terms or {}
        object.__setattr__(self, "terms", {name: given.get(name) or options() for name, (_, options)
                                           in TERMS.entries.items()})

    def __getattr__(self, name: str) -> Any:
        """A term's section by its name: ``cfg.loss.r1.gamma``."""
        terms = self.__dict__.get("terms") or {}
        if name in terms:
            return terms[name]
        raise AttributeError(f"LossConfig has no {name!r}")


@dataclass(frozen=True)
class AugmentConfig:
    kind: Literal["none", "diffaug", "ada"] = opt(
        "none", "differentiable augmentation of every image D sees, real and fake, in D's and G's steps: none; "
        "diffaug: the policy on every image (DiffAugment); ada: each operation with probability p, which "
        "follows D's overfitting (ADA)")
    policy: tuple[Operation, ...] = opt(
        ("color", "translation", "cutout"), "the operations, in order: color (brightness, saturation, contrast), "
        "translation (up to 1/8 of the size), cutout (a square of half the size)")
    ada_target: float = opt(0.6, "ada: the E[sign(D(real))] that p steers to (higher: D may overfit more)",
                            gt=0, lt=1)
    ada_interval: int = opt(4, "ada: steps between adjustments of p", ge=1)
    ada_kimg: float = opt(500.0, "ada: thousands of real images over which p can move from 0 to 1", gt=0)
    ada_p: float = opt(0.0, "ada: p at the start of a run (a resumed run takes the checkpoint's)", ge=0, le=1)


@dataclass(frozen=True)
class OptimConfig:
    g_lr: float = opt(1e-4, "Adam learning rate of G", gt=0)
    d_lr: float = opt(1e-4, "Adam learning rate of D (TTUR: set it apart from g_lr)", gt=0)
    g_betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas of G", ge=0.0, le=0.9999)
    d_betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas of D", ge=0.0, le=0.9999)


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = opt(False, "keep an exponential moving average of G; used for samples and evaluation")
    decay: float = opt(0.999, "EMA decay per step; half-life = ln(0.5)/ln(decay) steps", gt=0.0, le=1.0)
    rampup: float = opt(0.05, "warm-up: the EMA's half-life is at most this share of the steps done, so early on it "
                              "averages only G's recent weights (StyleGAN2's ramp-up; 0: the full decay from step 1)",
                        ge=0.0, le=1.0)


Shape = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class Ramp:
    """One value's course over the images seen: a function of the position alone, so a resumed run
    takes the values an uninterrupted one would."""

    shape: Shape = opt("constant", "constant: the start value all run; linear or cosine: from start to end over "
                                   "schedule.kimg")
    start: float | None = opt(None, "the value at the first image (null: the key it schedules)")
    end: float | None = opt(None, "the value at the end of schedule.kimg, and after it (linear, cosine)")

    @property
    def on(self) -> bool:
        return self.shape != "constant" or self.start is not None or self.end is not None


@dataclass(frozen=True)
class ScheduleConfig:
    kimg: float | None = opt(None, "thousands of images (global, G's batches) the ramps run over; null: the run's "
                                   "length", gt=0)
    g_lr: Ramp = opt(Ramp, "G's learning rate, from optim.g_lr")
    d_lr: Ramp = opt(Ramp, "D's learning rate, from optim.d_lr")
    g_beta2: Ramp = opt(Ramp, "G's Adam β2, from optim.g_betas[1]")
    d_beta2: Ramp = opt(Ramp, "D's Adam β2, from optim.d_betas[1]")
    r1_gamma: Ramp = opt(Ramp, "R1's γ, from loss.r1.gamma (R1 must be on)")
    r2_gamma: Ramp = opt(Ramp, "R2's γ, from loss.r2.gamma (R2 must be on)")
    ema_half_life: Ramp = opt(Ramp, "the EMA's half-life in thousands of images, from ema.decay's (ema.rampup still "
                                    "caps it)")
    augment_p: Ramp = opt(Ramp, "augment.kind=diffaug: the probability of each operation per image, from 1")

    def ramps(self) -> dict[str, Ramp]:
        """The ramps that are on, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Ramp) and getattr(self, f.name).on}


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(64, "batch per rank and per D step; the global batch is this times the world size", ge=1)
    epochs: int = opt(30, "passes over the data", ge=1)
    max_steps: int | None = opt(None, "stop after this many steps (G updates), if set", ge=1)
    kimg: float | None = opt(None, "stop after this many thousand images (global, G's batches), if set", gt=0)
    seed: int = opt(0, "seeds init, data order and the per-rank noise and dropout streams", ge=0)
    n_critic: int = opt(1, "D steps per G step; each D step takes its own real batch", ge=1)
    labels: Literal["uniform", "data"] = opt(
        "uniform", "the fake images' labels: uniform over the classes, or data: in the training split's proportions "
        "(StyleGAN2-ADA), so that G learns the data's own mix of classes")
    resume: str = opt("auto", "auto: newest valid checkpoint in run_dir; never: fresh run; or a checkpoint path")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = opt(
        "off", "torch.compile the G and D forward passes with this mode (dynamic=False); reduce-overhead: CUDA graphs"
    )


@dataclass(frozen=True)
class AmpConfig:
    enabled: bool = opt(True, "autocast the forward passes and losses (false: float32 throughout)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "auto: bfloat16 where the device computes it natively (CUDA: else float16 with a GradScaler; "
        "CPU: AVX512-BF16 or AMX, else float32); float16 is CUDA only"
    )
    memory_format: Literal["auto", "contiguous", "channels_last"] = opt(
        "auto", "layout of conv networks' weights and images; auto: channels_last on CUDA in a 16-bit dtype and on "
        "AVX-512 CPUs (measured faster there, docs/BENCHMARKS.md), else contiguous; always contiguous for the MLP")


@dataclass(frozen=True)
class DistConfig:
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto", "auto: cuda:(LOCAL_RANK % visible GPUs) when CUDA exists, else CPU"
    )
    backend: Literal["auto", "nccl", "gloo"] = opt(
        "auto", "process group backend; auto: nccl on CUDA, gloo on CPU (gloo on CUDA lets ranks share one GPU)"
    )
    threads: int = opt(0, "CPU threads per rank; 0: the usable cores divided by the ranks on the node", ge=0)
    force_ddp: bool = opt(False, "build the process group and DDP even at world size 1 (exercises NCCL/DDP on one GPU)")
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size", gt=0)
    gradient_as_bucket_view: bool = opt(True, "let gradients alias DDP's buckets (saves a copy)")
    sync_batchnorm: bool = opt(False, "convert BatchNorm to SyncBatchNorm (dcgan); else each rank keeps its own stats")
    timeout_s: int = opt(600, "collective timeout", ge=10)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = opt(1000, "save every this many steps (0: off)", ge=0)
    every_minutes: float = opt(0.0, "also save when this many minutes passed since the last save (0: off)", ge=0)
    keep_last: int = opt(3, "rolling checkpoints kept", ge=1)


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = opt("offline", "WANDB_MODE in the environment wins")
    project: str = opt("gan_dist", "W&B project")
    entity: str | None = opt(None, "W&B entity (team or user)")
    name: str | None = opt(None, "run name; default: the run_dir's name")
    group: str | None = opt(None, "run group")
    tags: tuple[str, ...] = opt((), "run tags")
    log_model: Literal["none", "best", "last", "all"] = opt(
        "none", "checkpoints as W&B model artifacts (one sequence per run, model-<run id>): best: best.pt each time "
        "an evaluation rewrites it (alias best); last: the newest checkpoint when the process ends (latest, "
        "step-N); all: both, and every checkpoint as it is saved")


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = opt(50, "all-reduce and log metrics every this many steps", ge=1)
    samples_every_steps: int = opt(0, "write a sample grid every this many steps (0: at the end of each epoch); "
                                      "and at the end of training", ge=0)
    progress: bool = opt(True, "progress on rank 0: a bar when stderr is a terminal, else a line every "
                               "log.progress_seconds (Slurm logs)")
    progress_seconds: float = opt(60.0, "seconds between the progress lines written where stderr is no terminal",
                                  gt=0)
    z_spread: bool = opt(True, "measure G's spread over fixed latents per class, relative to the real images' "
                               "(train/z_spread), at every log step: near 0 is mode collapse")
    z_spread_warn: float = opt(0.2, "warn, naming the classes, when a class's z_spread falls below this (0: never)",
                               ge=0.0, le=1.0)
    wandb: WandbConfig = opt(WandbConfig, "Weights & Biases")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = opt(0, "score G during training every this many steps (0: off); keeps checkpoints/best.pt "
                              "by FID in eval.features' space", ge=0)
    n_samples: int = opt(10000, "generated samples per evaluation, split evenly over classes and ranks", ge=10)
    seed: int = opt(1234, "seed of the evaluation latents, fixed so runs compare", ge=0)
    features: Literal["judge", "inception"] = opt(
        "judge", "feature space of the scores: judge (a small CNN trained here on the data) or inception "
        "(torch-fidelity's InceptionV3, the papers' FID, KID and IS; pip install -e '.[metrics]')")
    inception_weights: str | None = opt(None, "eval.features=inception: torch-fidelity's "
                                              "weights-inception-2015-12-05-6726825d.pth; never downloaded")
    reference: Literal["train", "test"] = opt("test", "split the samples are scored against")
    labels: Literal["data", "uniform"] = opt(
        "data", "the samples' labels: data: 2 of each class, the rest in the reference's proportions, so that the "
        "samples and the reference hold the same mix of classes, as FID and recall assume; uniform: as many of each")
    judge_dir: str = opt("~/.cache/gan_dist/judges", "cache of the trained judge classifiers")
    features_dir: str = opt("~/.cache/gan_dist/features", "cache of the reference splits' Inception features")
    batch_size: int = opt(500, "generation and feature batch", ge=1)


@dataclass(frozen=True)
class Config:
    imports: tuple[str, ...] = opt((), "Python modules imported first, on every rank, before the rest is checked: "
                                       "your own module that registers datasets, architectures or losses")
    run_dir: str = opt("runs/default", "where everything a run writes goes")
    data: DataConfig = opt(DataConfig, "dataset")
    model: ModelConfig = opt(ModelConfig, "networks")
    loss: LossConfig = opt(LossConfig, "GAN loss")
    augment: AugmentConfig = opt(AugmentConfig, "augmentation of D's inputs")
    optim: OptimConfig = opt(OptimConfig, "optimizers")
    schedule: ScheduleConfig = opt(ScheduleConfig, "hyperparameters that follow the images seen")
    ema: EMAConfig = opt(EMAConfig, "generator EMA")
    train: TrainConfig = opt(TrainConfig, "training loop")
    amp: AmpConfig = opt(AmpConfig, "mixed precision")
    dist: DistConfig = opt(DistConfig, "devices and DDP")
    checkpoint: CheckpointConfig = opt(CheckpointConfig, "checkpoints")
    log: LogConfig = opt(LogConfig, "metrics, samples, W&B")
    eval: EvalConfig = opt(EvalConfig, "quality metrics")

    def __post_init__(self) -> None:
        if self.augment.kind != "none" and not self.augment.policy:
            raise ConfigError(f"augment.policy: augment.kind={self.augment.kind} needs at least one operation")
        for name in ("r1", "r2"):
            if getattr(self.loss, name).gamma > 0 and self.train.compile != "off":
                raise ConfigError(f"loss.{name}.gamma: {name.upper()} differentiates D's gradient, and torch.compile "
                                  f"has no double backward; set train.compile=off or loss.{name}.gamma=0")
        d_batchnorm = self.model.arch == "dcgan" and not self.model.spectral_norm  # the conv trunk's own norm
        penalty = next((n for n in ("r1", "r2") if getattr(self.loss, n).gamma > 0), None)
        if self.dist.sync_batchnorm and d_batchnorm and penalty:
            raise ConfigError(f"dist.sync_batchnorm: {penalty.upper()} differentiates D's gradient, and SyncBatchNorm "
                              "has no double backward (batch_norm_backward_elemt); set dist.sync_batchnorm=false, "
                              f"model.spectral_norm=true (D then has no BatchNorm) or loss.{penalty}.gamma=0")
        check_ramps(self)


RAMP_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "g_lr": (0.0, math.inf, True), "d_lr": (0.0, math.inf, True), "g_beta2": (0.0, 1.0, False),
    "d_beta2": (0.0, 1.0, False), "r1_gamma": (0.0, math.inf, True), "r2_gamma": (0.0, math.inf, True),
    "ema_half_life": (0.0, math.inf, True), "augment_p": (0.0, 1.0, True)}
"""Each ramp's open (or, with True, closed below) range: (low, high, low allowed). p may reach 1."""


def check_ramps(cfg: Config) -> None:
    """Every ramp names a value that is in use, with the start and end its shape needs, in range."""
    for name, ramp in cfg.schedule.ramps().items():
        key = f"schedule.{name}"
        if ramp.shape == "constant" and ramp.end is not None:
            raise ConfigError(f"{key}.end: shape constant has no end; set {key}.shape=linear or cosine")
        if ramp.shape != "constant" and ramp.end is None:
            raise ConfigError(f"{key}.end: shape {ramp.shape} goes from the start to an end value; give one")
        low, high, closed = RAMP_BOUNDS[name]
        for part in ("start", "end"):
            v = getattr(ramp, part)
            if v is None:
                continue
            if v < low or (v == low and not closed) or v > high or (v == high and name != "augment_p"):
                bound = f"{'[' if closed else '('}{low:g}, {high:g}{']' if name == 'augment_p' else ')'}"
                raise ConfigError(f"{key}.{part}: expected a value in {bound}, got {v!r}")
        unused = {"r1_gamma": cfg.loss.r1.gamma == 0 and "loss.r1.gamma is 0 (R1 is off)",
                  "r2_gamma": cfg.loss.r2.gamma == 0 and "loss.r2.gamma is 0 (R2 is off)",
                  "ema_half_life": not cfg.ema.enabled and "ema.enabled is false",
                  "augment_p": cfg.augment.kind != "diffaug" and f"augment.kind={cfg.augment.kind} "
                  + ("steers p itself" if cfg.augment.kind == "ada" else "applies no operations")}.get(name)
        if unused:
            raise ConfigError(f"{key}: {unused}, so nothing follows this ramp")
