"""Config: YAML + dotted overrides resolve into the typed tree; bad keys and values exit 2 naming the key."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import REPO, run

from gan_dist.config import Config, ConfigError, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 32, "epochs": 3}, "optim": {"g_lr": "2e-4"}}))
    cfg = load_config(path, ["train.batch_size=128", "model.d_hidden=[64, 32]", "log.wandb.tags=[a, b]",
                             "train.max_steps=null"])
    assert cfg.train.batch_size == 128  # the override wins over the file
    assert cfg.train.epochs == 3  # the file wins over the default
    assert cfg.optim.g_lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; still a float here
    assert cfg.model.d_hidden == (64, 32)
    assert cfg.log.wandb.tags == ("a", "b")
    assert cfg.train.max_steps is None
    assert cfg.train.seed == Config().train.seed


def test_shipped_recipe_is_the_tutorial():
    cfg = load_config(REPO / "configs" / "mnist_cgan.yaml")
    assert (cfg.model.arch, cfg.loss.kind, cfg.train.batch_size, cfg.train.epochs) == ("mlp", "bce", 64, 30)
    assert cfg.optim.g_lr == cfg.optim.d_lr == 1e-4
    assert cfg.model.g_hidden == (256, 512, 1024) and cfg.model.d_hidden == (1024, 512, 256)


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.arch=dcgan", "log.wandb.tags=[x]"])
    assert load_config(None, []) != cfg
    from gan_dist.config import from_dict

    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.bacth_size=3", "train.bacth_size"),
        ("nope=1", "nope"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("amp.dtype=fp8", "amp.dtype"),
        ("amp.enabled=maybe", "amp.enabled"),
        ("model.g_hidden=[8, -1]", "model.g_hidden"),
        ("optim.g_betas=[0.5]", "optim.g_betas"),
        ("train=3", "train"),
        ("model.d_depth=0", "model.d_depth"),
    ],
)
def test_bad_key_or_value_names_it(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.bogus=1", "train.batch_size=many"])
def test_cli_exits_2_with_one_line(override):
    proc = run([sys.executable, "-m", "gan_dist.train", override, "--dry-run"], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0] and "Traceback" not in proc.stderr


def test_dry_run_prints_resolved_config_and_help_lists_keys():
    proc = run([sys.executable, "-m", "gan_dist.train", "train.batch_size=7", "--dry-run"], timeout=60)
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["train"]["batch_size"] == 7
    helped = run([sys.executable, "-m", "gan_dist.train", "--help"], timeout=60)
    assert helped.returncode == 0
    for key in ("train.n_critic", "amp.dtype", "data.download", "log.wandb.mode", "checkpoint.keep_last"):
        assert key in helped.stdout
