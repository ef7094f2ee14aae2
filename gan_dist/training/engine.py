"""One GAN iteration under DDP: ``n_critic`` D steps, then one G step.

The loss runs each phase (``GANLoss.d_phase``, ``g_phase``), as StyleGAN2-ADA's loop does:
- D step: fakes are made by the bare G under ``no_grad``; only D's DDP all-reduces.
- G step: D is frozen and runs inside ``D.no_sync()``, so D's gradients are never computed
  nor all-reduced; only G's DDP all-reduces.
The engine owns the networks and optimizers, zeroes and steps them around the phases, and draws
every random number as a function of (seed, rank, step) (noise, fake labels, dropout masks) or of
(seed, step) over the global batch (augmentations), so a resumed run replays exactly the streams an
uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.amp import SKIPPED, Amp
from gan_dist.checkpoint import check_finite, check_shapes
from gan_dist.config import Config, ConfigError, DatasetInfo
from gan_dist.models.base import build_models, convolutional, label_count
from gan_dist.models.ema import EMA
from gan_dist.models.layers import upgrade_state
from gan_dist.seeds import NoiseStream, Stream
from gan_dist.training.augment import Augment
from gan_dist.training.losses import GANLoss, LossStats, Network, Networks
from gan_dist.training.ramps import Ramps, ema_decay

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv


def _adam(module: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Fused Adam: one kernel for all parameters on CUDA and CPU alike, and no per-step host reads."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=True)


def _compiled(module: nn.Module, mode: str) -> nn.Module:
    """``module`` behind ``torch.compile`` (static shapes), or itself when compiling is off.

    The compiled wrapper only forwards calls: parameters, buffers and state dicts stay the module's own.
    """
    if mode == "off":
        return module
    return torch.compile(module, mode=mode, dynamic=False)


class GANEngine:
    """Networks, optimizers and the two phases. Owns nothing about files or logging."""

    def __init__(self, cfg: Config, env: DistEnv, info: DatasetInfo, total_steps: int | None = None,
                 class_counts: torch.Tensor | None = None) -> None:
        """``total_steps``: the run's length, which the ramps of ``schedule.*`` span unless ``schedule.kimg``
        sets theirs; ``class_counts``: the training split's images per class, which ``train.labels=data``
        draws fake labels by."""
        self.info, self.label_classes = info, label_count(cfg.model, info)
        """The labels G and D take: the data's classes, or 0 for an unconditional pair."""
        self.amp = Amp(cfg.amp, env.device, convolutional=convolutional(cfg.model))
        torch.manual_seed(cfg.train.seed)  # identical init on every rank; DDP also broadcasts rank 0's
        g, d = (m.to(memory_format=self.amp.memory_format) for m in build_models(cfg.model, info))
        # Before any SyncBatchNorm conversion: calibrating the average never needs the other ranks.
        self.ema = EMA(g.to(env.device), cfg.ema.decay, cfg.ema.rampup, cfg.model.z_dim, self.label_classes) \
            if cfg.ema.enabled else None
        if cfg.dist.sync_batchnorm and env.device.type != "cuda":
            raise ConfigError("dist.sync_batchnorm: SyncBatchNorm needs CUDA; on CPU each rank keeps its own stats")
        if cfg.dist.sync_batchnorm and env.distributed:
            g, d = nn.SyncBatchNorm.convert_sync_batchnorm(g), nn.SyncBatchNorm.convert_sync_batchnorm(d)
        self.nets = Networks(*(self._network(m.to(env.device), cfg, env) for m in (g, d)))
        self.graphed = cfg.train.compile == "reduce-overhead" and env.device.type == "cuda"
        self.opt_g = _adam(self.generator, cfg.optim.g_lr, cfg.optim.g_betas)
        self.opt_d = _adam(self.discriminator, cfg.optim.d_lr, cfg.optim.d_betas)
        augment = Augment(cfg.augment, env, cfg.train.batch_size * env.world_size)
        self.loss = GANLoss(cfg.loss, augment, self.amp, env)
        self.n_critic = cfg.train.n_critic
        self.betas = {"g": cfg.optim.g_betas, "d": cfg.optim.d_betas}
        self.ramps = Ramps(cfg, cfg.train.batch_size * env.world_size, total_steps)
        self.global_batch = cfg.train.batch_size * env.world_size
        if cfg.train.labels == "data" and self.label_classes > 1 and class_counts is None:
            raise ValueError("train.labels=data draws labels by the training split's class counts: pass them")
        weights = class_counts if cfg.train.labels == "data" else None
        self.noise = NoiseStream(cfg.train.seed, env.rank, cfg.model.z_dim, self.label_classes, env.device, weights)

    @classmethod
    def _network(cls, module: nn.Module, cfg: Config, env: DistEnv) -> Network:
        """``module`` at its call sites, each compiled when ``train.compile`` is on: behind DDP where it trains,
        bare where it runs without gradient (no DDP hooks: G making D's fakes)."""
        ddp = cls._wrap(module, cfg, env)
        return Network(module, _compiled(ddp, cfg.train.compile), ddp if isinstance(ddp, DDP) else None,
                       _compiled(module, cfg.train.compile))

    @property
    def generator(self) -> nn.Module:
        """G's weights: the network as built, under no wrapper."""
        return self.nets.G.module

    @property
    def discriminator(self) -> nn.Module:
        return self.nets.D.module

    @staticmethod
    def _wrap(module: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
        if not env.distributed:
            return module
        # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which still syncs at init;
        # broadcast_buffers=False is the spelling with the same meaning on every torch pyproject.toml allows.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            return DDP(
                module,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                # BatchNorm stats stay per rank (or SyncBatchNorm): broadcasting them before each of D's
                # two forwards rewrites buffers that autograd saved: backward then fails with an in-place error.
                broadcast_buffers=False,
                bucket_cap_mb=cfg.dist.bucket_cap_mb,
                gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
            )

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples and evaluation use: the EMA when there is one."""
        return self.ema.calibrated() if self.ema is not None else self.generator

    def d_step(self, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, fake_labels: torch.Tensor,
               d_step: int) -> LossStats:
        """One D update; ``d_step`` counts D steps from 0 and picks the augmentation's stream."""
        self.opt_d.zero_grad(set_to_none=True)
        metrics = self.loss.d_phase(self.nets, real, labels, z, fake_labels, d_step,
                                    self.noise.shared(Stream.AUGMENT_D, d_step))
        self.amp.step(self.opt_d)
        return metrics

    def g_step(self, z: torch.Tensor, fake_labels: torch.Tensor, step: int,
               real: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossStats:
        """One G update at iteration ``step``; ``real`` (images, labels) for an objective that pairs."""
        self.opt_g.zero_grad(set_to_none=True)
        metrics = self.loss.g_phase(self.nets, z, fake_labels, self.noise.shared(Stream.AUGMENT_G, step), real)
        self.amp.step(self.opt_g)
        return metrics

    def iteration(self, step: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> LossStats:
        """One D step per real batch, then one G step; ``step`` picks the random streams.

        The metrics are the loss's: the last D step's, any of its lazy terms, and G's; with float16's loss
        scaler also ``amp_skipped``, 1 where the scaler skipped a step of the iteration (its losses may then be
        non-finite without harm). G's phase pairs its fakes with the last D step's real batch when the
        objective pairs.
        """
        self.apply_ramps(step)
        if self.graphed:  # CUDA graphs may reuse the previous iteration's output memory from here on
            torch.compiler.cudagraph_mark_step_begin()
        self.noise.seed_dropout(step)
        metrics: LossStats = {}
        skipped = []
        for phase, (real, labels) in enumerate(batches):
            if phase:  # a second step() on opt_d needs the scaler updated in between
                skipped.append(self.amp.update())
            z, fake_labels = self.noise.draw(step, phase, real.shape[0])
            metrics |= self.d_step(real, labels, z, fake_labels, step * self.n_critic + phase)
        metrics |= self.g_step(*self.noise.draw(step, len(batches), batches[0][0].shape[0]), step, batches[-1])
        skipped.append(self.amp.update())
        if self.amp.scaler.is_enabled():
            metrics[SKIPPED] = torch.stack(skipped).amax()
        metrics |= self.loss.end_iteration(step)
        if self.ema is not None:
            self.ema.update(self.generator, step + 1)
        return metrics

    def apply_ramps(self, step: int) -> None:
        """Set every scheduled hyperparameter to its value at ``step``: host floats only, no device work."""
        values = self.ramps.at(step)
        for net, opt in (("g", self.opt_g), ("d", self.opt_d)):
            lr, beta2 = values.get(f"{net}_lr"), values.get(f"{net}_beta2")
            for group in opt.param_groups:
                if lr is not None:
                    group["lr"] = lr
                if beta2 is not None:
                    group["betas"] = (self.betas[net][0], beta2)
        for name in ("r1", "r2"):
            if f"{name}_gamma" in values:
                self.loss.term(name).gamma = values[f"{name}_gamma"]
        if "augment_p" in values:
            self.loss.augment.p = values["augment_p"]
        if "ema_half_life" in values:
            self.ema.decay = ema_decay(values["ema_half_life"], self.global_batch)

    def start_lines(self) -> list[str]:
        """What the run's start says of the engine: precision, the loss and its terms, the augmentation, the ramps."""
        lines = [f"precision: {self.amp.config.dtype} ({self.amp.reason}); layout: {self.amp.config.memory_format}",
                 f"loss: {self.loss.summary}"]
        if self.loss.augment.enabled:
            lines.append(f"augment: {self.loss.augment}")
        if self.ramps.ramps:
            lines.append(f"schedule: {self.ramps}")
        if self.graphed and self.graph_blockers():
            lines.append(f"warning: train.compile=reduce-overhead: {', '.join(self.graph_blockers())} change in "
                         "place, so CUDA graphs are likely skipped (TORCH_LOGS=cudagraphs says 'mutated inputs') and "
                         "the run is only compiled; train.compile=default compiles the same without the graphs' memory")
        return lines

    def graph_blockers(self) -> list[str]:
        """What updates buffers in place during a training forward: CUDA graphs (``reduce-overhead``) skip a
        graph whose inputs it mutates, and the run is then only compiled."""
        found = []
        for name, net in (("G", self.generator), ("D", self.discriminator)):
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
                found.append(f"{name}'s BatchNorm statistics")
            if any(hasattr(m, "parametrizations") for m in net.modules()):
                found.append(f"{name}'s spectral norm vectors")
        return found

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric an iteration can report: the loss's, and ``amp_skipped`` where float16 scales."""
        return (*self.loss.names, *((SKIPPED,) if self.amp.scaler.is_enabled() else ()))

    @property
    def learning_rates(self) -> dict[str, float]:
        """The optimizers' current rates, as W&B charts them."""
        return {"g": self.opt_g.param_groups[0]["lr"], "d": self.opt_d.param_groups[0]["lr"]}

    def finite(self) -> bool:
        """Whether every weight and buffer (EMA included) is finite: one host read, at save time only."""
        modules = [self.generator, self.discriminator] + ([self.ema.module] if self.ema is not None else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    # ---- checkpoint plumbing: plain state dicts only, so ``torch.load(weights_only=True)`` reads them
    def state_dict(self) -> dict:
        state = {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler": self.amp.scaler.state_dict(),
            "loss": self.loss.state_dict(),
        }
        if self.ema is not None:
            state["generator_ema"] = self.ema.calibrated().state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Refuses weights of other shapes, and non-finite ones: resuming a diverged G would only
        diverge again, after a log step's worth of training."""
        state = state | {k: upgrade_state(state[k], self.generator) for k in ("generator", "generator_ema")
                         if k in state}
        for name, network in (("generator", self.generator), ("discriminator", self.discriminator)):
            check_shapes(name, state[name], network)
            check_finite(name, state[name])
        if "generator_ema" in state:
            check_finite("generator_ema", state["generator_ema"])
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        for opt, saved in ((self.opt_g, state["opt_g"]), (self.opt_d, state["opt_d"])):
            # Adam's moments come from the checkpoint; its hyperparameters from this run's config.
            settings = [{k: group[k] for k in ("lr", "betas")} for group in opt.param_groups]
            opt.load_state_dict(saved)
            for group, own in zip(opt.param_groups, settings, strict=True):
                group.update(own)
        self.amp.load_scaler(state["scaler"])
        self.loss.load_state_dict(state.get("loss", {}))
        if self.ema is not None:
            # A checkpoint from a run without EMA starts the average from the current G.
            self.ema.load_state_dict(state.get("generator_ema", state["generator"]))
