"""One GAN iteration under DDP: ``n_critic`` D steps, then one G step.

The phases follow StyleGAN2-ADA's loop:
- D step: fakes are made by the bare G under ``no_grad``; only D's DDP all-reduces.
- G step: D is frozen and runs inside ``D.no_sync()``, so D's gradients are never computed
  nor all-reduced; only G's DDP all-reduces.
Every random draw (noise, fake labels, dropout masks) is a function of (seed, rank, step), so a
resumed run replays exactly the streams an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gan_dist.config import AmpConfig, Config, ConfigError, LossConfig
from gan_dist.data import DatasetInfo
from gan_dist.dist import DistEnv
from gan_dist.models import EMA, build_models, label_count


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; close inputs give unrelated streams."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class NoiseStream:
    """Latents and fake labels of one rank, reseeded from (seed, rank, step, phase) at every draw.

    With no classes every fake label is 0, which unconditional networks ignore.
    """

    def __init__(self, seed: int, rank: int, z_dim: int, num_classes: int, device: torch.device) -> None:
        self.seed, self.rank, self.z_dim, self.device = seed, rank, z_dim, device
        self.num_classes = max(num_classes, 1)
        self.gen = torch.Generator(device)

    def draw(self, step: int, phase: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.gen.manual_seed(derive_seed(self.seed, self.rank, step, phase))
        z = torch.randn(n, self.z_dim, generator=self.gen, device=self.device)
        labels = torch.randint(0, self.num_classes, (n,), generator=self.gen, device=self.device)
        return z, labels

    def seed_dropout(self, step: int) -> None:
        """Dropout draws from the default generator; pin it to the step too."""
        torch.manual_seed(derive_seed(self.seed, self.rank, step, -1))


class GANLoss:
    """Losses on raw logits, computed in float32 (autocast would otherwise run them in bf16/fp16)."""

    def __init__(self, cfg: LossConfig) -> None:
        self.kind = cfg.kind
        self.real_target = 1.0 - cfg.label_smoothing

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real, fake = real.float(), fake.float()
        if self.kind == "hinge":
            return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, self.real_target))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        fake = fake.float()
        if self.kind == "hinge":
            return -fake.mean()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, Arm BF16


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    lines = (line.partition(":")[2] for line in text.splitlines() if line.startswith(("flags", "Features")))
    return frozenset(word for line in lines for word in line.split())


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the evidence: emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    found = sorted(cpu_flags() & NATIVE_BF16_CPU_FLAGS)
    return (True, f"CPU has {', '.join(found)}") if found else (False, "CPU has no native bf16 (AVX512-BF16/AMX)")


def choose_dtype(cfg: AmpConfig, device_type: str, bf16: tuple[bool, str]) -> tuple[torch.dtype, str]:
    """The compute dtype for ``cfg`` on this device, and why; ``bf16`` is ``native_bf16``'s answer."""
    if not cfg.enabled:
        return torch.float32, "amp.enabled=false"
    if cfg.dtype == "float16" and device_type != "cuda":
        raise ConfigError("amp.dtype: float16 needs CUDA; use auto, bfloat16 or float32 on CPU")
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), f"amp.dtype={cfg.dtype}"
    native, evidence = bf16
    if native:
        return torch.bfloat16, f"auto: {evidence}"
    if device_type == "cuda":
        return torch.float16, f"auto: {evidence}, so float16 with a GradScaler"
    return torch.float32, f"auto: {evidence}, so float32"


class MixedPrecision:
    """Autocast in the dtype chosen for the device, plus, for float16, the one GradScaler of both optimizers."""

    def __init__(self, cfg: AmpConfig, device: torch.device) -> None:
        bf16 = native_bf16(device) if cfg.enabled and cfg.dtype == "auto" else (False, "")
        self.dtype, self.reason = choose_dtype(cfg, device.type, bf16)
        self.enabled = self.dtype != torch.float32
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    @property
    def config(self) -> AmpConfig:
        """The resolved section, as a run's config records it: ``auto`` replaced by what it chose."""
        return AmpConfig(enabled=self.enabled, dtype=str(self.dtype).removeprefix("torch."))

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)


def _adam(module: nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Fused Adam: one kernel for all parameters on CUDA and CPU alike, and no per-step host reads
    (CPU has no foreach kernels; docs/BENCHMARKS.md measures both)."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, fused=True)


def _compiled(module: nn.Module, mode: str) -> nn.Module:
    """``module`` behind ``torch.compile`` (static shapes), or itself when compiling is off.

    The compiled wrapper only forwards calls: parameters, buffers and state dicts stay the module's own.
    """
    if mode == "off":
        return module
    return torch.compile(module, mode=mode, dynamic=False)


@dataclass
class StepMetrics:
    """Per-iteration values, kept on the device: reading them would sync the GPU every step."""

    d_loss: torch.Tensor
    g_loss: torch.Tensor
    d_real: torch.Tensor
    d_fake: torch.Tensor

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.d_loss, self.g_loss, self.d_real, self.d_fake])


NAMES = ("d_loss", "g_loss", "d_real", "d_fake")


