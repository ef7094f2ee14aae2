"""Config: YAML + dotted overrides resolve into the typed tree; bad keys and values exit 2 naming the key."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import REPO, run

from gan_dist.config import Config, ConfigError
from gan_dist.configio import from_dict, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 32, "epochs": 3}, "optim": {"g_lr": "2e-4"}}))
    cfg = load_config(path, ["train.batch_size=128", "model.mlp.d_hidden=[64, 32]", "log.wandb.tags=[a, b]",
                             "train.max_steps=null"])
    assert cfg.train.batch_size == 128  # the override wins over the file
    assert cfg.train.epochs == 3  # the file wins over the default
    assert cfg.optim.g_lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; still a float here
    assert cfg.model.options.d_hidden == (64, 32)
    assert cfg.log.wandb.tags == ("a", "b")
    assert cfg.train.max_steps is None
    assert cfg.train.seed == Config().train.seed


def test_shipped_recipe_is_the_tutorial():
    cfg = load_config(REPO / "configs" / "mnist_cgan.yaml")
    assert (cfg.model.arch, cfg.loss.kind, cfg.train.batch_size, cfg.train.epochs) == ("mlp", "bce", 64, 30)
    assert cfg.optim.g_lr == cfg.optim.d_lr == 1e-4
    assert cfg.model.options.g_hidden == (256, 512, 1024) and cfg.model.options.d_hidden == (1024, 512, 256)


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.arch=dcgan", "log.wandb.tags=[x]"])
    assert load_config(None, []) != cfg


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
        ("model.mlp.g_hidden=[8, -1]", "model.mlp.g_hidden"),
        ("optim.g_betas=[0.5]", "optim.g_betas"),
        ("train=3", "train"),
        ("loss.r1.every=0", "loss.r1.every"),
        ("loss.bce.label_smoothing=0.9", "loss.bce.label_smoothing"),
    ],
)
def test_bad_key_or_value_names_it(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.arch=vit"], "model.arch: unknown architecture 'vit'; known: mlp, dcgan, resnet"),
    (["loss.kind=wgan"], "loss.kind: unknown loss 'wgan'; known: bce, hinge"),
    (["data.name=imagenet"], "data.name: unknown dataset 'imagenet'; known: mnist, fashion_mnist, idx, cifar10"),
    (["model.dcgan.width=32"], "model.dcgan.width: applies with model.arch=dcgan, and this config has model.arch=mlp"),
    (["model.arch=dcgan", "model.mlp.d_dropout=0.1"], "model.mlp.d_dropout: applies with model.arch=mlp"),
    (["loss.kind=hinge", "loss.bce.label_smoothing=0.1"], "loss.bce.label_smoothing: applies with loss.kind=bce"),
    (["loss.kind=hinge", "loss.hinge.margin=2"], "loss.hinge: loss.kind=hinge takes no options"),
    (["model.arch=dcgan", "model.dcgan.d_depth=0"], "model.dcgan.d_depth: expected values >= 1"),
    (["model.width=32"], "unknown config key 'model.width'; known here: arch, z_dim, embed_dim, conditioning, "
                         "spectral_norm, mlp, dcgan"),
    (["loss.r1.gamma=10", "train.compile=default"], "loss.r1.gamma: R1 differentiates D's gradient"),
])
def test_registered_names_and_their_sections(overrides, message):
    """A name must be registered; an entry's own section only applies when it is the one chosen."""
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert str(raised.value).startswith(message)


def test_chosen_options_round_trip_under_their_name():
    cfg = load_config(None, ["model.arch=dcgan", "model.dcgan.width=16", "loss.r1.gamma=1"])
    tree = to_dict(cfg)
    assert tree["model"]["dcgan"] == {"width": 16, "d_depth": 1, "g_label": "input", "g_init": "default"}
    assert "mlp" not in tree["model"]
    assert tree["loss"]["bce"] == {"label_smoothing": 0.0} and tree["loss"]["r1"]["gamma"] == 1.0
    assert from_dict(Config, tree) == cfg


@pytest.mark.integration
@pytest.mark.parametrize("override", ["train.bogus=1", "train.batch_size=many"])
def test_cli_exits_2_with_one_line(override):
    proc = run([sys.executable, "-m", "gan_dist.train", override, "--dry-run"], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_a_config_that_is_not_text_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "model.pt").write_bytes(bytes(range(256)))
    proc = run([sys.executable, "-m", "gan_dist.train", "--config", tmp_path / "model.pt", "--dry-run"], timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"config error: --config: {tmp_path / 'model.pt'} is not UTF-8 text (byte 128 is 0x80); " \
                          "name a YAML file\n"


@pytest.mark.integration
@pytest.mark.parametrize(("entry", "args"), [
    ("gan_dist.train", ["--dry-run"]),
    ("gan_dist.evaluate", ["--npz", "missing.npz", "data.download=false"]),
])
def test_overrides_may_stand_on_both_sides_of_config(tmp_path, entry, args):
    """argparse's plain parse refuses positionals after an option ("unrecognized arguments"). (sample
    takes no config.)"""
    (tmp_path / "c.yaml").write_text("train:\n  batch_size: 7\n")
    proc = run([sys.executable, "-m", entry, "run_dir=elsewhere", "--config", tmp_path / "c.yaml",
                "train.max_steps=2", *args], timeout=60, cwd=tmp_path)
    assert "unrecognized arguments" not in proc.stderr
    if entry == "gan_dist.train":
        assert proc.returncode == 0, proc.stderr
        resolved = yaml.safe_load(proc.stdout)
        assert (resolved["run_dir"], resolved["train"]["batch_size"], resolved["train"]["max_steps"]) == \
            ("elsewhere", 7, 2)
    else:  # parsed: what stops it is the missing data
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.integration
def test_dry_run_prints_resolved_config_and_help_lists_keys():
    proc = run([sys.executable, "-m", "gan_dist.train", "train.batch_size=7", "--dry-run"], timeout=60)
    assert proc.returncode == 0
    assert yaml.safe_load(proc.stdout)["train"]["batch_size"] == 7
    helped = run([sys.executable, "-m", "gan_dist.train", "--help"], timeout=60)
    assert helped.returncode == 0
    for key in ("train.n_critic", "amp.dtype", "data.download", "log.wandb.mode", "checkpoint.keep_last"):
        assert key in helped.stdout
