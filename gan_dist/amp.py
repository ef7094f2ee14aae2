"""Mixed precision: the compute dtype a device does natively, autocast in it, and fp16's GradScaler;
and the memory layout its convolutions run fastest in.

bf16 pays only where the hardware computes it (CUDA with bf16, x86 AVX512-BF16 or AMX, Arm BF16):
emulated bf16 is slower than float32, so ``amp.dtype=auto`` reads the device's own capability.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from gan_dist.config import AmpConfig, ConfigError

SKIPPED = "amp_skipped"
"""The metric of an iteration that float16's loss scaler skipped, because a gradient was not finite."""

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
    """Whether ``device`` computes bf16 natively, and the evidence."""
    if device.type == "cuda":
        # is_bf16_supported() also counts emulated bf16 (V100, T4), which is slower than float32 there.
        major, minor = torch.cuda.get_device_capability(device)
        ok = major >= 8
        return ok, (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                    f"{'computes' if ok else 'only emulates'} bf16")
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


def choose_layout(cfg: AmpConfig, device_type: str, dtype: torch.dtype, convolutional: bool,
                  cpu_isa: str | None = None) -> str:
    """``amp.memory_format`` resolved, for conv networks only (an MLP has no images to lay out):
    channels_last on CUDA in a 16-bit dtype (where tensor cores want it), and on CPUs whose torch kernels
    run AVX-512, where the residual recipe measured faster in it (docs/BENCHMARKS.md). Elsewhere
    contiguous: not measured faster there. ``cpu_isa``: what
    ``torch.backends.cpu.get_cpu_capability()`` says (read here when not given)."""
    if cfg.memory_format != "auto":
        return cfg.memory_format
    if not convolutional:
        return "contiguous"
    if device_type == "cuda":
        return "channels_last" if dtype in (torch.bfloat16, torch.float16) else "contiguous"
    isa = cpu_isa if cpu_isa is not None else torch.backends.cpu.get_cpu_capability()
    return "channels_last" if isa.startswith("AVX512") else "contiguous"


@contextlib.contextmanager
def tf32() -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions on CUDA inside the block (evaluation, the judge), restored after
    it, so training keeps its own precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Amp:
    """Autocast in the dtype chosen for the device, plus, for float16, the one GradScaler of both optimizers;
    and the layout of conv weights and images."""

    def __init__(self, cfg: AmpConfig, device: torch.device, convolutional: bool = True) -> None:
        bf16 = native_bf16(device) if cfg.enabled and cfg.dtype == "auto" else (False, "")
        self.dtype, self.reason = choose_dtype(cfg, device.type, bf16)
        self.enabled = self.dtype != torch.float32
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.layout = choose_layout(cfg, device.type, self.dtype, convolutional)
        self.memory_format = torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def config(self) -> AmpConfig:
        """The resolved section, as a run's config records it: ``auto`` replaced by what it chose."""
        return AmpConfig(enabled=self.enabled, dtype=str(self.dtype).removeprefix("torch."), memory_format=self.layout)

    def laid_out(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images in the chosen layout (a no-op when it already is)."""
        return images.contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def input_grad(self, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """∂outputs[i]/∂inputs[i] for each sample i of a batch whose outputs depend on their own input only,
        differentiable again. The mean of ``outputs`` is scaled like a loss, so float16 keeps small values
        and no gradient exceeds what a loss's would (a scaled sum's would overflow: 65,536 per logit); the
        result is unscaled by a tensor division that never reads the scale on the host."""
        one = torch.ones((), device=outputs.device)
        (grad,) = torch.autograd.grad(self.scaler.scale(outputs.float().mean()), inputs, create_graph=True)
        return grad * (outputs.numel() / self.scaler.scale(one))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.scaler.step(opt)

    def update(self) -> torch.Tensor | None:
        """Update the loss scale after a step: 1 (on the device) where that step was skipped, as its gradients
        held inf or NaN, and the scale backed off; else 0; None where nothing scales. Compares the scaler's own
        scale tensor, since ``get_scale()`` would read it on the host."""
        if not self.scaler.is_enabled():
            return None
        before = self.scaler._scale.clone()
        self.scaler.update()
        return (self.scaler._scale < before).float().squeeze()

    def load_scaler(self, state: dict) -> None:
        """The checkpoint's loss scale, where both runs scale; a run that did not (bf16, float32) saved an empty
        state, and a float16 run resumed from it starts from a fresh scale."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
