"""Exports of real checkpoints (a 2-step run of each architecture): every format reproduces gan_dist.sample's
images, in a fresh process that never imports gan_dist for TorchScript and ONNX; metadata; bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_cifar, write_folder

from gan_dist import export, load_generator, sample, train
from gan_dist.config import DatasetInfo
from gan_dist.models.export import KEY, NotAnExport, fold
from gan_dist.models.loading import generate, generator_from_checkpoint
from gan_dist.seeds import Stream, latents

pytestmark = pytest.mark.integration  # trains, and starts processes

ARCHS = {
    "mlp": ["model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]"],
    "dcgan": ["model.dcgan.width=8"],
    "resnet": ["model.resnet.g_width=8", "model.resnet.d_width=8", "model.spectral_norm=true", "ema.enabled=true",
               "ema.decay=0.5"],
    "r3gan": ["model.r3gan.widths=[32,16]", "model.r3gan.group_size=8", "ema.enabled=true", "ema.decay=0.5"],
    "flat": ["model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]", "model.conditioning=none"],
}
"""Every shipped architecture, and an unconditional G (a flat folder)."""
N_PER_CLASS, SEED = 3, 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cifar, flat = tmp_path_factory.mktemp("cifar"), tmp_path_factory.mktemp("flat")
    write_cifar(cifar, 40)
    write_folder(flat, None, size=16, modes=("RGB",), formats=("png",), n=24)
    out = {}
    for arch, extra in ARCHS.items():
        run_dir = tmp_path_factory.mktemp(arch)
        data = ["data.name=folder", f"data.root={flat}"] if arch == "flat" else \
            ["data.name=cifar10", f"data.root={cifar}", f"model.arch={arch}"]
        code = train.main([f"run_dir={run_dir}", *data, "data.split=train", "data.download=false",
                           f"data.cache_dir={run_dir.parent / 'cache'}", "log.wandb.mode=disabled", "train.max_steps=2",
                           "train.batch_size=8", "log.progress=false", *extra])
        assert code == 0
        out[arch] = run_dir / "checkpoints" / "step_2.pt"
    return out


def exported(checkpoint: Path, fmt: str, out: Path, *flags: str) -> Path:
    assert export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *flags]) == 0
    return out


FOREIGN = """
import json, sys
import numpy as np, onnxruntime, torch
z, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
script = torch.jit.load(sys.argv[3], _extra_files=(files := {"gan_dist": ""}))
with torch.no_grad():
    np.save(sys.argv[5], script(torch.from_numpy(z), torch.from_numpy(labels)).numpy())
session = onnxruntime.InferenceSession(sys.argv[4])
np.save(sys.argv[6], session.run(None, {"z": z, "labels": labels})[0])
meta = session.get_modelmeta().custom_metadata_map["gan_dist"]
assert not any(m.startswith("gan_dist") for m in sys.modules), "gan_dist was imported"
print(json.dumps({"torchscript": json.loads(files["gan_dist"]), "onnx": json.loads(meta)}))
"""
"""TorchScript and ONNX run as a user's program would: no gan_dist import (nor gan_dist on sys.path)."""


