"""The compute dtype follows the device: bf16 only where it is native, and the choice is recorded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_overrides, run

from gan_dist.amp import NATIVE_BF16_CPU_FLAGS, Amp, choose_dtype, choose_layout, cpu_flags
from gan_dist.config import AmpConfig

NATIVE, EMULATED = (True, "has it"), (False, "lacks it")


@pytest.mark.parametrize(("device", "bf16", "expected"), [
    ("cpu", NATIVE, torch.bfloat16),
    ("cpu", EMULATED, torch.float32),
    ("cuda", NATIVE, torch.bfloat16),
    ("cuda", EMULATED, torch.float16),
])
def test_auto_picks_native_bf16_else_the_device_fallback(device, bf16, expected):
    dtype, reason = choose_dtype(AmpConfig(dtype="auto"), device, bf16)
    assert dtype == expected
    assert reason.startswith("auto: ") and bf16[1] in reason


@pytest.mark.parametrize("bf16", [NATIVE, EMULATED])
@pytest.mark.parametrize(("cfg", "expected"), [
    (AmpConfig(dtype="bfloat16"), torch.bfloat16),
    (AmpConfig(dtype="float32"), torch.float32),
    (AmpConfig(enabled=False, dtype="bfloat16"), torch.float32),
])
def test_explicit_settings_win_over_the_capability(cfg, expected, bf16):
    assert choose_dtype(cfg, "cpu", bf16)[0] == expected


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile", True),
    ("flags\t\t: fpu sse avx2 fma", False),
    ("Features\t: fp asimd bf16 i8mm", True),
    ("Features\t: fp asimd", False),
])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert bool(cpu_flags(cpuinfo) & NATIVE_BF16_CPU_FLAGS) == native
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolved_section_round_trips():
    resolved = Amp(AmpConfig(dtype="auto"), torch.device("cpu")).config
    assert resolved.dtype in ("bfloat16", "float32") and resolved.enabled == (resolved.dtype == "bfloat16")
    assert Amp(resolved, torch.device("cpu")).dtype == getattr(torch, resolved.dtype)


@pytest.mark.parametrize(("setting", "device", "dtype", "conv", "isa", "chosen"), [
    ("auto", "cuda", torch.bfloat16, True, None, "channels_last"),
    ("auto", "cuda", torch.float16, True, None, "channels_last"),
    ("auto", "cuda", torch.float32, True, None, "contiguous"),
    ("auto", "cuda", torch.bfloat16, False, None, "contiguous"),
    ("auto", "cpu", torch.bfloat16, True, "AVX512", "channels_last"),
    ("auto", "cpu", torch.float32, True, "AVX512", "channels_last"),
    ("auto", "cpu", torch.float32, True, "AVX2", "contiguous"),
    ("auto", "cpu", torch.bfloat16, False, "AVX512", "contiguous"),
    ("channels_last", "cpu", torch.float32, False, "AVX2", "channels_last"),
    ("contiguous", "cuda", torch.bfloat16, True, None, "contiguous"),
])
def test_layout_follows_the_device_the_dtype_and_the_network(setting, device, dtype, conv, isa, chosen):
    assert choose_layout(AmpConfig(memory_format=setting), device, dtype, conv, isa) == chosen


def test_channels_last_trains_the_same_networks_in_another_layout():
    from shapes import RGB32, batch

    from gan_dist.configio import load_config
    from gan_dist.dist import DistEnv
    from gan_dist.training.engine import GANEngine

    cfg = load_config(None, ["model.arch=resnet", "model.resnet.g_width=8", "model.resnet.d_width=8",
                             "amp.memory_format=channels_last", "amp.enabled=false"])
    eng = GANEngine(cfg, DistEnv(0, 0, 1, 1, torch.device("cpu")), RGB32)
    conv = next(m for m in eng.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    real, labels = batch(4, RGB32)
    metrics = eng.iteration(0, [(real, labels)])
    assert torch.isfinite(metrics["d_loss"]) and torch.isfinite(metrics["g_loss"])


@pytest.mark.integration
def test_run_prints_and_records_the_choice(tmp_path: Path, idx_root: Path):
    overrides = base_overrides(tmp_path / "run", idx_root, **{"train.max_steps": 2})
    result = run([sys.executable, "-m", "gan_dist.train", *overrides])
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("precision: "))
    written = (tmp_path / "run" / "config.yaml").read_text()
    recorded = yaml.safe_load(written)["amp"]
    assert recorded["dtype"] in ("bfloat16", "float32") and f"precision: {recorded['dtype']} (auto: " in line
    reason = line[line.index("(") + 1:line.rindex("); layout:")]  # the reason may hold parentheses itself
    assert written.startswith(f"# amp.dtype: {reason}\n")
    assert recorded["memory_format"] == "contiguous" and line.endswith("; layout: contiguous")  # an MLP
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "step_2.pt", weights_only=True)
    assert checkpoint["run"]["config"]["amp"] == recorded
