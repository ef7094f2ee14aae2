"""``train.compile``: compiled forwards (inductor, the system C compiler) train like eager ones,
checkpoints stay plain state dicts, and a compiled run resumes exactly."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU, base_overrides, run
from shapes import DIGITS

from gan_dist.configio import load_config
from gan_dist.training.engine import GANEngine

pytestmark = pytest.mark.integration  # starts processes or services

# Inductor fuses and reorders float32 reductions, so results agree with eager to rounding, not bitwise.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def test_compiled_steps_match_eager_and_save_plain_state_dicts():
    batch = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (16,))
    fp32 = ["model.mlp.d_dropout=0.0", "amp.enabled=false"]  # bf16 rounding would swamp the tolerance
    engines = {mode: GANEngine(load_config(None, [f"train.compile={mode}", *fp32]), CPU, DIGITS)
               for mode in ("off", "default")}
    for step in range(3):
        metrics = {mode: torch.stack(list(e.iteration(step, [batch]).values())) for mode, e in engines.items()}
    torch.testing.assert_close(metrics["default"], metrics["off"], **TOLERANCE)
    eager, compiled = engines["off"].state_dict(), engines["default"].state_dict()
    for net in ("generator", "discriminator"):
        assert compiled[net].keys() == eager[net].keys()
        for key, value in eager[net].items():
            torch.testing.assert_close(compiled[net][key], value, **TOLERANCE)


def test_compiled_run_resumes_exactly(tmp_path: Path, idx_root: Path):
    def train(run_dir: Path) -> None:
        extra = {"train.compile": "default", "train.max_steps": 4, "checkpoint.every_steps": 2}
        result = run([sys.executable, "-m", "gan_dist.train", *base_overrides(run_dir, idx_root, **extra)])
        assert result.returncode == 0, result.stderr[-3000:]

    train(tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "straight" / "checkpoints" / "step_2.pt", tmp_path / "resumed" / "checkpoints")
    train(tmp_path / "resumed")
    a, b = (torch.load(tmp_path / name / "checkpoints" / "step_4.pt", weights_only=True)
            for name in ("straight", "resumed"))
    for net in ("generator", "discriminator", "opt_g", "opt_d"):
        flat_a, flat_b = (torch.utils._pytree.tree_leaves(x["engine"][net]) for x in (a, b))
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b, strict=True))
