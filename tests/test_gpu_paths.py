"""The CUDA paths' logic, reached on the CPU: SyncBatchNorm keeps the class conditioning, float16 with R1 neither
overflows nor reads as divergence, no step copies a Python number to the device, a checkpoint resumes under another
precision, bf16 is native only from compute capability 8.0, and the device and backend refuse what would fail."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU
from shapes import DIGITS, RGB32, batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gan_dist import amp as amp_module
from gan_dist import dist
from gan_dist.amp import SKIPPED, native_bf16
from gan_dist.config import ConfigError, Diverged, LogConfig
from gan_dist.configio import load_config
from gan_dist.models.base import build_generator
from gan_dist.models.layers import ConditionalBatchNorm2d, upgrade_state
from gan_dist.training.engine import GANEngine
from gan_dist.training.monitor import MetricLogger
from gan_dist.training.position import Position

CONDITIONAL_G = {"resnet": ["model.arch=resnet", "model.resnet.g_width=8"],
                 "dcgan_batchnorm": ["model.arch=dcgan", "model.dcgan.width=8", "model.dcgan.g_label=batchnorm"]}


@pytest.mark.parametrize("arch", list(CONDITIONAL_G))
def test_sync_batchnorm_conversion_keeps_the_class_conditioning(arch):
    g = build_generator(load_config(None, CONDITIONAL_G[arch]).model, RGB32).eval()
    z, labels = torch.randn(4, 100), torch.arange(4)
    with torch.no_grad():
        before = g(z, labels)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(g).eval()
        conditional = [m for m in synced.modules() if isinstance(m, ConditionalBatchNorm2d)]
        assert conditional and all(isinstance(m.norm, nn.SyncBatchNorm) and m.to_gain is not None
                                   for m in conditional)
        torch.testing.assert_close(synced(z, labels), before)  # in eval, the same statistics and conditioning


def test_checkpoints_of_the_batchnorm_subclass_still_load():
    """Saved when the layer was a BatchNorm subclass, its statistics sat at its own level of the state dict."""
    g = build_generator(load_config(None, CONDITIONAL_G["resnet"]).model, RGB32)
    state = {k.replace("norm1.norm.", "norm1.").replace("norm2.norm.", "norm2."): v + 1 if v.is_floating_point()
             else v for k, v in g.state_dict().items()}
    assert "blocks.0.norm1.running_mean" in state
    g.load_state_dict(upgrade_state(state, g))
    assert torch.equal(g.blocks[0].norm1.norm.running_mean, state["blocks.0.norm1.running_mean"])


@pytest.fixture
def float16(monkeypatch):
    """float16 autocast and a live GradScaler on the CPU, where the config refuses float16."""
    monkeypatch.setattr(amp_module, "choose_dtype", lambda cfg, device, bf16: (torch.float16, "test: float16"))


def test_float16_r1_penalty_is_finite_at_the_full_loss_scale(float16):
    eng = GANEngine(load_config(None, ["model.arch=dcgan", "model.dcgan.width=8", "model.spectral_norm=true",
                                       "loss.kind=hinge", "loss.r1.gamma=1", "loss.r1.every=1"]), CPU, DIGITS)
    assert eng.amp.scaler.is_enabled() and eng.amp.scaler.get_scale() == 65536
    metrics = eng.iteration(0, [batch(16)])
    # The scaled sum gave each logit a gradient of 65,536, and a NaN penalty; the first step's weight gradients may
    # still overflow, which the scaler skips and reports, as it does for any float16 loss.
    assert torch.isfinite(metrics["r1_penalty"]) and SKIPPED in metrics


def test_steps_the_scaler_skipped_are_counted_not_called_divergence(tmp_path):
    logger = MetricLogger(LogConfig(every_steps=3), CPU, tmp_path, 8, ("d_loss", "r1_penalty", SKIPPED), lambda: {})
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    logger.update(1, {"d_loss": one, "r1_penalty": nan, SKIPPED: torch.tensor(1.0)})
    logger.update(2, {"d_loss": one * 3, "r1_penalty": one, SKIPPED: torch.tensor(0.0)})
    pos = Position(10, 1, 8, 1)
    pos.step = 2
    logger.run(pos)
    record = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert '"d_loss": 3.0' in record and '"r1_penalty": 1.0' in record and f'"{SKIPPED}": 1' in record
    logger.update(3, {"d_loss": nan, SKIPPED: torch.tensor(1.0)})
    pos.step = 3
    with pytest.raises(Diverged, match="skipped all 1 steps"):
        logger.run(pos)


class HostCopies(TorchDispatchMode):
    """Tensors made from host data (``torch.tensor(x)``): on CUDA each is a copy that waits for the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_a_step_with_ada_lecam_and_bcr_copies_no_python_number_to_the_device():
    eng = GANEngine(load_config(None, ["augment.kind=ada", "augment.ada_interval=1", "augment.ada_p=0.5",
                                       "loss.lecam.weight=0.1", "loss.bcr.weight=1", "loss.r1.gamma=1",
                                       "loss.r1.every=1", "ema.enabled=true"]), CPU, DIGITS)
    eng.iteration(0, [batch(8)])
    with HostCopies() as copies:
        for step in (1, 2):
            metrics = eng.iteration(step, [batch(8)])
    assert copies.seen == 0 and "augment_p" in metrics


