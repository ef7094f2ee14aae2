"""The sampling CLI, on real checkpoints that the real trainer writes from a tiny IDX dataset."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_dist import sample, train
from gan_dist.checkpoint import load_generator
from gan_dist.data import NUM_CLASSES
from gan_dist.monitor import generate

TILE = 30  # save_grid: a 28-pixel image plus 2 of padding; the grid has 2 more at its far edges
FLAVOURS = {
    "mlp": [],
    "ema": ["ema.enabled=true", "ema.decay=0.5"],  # a fast EMA, so that it differs from G after 2 steps
    "dcgan": ["model.arch=dcgan", "model.width=8"],
}


def write_idx(root: Path, n: int) -> None:
    """A test split in MNIST's IDX format: random pixels, labels 0..9 in turn."""
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
    (root / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step training run per generator flavour: it leaves checkpoints/step_2.pt and samples/step_2.png."""
    root = tmp_path_factory.mktemp("idx")
    write_idx(root, 40)
    out = {}
    for name, extra in FLAVOURS.items():
        run_dir = tmp_path_factory.mktemp(name)
        code = train.main([f"run_dir={run_dir}", f"data.root={root}", "data.split=test",
                           "data.download=false", "log.wandb.mode=disabled", "train.max_steps=2",
                           "train.batch_size=8", "log.progress=false", *extra])
        assert code == 0
        out[name] = run_dir
    return out


def checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_2.pt"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the CLI in this process: its exit status (argparse's SystemExit included) and its stderr."""
    try:
        code = sample.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def outputs(capsys: pytest.CaptureFixture[str], ckpt: Path, folder: Path, *extra: object
            ) -> dict[str, np.ndarray]:
    """All three outputs of one call, as arrays: the PNG files' bytes and the npz's own arrays."""
    folder.mkdir(parents=True)
    code, err = cli(capsys, "--checkpoint", ckpt, "--grid", folder / "grid.png", "--npz", folder / "s.npz",
                    "--n-per-class", 3, "--interpolate", folder / "walk.png", "--steps", 4, *extra)
    assert (code, err) == (0, "")
    with np.load(folder / "s.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    pngs = {k: np.frombuffer((folder / f"{k}.png").read_bytes(), np.uint8) for k in ("grid", "walk")}
    return pngs | arrays


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_grid_at_the_training_seed_is_the_training_grid(runs, flavour, tmp_path, capsys):
    """Rows are classes and the checkpoint round-trips: seed 0 (train.seed) redraws samples/step_2.png."""
    out = tmp_path / "grid.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs[flavour]), "--grid", out, "--seed", 0)[0] == 0
    assert out.read_bytes() == (runs[flavour] / "samples" / "step_2.png").read_bytes()


def test_grid_size_follows_n(runs, tmp_path, capsys):
    out = tmp_path / "nested" / "grid.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), "--grid", out, "--n", 3)[0] == 0
    assert Image.open(out).size == (3 * TILE + 2, NUM_CLASSES * TILE + 2)


def test_npz_arrays(runs, tmp_path, capsys):
    out = tmp_path / "samples.data"  # any suffix is kept as given
    assert cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), "--npz", out, "--n-per-class", 7)[0] == 0
    with np.load(out) as npz:
        assert sorted(npz.files) == ["images", "labels"]
        images, labels = npz["images"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (70, 28, 28)
    assert labels.dtype == np.int64 and labels.tolist() == [c for c in range(NUM_CLASSES) for _ in range(7)]
    assert images.min() < 100 < 150 < images.max()  # a full range, not a constant
    assert len({im.tobytes() for im in images}) == 70  # one latent per image


def test_uint8_is_the_inverse_of_the_loader_scaling():
    """Same polarity and levels as the data: the loader's x = pixel / 127.5 - 1 maps back exactly."""
    pixels = torch.arange(256, dtype=torch.uint8)
    x = pixels.float().div(127.5).sub(1.0).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    assert np.array_equal(sample.to_uint8(x)[:, 0, 0], pixels.numpy())
    assert sample.to_uint8(torch.tensor([-1.5, 1.5]).view(2, 1, 1, 1)).ravel().tolist() == [0, 255]


def test_interpolation_size(runs, tmp_path, capsys):
    out = tmp_path / "walk.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), "--interpolate", out, "--steps", 5)[0] == 0
    rows = 2 * NUM_CLASSES + (NUM_CLASSES - 1) + 2  # two latent walks per class, the label walks, two gaps
    assert Image.open(out).size == (5 * TILE + 2, rows * TILE + 2)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_walks_end_where_they_should(runs, flavour):
    """Both latent walks join z0 to z1, and label walk k runs from the image of class k to that of k + 1."""
    steps = 4
    generator, cfg = load_generator(checkpoint(runs[flavour]))
    images = sample.walks(generator, cfg.model.z_dim, steps, 0, torch.device("cpu"))
    assert images.shape == ((3 * NUM_CLASSES + 1) * steps, 1, 28, 28)
    line, gap1, arc, gap2, labels = images.split([NUM_CLASSES * steps, steps, NUM_CLASSES * steps, steps,
                                                   (NUM_CLASSES - 1) * steps])
    assert not gap1.any() and not gap2.any()
    line, arc = line.view(NUM_CLASSES, steps, -1), arc.view(NUM_CLASSES, steps, -1)
    torch.testing.assert_close(arc[:, [0, -1]], line[:, [0, -1]], atol=1e-5, rtol=0)
    assert not torch.allclose(arc[:, 1:-1], line[:, 1:-1])
    labels = labels.view(NUM_CLASSES - 1, steps, -1)
    torch.testing.assert_close(labels[:, 0], line[:-1, 0])  # z0 and class k
    torch.testing.assert_close(labels[:, -1], line[1:, 0])  # z0 and class k + 1


def test_embedding_path_matches_labels(runs):
    """Feeding G the table's own rows is the same as feeding it the class ids."""
    generator, cfg = load_generator(checkpoint(runs["dcgan"]))
    z = sample.latents(cfg.model.z_dim, NUM_CLASSES, 0, 0)
    from_table = sample.generate_from_embeddings(generator, z, generator.embed.weight)
    torch.testing.assert_close(from_table, generate(generator, z, torch.arange(NUM_CLASSES)))


def test_slerp_keeps_the_norm_and_the_ends():
    z0, z1 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -3.0])
    path = sample.slerp(z0, z1, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[[0, -1]], torch.stack([z0, z1]))
    torch.testing.assert_close(path.norm(dim=1), torch.full((5,), 3.0))
    torch.testing.assert_close(sample.slerp(z0, 2 * z0, torch.tensor([0.5])), torch.tensor([[4.5, 0.0, 0.0]]))