def run_foreign(tmp: Path, z: np.ndarray, labels: np.ndarray, script: Path, onnx: Path) -> tuple[np.ndarray, ...]:
    np.save(tmp / "z.npy", z)
    np.save(tmp / "labels.npy", labels)
    proc = subprocess.run([sys.executable, "-c", FOREIGN, *(str(tmp / n) for n in (
        "z.npy", "labels.npy")), str(script), str(onnx), str(tmp / "ts.npy"), str(tmp / "ort.npy")],
        capture_output=True, text=True, cwd=tmp, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp / "ts.npy"), np.load(tmp / "ort.npy"), json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_format_reproduces_gan_dist_sample(arch, checkpoints, tmp_path):
    ck = checkpoints[arch]
    generator, cfg, info = generator_from_checkpoint(ck)
    npz = tmp_path / "sample.npz"
    assert sample.main(["--checkpoint", str(ck), "--npz", str(npz), "--n-per-class", str(N_PER_CLASS),
                        "--seed", str(SEED)]) == 0
    expected = np.load(npz)

    safe = load_generator(exported(ck, "safetensors", tmp_path / "g.safetensors"))
    images = safe.sample(N_PER_CLASS, seed=SEED)
    fresh = subprocess.run([sys.executable, "-c", "import sys, numpy, gan_dist; numpy.save(sys.argv[2], gan_dist."
                            f"load_generator(sys.argv[1]).sample({N_PER_CLASS}, seed={SEED}).numpy())",
                            str(tmp_path / "g.safetensors"), str(tmp_path / "fresh.npy")], capture_output=True,
                           text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "fresh.npy"), images.numpy())
    assert np.array_equal(sample.to_uint8(images), expected["images"])

    labels = torch.from_numpy(expected["labels"])
    z = latents(cfg.model.z_dim, len(labels), SEED, Stream.NPZ)
    reference = generate(generator, z, labels).numpy()
    assert torch.equal(images, torch.from_numpy(reference))
    script, ort, meta = run_foreign(tmp_path, z.numpy(), labels.numpy(), exported(ck, "torchscript", tmp_path / "g.pt"),
                                    exported(ck, "onnx", tmp_path / "g.onnx"))
    assert np.abs(script - reference).max() <= 1e-5
    assert np.abs(ort - reference).max() <= 1e-4  # float32 in onnxruntime's own kernels
    for d in (meta["torchscript"], meta["onnx"], json.loads(json.dumps(safe.description.__dict__, default=list))):
        assert (d["arch"], d["z_dim"], d["channels"], d["resolution"]) == (
            cfg.model.arch, cfg.model.z_dim, info.channels, info.resolution)
        assert d["num_classes"] == (0 if arch == "flat" else 10)
        assert d["class_names"] == ([] if arch == "flat" else list(info.class_names))
        assert d["ema"] == cfg.ema.enabled and d["step"] == 2


def test_the_batch_is_free_and_uint8_folds_the_pixels(checkpoints, tmp_path):
    ck = checkpoints["resnet"]
    generator, cfg, _ = generator_from_checkpoint(ck)
    z, labels = torch.randn(64, cfg.model.z_dim), torch.arange(64) % 10
    want = sample.to_uint8(generate(generator, z, labels))
    script, ort, meta = run_foreign(tmp_path, z.numpy(), labels.numpy(),
                                    exported(ck, "torchscript", tmp_path / "g.pt", "--uint8"),
                                    exported(ck, "onnx", tmp_path / "g.onnx", "--uint8"))
    assert script.dtype == ort.dtype == np.uint8 and script.shape == (64, 32, 32, 3)
    assert np.array_equal(script, want)
    assert np.abs(ort.astype(int) - want.astype(int)).max() <= 1  # a value on a rounding edge
    assert meta["onnx"]["output"] == "uint8 [N, 32, 32, 3] pixels"


def test_the_no_ema_export_is_the_raw_generator(checkpoints, tmp_path):
    ck = checkpoints["resnet"]
    raw = load_generator(exported(ck, "safetensors", tmp_path / "raw.safetensors", "--no-ema"))
    ema = load_generator(exported(ck, "safetensors", tmp_path / "ema.safetensors"))
    generator, _, _ = generator_from_checkpoint(ck, use_ema=False)
    z, labels = torch.randn(4, 100), torch.arange(4)
    assert torch.equal(raw(z, labels), generate(generator, z, labels))
    assert not torch.equal(raw(z, labels), ema(z, labels))
    assert not raw.description.ema and ema.description.ema


def test_the_export_runs_in_eval_mode_with_plain_weights(checkpoints, tmp_path):
    model = load_generator(exported(checkpoints["resnet"], "safetensors", tmp_path / "g.safetensors"))
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert not any(m.training for m in model.modules())


def test_spectral_norm_is_folded_into_the_weight_it_computes():
    layer = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 4)).eval()
    x = torch.randn(3, 6)
    want = layer(x)
    plain = fold(layer)
    assert not torch.nn.utils.parametrize.is_parametrized(plain)
    assert set(plain.state_dict()) == {"weight", "bias"}
    assert torch.allclose(plain(x), want, atol=1e-6)