class GANEngine:
    """Networks, optimizers and the two phases. Owns nothing about files or logging."""

    def __init__(self, cfg: Config, env: DistEnv, info: DatasetInfo) -> None:
        self.info, self.num_classes = info, label_count(cfg.model, info)
        torch.manual_seed(cfg.train.seed)  # identical init on every rank; DDP also broadcasts rank 0's
        g, d = build_models(cfg.model, info)
        # Before any SyncBatchNorm conversion: calibrating the average never needs the other ranks.
        self.ema = EMA(g.to(env.device), cfg.ema.decay, cfg.model.z_dim, self.num_classes) \
            if cfg.ema.enabled else None
        if cfg.dist.sync_batchnorm and env.device.type != "cuda":
            raise ConfigError("dist.sync_batchnorm: SyncBatchNorm needs CUDA; on CPU each rank keeps its own stats")
        if cfg.dist.sync_batchnorm and env.distributed:
            g, d = nn.SyncBatchNorm.convert_sync_batchnorm(g), nn.SyncBatchNorm.convert_sync_batchnorm(d)
        self.generator, self.discriminator = g.to(env.device), d.to(env.device)
        self.G, self.D = self._wrap(self.generator, cfg, env), self._wrap(self.discriminator, cfg, env)
        # The bare G makes the D step's fakes (no DDP hooks under no_grad); each call site is compiled.
        self.fake_G, self.G, self.D = (_compiled(m, cfg.train.compile) for m in (self.generator, self.G, self.D))
        self.graphed = cfg.train.compile == "reduce-overhead" and env.device.type == "cuda"
        self.opt_g = _adam(self.generator, cfg.optim.g_lr, cfg.optim.g_betas)
        self.opt_d = _adam(self.discriminator, cfg.optim.d_lr, cfg.optim.d_betas)
        self.precision = MixedPrecision(cfg.amp, env.device)
        self.loss = GANLoss(cfg.loss)
        self.noise = NoiseStream(cfg.train.seed, env.rank, cfg.model.z_dim, self.num_classes, env.device)

    @staticmethod
    def _wrap(module: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
        if not env.distributed:
            return module
        # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which still syncs at init;
        # broadcast_buffers=False is the spelling with the same meaning on every torch from 2.4.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            return DDP(
                module,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                # BatchNorm stats stay per rank (or SyncBatchNorm): broadcasting them before each of D's
                # two forwards rewrites buffers that autograd saved, an in-place error in recent PyTorch.
                broadcast_buffers=False,
                bucket_cap_mb=cfg.dist.bucket_cap_mb,
                gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
            )

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples and evaluation use: the EMA when there is one."""
        return self.ema.calibrated() if self.ema is not None else self.generator

    def d_step(self, real: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, fake_labels: torch.Tensor):
        with torch.no_grad(), self.precision.autocast():
            fake = self.fake_G(z, fake_labels)
        with self.precision.autocast():
            real_logits = self.D(real, labels)
            fake_logits = self.D(fake, fake_labels)
            loss = self.loss.d(real_logits, fake_logits)
        self.precision.step(loss, self.opt_d)
        with torch.no_grad():
            return loss.detach(), torch.sigmoid(real_logits.float()).mean(), torch.sigmoid(fake_logits.float()).mean()

    def g_step(self, z: torch.Tensor, fake_labels: torch.Tensor) -> torch.Tensor:
        self.discriminator.requires_grad_(False)
        try:
            no_sync = self.D.no_sync() if isinstance(self.D, DDP) else contextlib.nullcontext()
            with no_sync, self.precision.autocast():
                loss = self.loss.g(self.D(self.G(z, fake_labels), fake_labels))
            self.precision.step(loss, self.opt_g)
        finally:
            self.discriminator.requires_grad_(True)
        return loss.detach()

    def iteration(self, step: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One D step per real batch, then one G step; ``step`` picks the random streams."""
        if self.graphed:  # CUDA graphs may reuse the previous iteration's output memory from here on
            torch.compiler.cudagraph_mark_step_begin()
        self.noise.seed_dropout(step)
        scaler = self.precision.scaler
        for phase, (real, labels) in enumerate(batches):
            if phase:  # a second step() on opt_d needs the scaler updated in between
                scaler.update()
            d_loss, d_real, d_fake = self.d_step(real, labels, *self.noise.draw(step, phase, real.shape[0]))
        g_loss = self.g_step(*self.noise.draw(step, len(batches), batches[0][0].shape[0]))
        scaler.update()
        if self.ema is not None:
            self.ema.update(self.generator)
        return StepMetrics(d_loss, g_loss, d_real, d_fake)

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
            "scaler": self.precision.scaler.state_dict(),
        }
        if self.ema is not None:
            state["generator_ema"] = self.ema.calibrated().state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        for opt, saved in ((self.opt_g, state["opt_g"]), (self.opt_d, state["opt_d"])):
            # Adam's moments come from the checkpoint; its hyperparameters from this run's config.
            settings = [{k: group[k] for k in ("lr", "betas")} for group in opt.param_groups]
            opt.load_state_dict(saved)
            for group, own in zip(opt.param_groups, settings, strict=True):
                group.update(own)
        self.precision.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            # A checkpoint from a run without EMA starts the average from the current G.
            self.ema.load_state_dict(state.get("generator_ema", state["generator"]))