def test_a_checkpoint_without_a_loss_scale_resumes_under_float16(monkeypatch):
    saved = GANEngine(load_config(None, ["amp.enabled=false"]), CPU, DIGITS).state_dict()
    assert saved["scaler"] == {}
    monkeypatch.setattr(amp_module, "choose_dtype", lambda cfg, device, bf16: (torch.float16, "test: float16"))
    eng = GANEngine(load_config(None, []), CPU, DIGITS)
    eng.load_state_dict(saved)
    assert eng.amp.scaler.get_scale() == 65536  # a fresh scale


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_native_from_compute_capability_8(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # it counts emulation
    ok, why = native_bf16(torch.device("cuda", 0))
    assert ok is native and f"compute capability {capability[0]}.{capability[1]}" in why


def test_nccl_with_more_local_ranks_than_gpus_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(None, []).dist
    with pytest.raises(ConfigError, match="dist.backend: NCCL takes one GPU per rank, and 2 ranks on this node "
                                          "share 1 GPU"):
        dist._backend(cfg, torch.device("cuda", 0), 2)
    assert dist._backend(load_config(None, ["dist.backend=gloo"]).dist, torch.device("cuda", 0), 2) == "gloo"
    assert dist._backend(cfg, torch.device("cuda", 0), 1) == "nccl"


def test_gpus_that_cuda_cannot_use_stop_the_run_unless_the_cpu_is_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(dist, "visible_gpus", lambda: ["/dev/nvidia0", "/dev/nvidia1"])
    monkeypatch.setattr(dist, "_cuda_failure", lambda: "the NVIDIA driver on your system is too old")
    with pytest.raises(ConfigError, match="dist.device=auto: /dev/nvidia0, /dev/nvidia1 are here, but CUDA does not "
                                          "start \\(the NVIDIA driver on your system is too old\\)"):
        dist._device(load_config(None, []).dist, 0)
    assert dist._device(load_config(None, ["dist.device=cpu"]).dist, 0) == torch.device("cpu")
    monkeypatch.setattr(dist, "visible_gpus", lambda: [])
    assert dist._device(load_config(None, []).dist, 0) == torch.device("cpu")  # a machine with no GPU


@pytest.mark.parametrize(("env", "found"), [({"CUDA_VISIBLE_DEVICES": "0,1"}, ["CUDA_VISIBLE_DEVICES=0,1"]),
                                            ({"CUDA_VISIBLE_DEVICES": ""}, []), ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
                                            ({}, [])])
def test_visible_gpus_read_the_environment_without_cuda(monkeypatch, env, found):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist.Path, "glob", lambda self, pattern: iter(()))
    assert dist.visible_gpus() == found


def test_sync_batchnorm_with_a_penalty_through_d_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="dist.sync_batchnorm: R1 differentiates D's gradient, and SyncBatchNorm"):
        load_config(None, ["model.arch=dcgan", "dist.sync_batchnorm=true", "loss.r1.gamma=1"])
    load_config(None, ["model.arch=dcgan", "model.spectral_norm=true", "dist.sync_batchnorm=true", "loss.r1.gamma=1"])