def one_line_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "gan_dist.export", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def test_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    ck = str(checkpoints["mlp"])
    assert str(junk) in one_line_error(["--checkpoint", str(junk), "--format", "onnx", "--out", str(tmp_path / "g")])
    assert "invalid choice: 'pickle'" in one_line_error(["--checkpoint", ck, "--format", "pickle", "--out", "g"])
    missing = tmp_path / "no" / "g.onnx"
    assert f"the folder {missing.parent} does not exist" in one_line_error(
        ["--checkpoint", ck, "--format", "onnx", "--out", str(missing)])
    with pytest.raises(NotAnExport, match="not a safetensors file"):
        load_generator(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(NotAnExport, match=f"not a gan_dist export \\(no '{KEY}' metadata\\)"):
        load_generator(tmp_path / "other.safetensors")


UNEXPORTABLE = '''
import dataclasses

import torch
from gan_dist.config import ARCHITECTURES
from gan_dist.models.mlp import MLPGenerator


class Histogram(MLPGenerator):
    def forward(self, z, labels):
        x = super().forward(z, labels)
        return x + torch.histc(x, 4).sum() * 0


ARCHITECTURES.register("histogram", ARCHITECTURES.options("mlp"))(
    dataclasses.replace(ARCHITECTURES["mlp"], generator=Histogram))
'''


def test_an_operation_onnx_lacks_is_named(tmp_path):
    (tmp_path / "histogram_arch.py").write_text(UNEXPORTABLE)
    root = tmp_path / "images"
    write_folder(root, {"a": 8, "b": 8}, size=16)
    env = {"PYTHONPATH": str(tmp_path)}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gan_dist.train", "imports=[histogram_arch]", "model.arch=histogram",
                           f"run_dir={run_dir}", "data.name=folder", f"data.root={root}", "data.split=train",
                           "train.max_steps=1", "train.batch_size=8", "log.wandb.mode=disabled", "log.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**env, "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "gan_dist.export", "--checkpoint", str(run_dir / "checkpoints" /
                          "step_1.pt"), "--format", "onnx", "--out", str(tmp_path / "g.onnx")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env={**env, "PATH": "/usr/bin"})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
    assert re.search(r"cannot be exported to onnx: torch\.ops\.aten\.histc", out.stderr), out.stderr
    assert not (tmp_path / "g.onnx").exists() and not list(tmp_path.glob(".g.onnx.tmp*"))


def readme_snippets() -> dict[str, str]:
    """The README's Export section: its python blocks, by the format each one opens."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {fmt: b for b in blocks for fmt in ("safetensors", "onnx", "pt") if f'"g.{fmt}"' in b}


def test_the_readmes_snippets_generate_a_batch_of_64(checkpoints, tmp_path):
    snippets = readme_snippets()
    assert set(snippets) == {"safetensors", "pt", "onnx"}
    for fmt, name in (("safetensors", "safetensors"), ("torchscript", "pt"), ("onnx", "onnx")):
        exported(checkpoints["resnet"], fmt, tmp_path / f"g.{name}")
        check = "\nassert tuple(images.shape) == (64, 3, 32, 32), images.shape\n"
        if name != "safetensors":
            check += "import sys\nassert not any(m.startswith('gan_dist') for m in sys.modules)\n"
        proc = subprocess.run([sys.executable, "-c", snippets[name] + check], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])


SHAPES = {"mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "folder": (3, None, 9)}
"""(channels, resolution, classes) of each shipped recipe's dataset; a folder's resolution is the recipe's."""


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_recipes_generator_exports_to_every_format(recipe, tmp_path):
    """At the recipe's own widths (not a training run's: a fresh G of the recipe, in eval mode)."""
    import onnxruntime

    from gan_dist.configio import load_config
    from gan_dist.models.base import build_generator
    from gan_dist.models.export import SAVERS, Description, ExportedGenerator

    cfg = load_config(REPO / "configs" / recipe, [])
    channels, resolution, classes = SHAPES[cfg.data.name]
    info = DatasetInfo(cfg.data.name, channels, resolution or cfg.data.resolution, classes,
                       tuple(f"c{i}" for i in range(classes)), {"train": 100}, "test")
    torch.manual_seed(0)
    model = ExportedGenerator(build_generator(cfg.model, info), Description.of(cfg, info, False, 0, False))
    z, labels = torch.randn(5, cfg.model.z_dim), torch.arange(5) % classes
    with torch.no_grad():
        want = model(z, labels).numpy()
    for fmt, saver in SAVERS.items():
        saver(model, tmp_path / fmt)
    assert np.array_equal(load_generator(tmp_path / "safetensors")(z, labels).numpy(), want)
    assert np.abs(torch.jit.load(tmp_path / "torchscript")(z, labels).numpy() - want).max() <= 1e-5
    got = onnxruntime.InferenceSession(tmp_path / "onnx").run(None, {"z": z.numpy(), "labels": labels.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4
