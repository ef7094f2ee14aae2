"""What the light entry points load: the config and its parser, the trainer's command line and the Slurm
launcher import no torch, so signal handlers and OpenMP's environment are in place before torch loads."""

from __future__ import annotations

import sys

import pytest
from conftest import run

HEAVY = ("torch", "torchvision", "numpy", "PIL", "wandb")


@pytest.mark.parametrize("module", ["gan_dist.config", "gan_dist.configio", "gan_dist.training.position",
                                    "gan_dist.train", "launch.slurm"])
def test_importing_loads_no_torch(module):
    proc = run([sys.executable, "-c", f"import sys, {module}; print(sorted(set({HEAVY!r}) & set(sys.modules)))"])
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.integration
def test_resolving_a_config_loads_the_registries_it_names():
    """The built-in names register on first lookup: a config is still checked against all of them."""
    code = ("import gan_dist.config as c, gan_dist.configio as io; "
            "cfg = io.load_config(None, ['model.arch=resnet', 'loss.kind=hinge']); "
            "print(cfg.model.arch, c.ARCHITECTURES.names(), c.LOSSES.names())")
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "resnet ('mlp', 'dcgan', 'resnet', 'r3gan') ('bce', 'hinge', 'rpgan')", \
        proc.stdout + proc.stderr