def test_same_seed_same_bytes_other_seed_other_images(runs, tmp_path, capsys):
    ckpt = checkpoint(runs["dcgan"])
    first, again = outputs(capsys, ckpt, tmp_path / "a"), outputs(capsys, ckpt, tmp_path / "b")
    other = outputs(capsys, ckpt, tmp_path / "c", "--seed", 1)
    assert same(first, again)
    for key in ("grid", "walk", "images"):
        assert not np.array_equal(first[key], other[key]), key


def test_each_output_has_its_own_stream(runs, tmp_path, capsys):
    """Asking for more outputs in one call changes none of them."""
    ckpt = checkpoint(runs["mlp"])
    together = outputs(capsys, ckpt, tmp_path / "all")
    alone = tmp_path / "alone.npz"
    assert cli(capsys, "--checkpoint", ckpt, "--npz", alone, "--n-per-class", 3)[0] == 0
    with np.load(alone) as npz:
        assert np.array_equal(npz["images"], together["images"])


def test_no_ema_uses_the_raw_generator(runs, tmp_path, capsys):
    ema = checkpoint(runs["ema"])
    default, raw = outputs(capsys, ema, tmp_path / "ema"), outputs(capsys, ema, tmp_path / "raw", "--no-ema")
    assert not np.array_equal(default["images"], raw["images"])
    generator, cfg = load_generator(ema, use_ema=False)
    z = sample.latents(cfg.model.z_dim, 3 * NUM_CLASSES, 0, sample.NPZ_STREAM)
    assert np.array_equal(raw["images"], sample.to_uint8(generate(generator, z, torch.tensor(raw["labels"]))))
    plain = checkpoint(runs["mlp"])  # no EMA saved: --no-ema changes nothing
    assert same(outputs(capsys, plain, tmp_path / "p1"), outputs(capsys, plain, tmp_path / "p2", "--no-ema"))


def bad_checkpoint(case: str, run_dir: Path, folder: Path) -> Path:
    """A checkpoint path that ``case`` spoils, next to the run's good one."""
    path = folder / "bad.pt"
    if case == "not torch":
        path.write_text("hello")
    elif case == "truncated":
        path.write_bytes(checkpoint(run_dir).read_bytes()[:5000])
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "incompatible":  # its config builds a G with another latent size than its weights
        state = torch.load(checkpoint(run_dir), weights_only=True)
        state["config"]["model"]["z_dim"] = 7
        torch.save(state, path)
    elif case == "non-finite":  # what a diverged run saves
        state = torch.load(checkpoint(run_dir), weights_only=True)
        state["generator"]["net.0.weight"][0, 0] = float("nan")
        torch.save(state, path)
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist"),
    ("not torch", "is unreadable"),
    ("truncated", "is unreadable"),
    ("foreign", "is not a gan_dist checkpoint"),
    ("incompatible", "generator.net.0.weight has shape"),
    ("non-finite", "generator has non-finite values in 1 tensor(s) (net.0.weight); the run diverged"),
])
def test_bad_checkpoint(runs, case, message, tmp_path, capsys):
    bad = bad_checkpoint(case, runs["mlp"], tmp_path)
    code, err = cli(capsys, "--checkpoint", bad, "--grid", tmp_path / "g.png")
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--grid", "g.png", "--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
    (["--npz", "s.npz", "--n-per-class", "-1"], "argument --n-per-class: expected an integer >= 1, got '-1'"),
    (["--interpolate", "w.png", "--steps", "1"], "argument --steps: expected an integer >= 2"),
    (["--grid", "g.png", "--n", "ten"], "got 'ten'"),
    (["--grid", "g.png", "--seed", "-3"], "argument --seed"),
    (["--grid", "g.png", "--device", "tpu"], "argument --device"),
    (["--grid", "g.jpgg"], "argument --grid: g.jpgg: PIL writes no .jpgg files; use .png"),
    (["--interpolate", "walks"], "argument --interpolate: walks: no extension to name the image format"),
    ([], "nothing to write"),
])
def test_bad_arguments(runs, args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), *args)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_grid_in_any_format_pil_writes(runs, tmp_path, capsys):
    assert cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), "--grid", tmp_path / "g.JPG")[0] == 0
    assert Image.open(tmp_path / "g.JPG").format == "JPEG"


def test_unwritable_output(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = cli(capsys, "--checkpoint", checkpoint(runs["mlp"]), "--npz", tmp_path / "file" / "s.npz")
    assert code == 2 and err.startswith("error: cannot write") and len(err.splitlines()) == 1


def test_module_entry_point_exit_status(tmp_path):
    """``python -m gan_dist.sample`` itself: status 2 and one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "gan_dist.sample", "--checkpoint", str(tmp_path / "none.pt"),
                           "--grid", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: checkpoint {tmp_path / 'none.pt'} does not exist\n"
