"""The sampling CLI, on real checkpoints that the real trainer writes from tiny datasets: MNIST-format
digits, CIFAR-10 and CIFAR-100's RGB 32×32, and a flat folder of RGB images without classes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar, write_folder, write_idx
from PIL import Image

from gan_dist import sample, train
from gan_dist.data.classes import GRID_ROWS, grid_classes
from gan_dist.models.base import label_count
from gan_dist.models.loading import generate, generator_from_checkpoint
from gan_dist.seeds import Stream, derive_seed
from gan_dist.training.samples import fixed_noise

TILE = 30  # save_grid: a 28-pixel image plus 2 of padding; the grid has 2 more at its far edges
MLP = ["model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]"]
FLAVOURS = {
    "mlp": ("idx", []),
    "ema": ("idx", ["ema.enabled=true", "ema.decay=0.5"]),  # a fast EMA, so that it differs from G after 2 steps
    "dcgan": ("idx", ["model.arch=dcgan", "model.dcgan.width=8"]),
    "rgb": ("cifar10", ["model.arch=dcgan", "model.dcgan.width=8", "data.split=train"]),
    "c100": ("cifar100", [*MLP, "data.split=train"]),
    "flat": ("folder", [*MLP, "model.conditioning=none", "data.split=train"]),
}
CLASSES = {"mlp": 10, "ema": 10, "dcgan": 10, "rgb": 10, "c100": 100, "flat": 0}
SIDE = {"idx": 28, "cifar10": 32, "cifar100": 32, "folder": 16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step training run per generator flavour: it leaves checkpoints/step_2.pt and samples/step_2.png."""
    roots = {kind: tmp_path_factory.mktemp(kind) for kind in SIDE}
    write_idx(roots["idx"], 40)
    write_cifar(roots["cifar10"], 40)
    write_cifar(roots["cifar100"], 200, "cifar100")
    write_folder(roots["folder"], None, size=16, modes=("RGB",), formats=("png",), n=40)
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for name, (kind, extra) in FLAVOURS.items():
        run_dir = tmp_path_factory.mktemp(name)
        data = "mnist" if kind == "idx" else kind
        code = train.main([f"run_dir={run_dir}", f"data.name={data}", f"data.root={roots[kind]}", "data.split=test",
                           "data.download=false", f"data.cache_dir={cache}", "log.wandb.mode=disabled",
                           "train.max_steps=2", "train.batch_size=8", "log.progress=false", *extra])
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


def tile(flavour: str) -> int:
    return SIDE[FLAVOURS[flavour][0]] + 2


@pytest.mark.integration
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_grid_at_the_training_seed_is_the_training_grid(runs, flavour, tmp_path, capsys):
    """Rows are classes and the checkpoint round-trips: seed 0 (train.seed) redraws samples/step_2.png."""
    out = tmp_path / "grid.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs[flavour]), "--grid", out, "--seed", 0)[0] == 0
    assert out.read_bytes() == (runs[flavour] / "samples" / "step_2.png").read_bytes()


@pytest.mark.parametrize("flavour", ["mlp", "rgb", "c100", "flat"])
def test_grid_size_follows_n(runs, flavour, tmp_path, capsys):
    """Ten rows in every case: ten digits, ten of CIFAR-100's classes, or ten rows of latents."""
    out = tmp_path / "nested" / "grid.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs[flavour]), "--grid", out, "--n", 3)[0] == 0
    image = Image.open(out)
    assert image.size == (3 * tile(flavour) + 2, GRID_ROWS * tile(flavour) + 2) and image.mode == "RGB"
    if flavour == "rgb":  # colour, not three equal planes
        pixels = np.asarray(image)
        assert not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))


@pytest.mark.parametrize("flavour, rows", [
    ("mlp", "rows 0 - zero, 1 - one, 2 - two, 3 - three, 4 - four, 5 - five, 6 - six, 7 - seven, 8 - eight, 9 - nine"),
    ("c100", "rows " + ", ".join(f"{c} fine_{c:02d}" for c in range(0, 100, 11))),
    ("flat", "rows distinct latents per row"),
])
def test_the_printed_line_names_the_rows(runs, flavour, rows, tmp_path, capsys):
    assert sample.main(["--checkpoint", str(checkpoint(runs[flavour])), "--grid", str(tmp_path / "g.png")]) == 0
    assert f"wrote {tmp_path / 'g.png'}: {rows}\n" in capsys.readouterr().out


def test_grid_classes_are_an_even_pick_of_at_most_ten():
    assert grid_classes(100) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert grid_classes(25) == [0, 3, 5, 8, 11, 13, 16, 19, 21, 24]
    assert grid_classes(10) == list(range(10)) and grid_classes(3) == [0, 1, 2]
    assert grid_classes(1) == grid_classes(0) == []


def test_fixed_noise_rows():
    """Ten classes: the grid every run has drawn so far. None: ten rows of their own latents, label 0."""
    z, labels = fixed_noise(8, 4, 3, torch.device("cpu"), list(range(10)))
    gen = torch.Generator().manual_seed(derive_seed(3, Stream.GRID))
    assert torch.equal(z, torch.randn(4, 8, generator=gen).repeat(10, 1))
    assert torch.equal(labels, torch.arange(10).repeat_interleave(4))
    z, labels = fixed_noise(8, 4, 3, torch.device("cpu"), [0, 11, 99])
    assert labels.tolist() == [0] * 4 + [11] * 4 + [99] * 4 and torch.equal(z[:4], z[8:])
    z, labels = fixed_noise(8, 4, 3, torch.device("cpu"), [])
    assert z.shape == (GRID_ROWS * 4, 8) and len({tuple(row.tolist()) for row in z}) == GRID_ROWS * 4
    assert not labels.any() and labels.shape == (GRID_ROWS * 4,)


@pytest.mark.parametrize("flavour, shape", [("mlp", (28, 28)), ("rgb", (32, 32, 3)), ("c100", (32, 32, 3)),
                                            ("flat", (16, 16, 3))])
def test_npz_arrays(runs, flavour, shape, tmp_path, capsys):
    """Class-major, K × N images, one latent each: [.., H, W] for one channel, [.., H, W, 3] for RGB."""
    out = tmp_path / "samples.data"  # any suffix is kept as given
    assert cli(capsys, "--checkpoint", checkpoint(runs[flavour]), "--npz", out, "--n-per-class", 3)[0] == 0
    with np.load(out) as npz:
        assert sorted(npz.files) == ["images", "labels"]
        images, labels = npz["images"], npz["labels"]
    rows = max(CLASSES[flavour], 1)
    assert images.dtype == np.uint8 and images.shape == (3 * rows, *shape)
    assert labels.dtype == np.int64 and labels.tolist() == [c for c in range(rows) for _ in range(3)]
    assert np.unique(images).size > 10  # a spread of levels, not a constant
    assert len({im.tobytes() for im in images}) == 3 * rows  # one latent per image


def test_uint8_is_the_inverse_of_the_loader_scaling():
    """Same polarity and levels as the data: the loader's x = pixel / 127.5 - 1 maps back exactly."""
    pixels = torch.arange(256, dtype=torch.uint8)
    x = pixels.float().div(127.5).sub(1.0).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
    assert sample.to_uint8(x).shape == (256, 28, 28)
    assert np.array_equal(sample.to_uint8(x)[:, 0, 0], pixels.numpy())
    assert sample.to_uint8(torch.tensor([-1.5, 1.5]).view(2, 1, 1, 1)).ravel().tolist() == [0, 255]
    rgb = torch.stack([torch.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])[None]  # [1, 3, 2, 3]: red, green, blue
    assert sample.to_uint8(rgb).shape == (1, 2, 3, 3) and sample.to_uint8(rgb)[0, 1, 2].tolist() == [0, 128, 255]


@pytest.mark.parametrize("flavour, rows", [("mlp", 2 * 10 + 9 + 2), ("c100", 2 * 10 + 9 + 2), ("flat", 2 * 10 + 1)])
def test_interpolation_size(runs, flavour, rows, tmp_path, capsys):
    """Two latent walks per grid row and a gap; with classes a gap and the label walks between them."""
    out = tmp_path / "walk.png"
    assert cli(capsys, "--checkpoint", checkpoint(runs[flavour]), "--interpolate", out, "--steps", 5)[0] == 0
    assert Image.open(out).size == (5 * tile(flavour) + 2, rows * tile(flavour) + 2)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_walks_end_where_they_should(runs, flavour):
    """Both latent walks join z0 to z1, and label walk k runs from the image of the k-th grid class to the next's."""
    steps = 4
    generator, cfg, info = generator_from_checkpoint(checkpoint(runs[flavour]))
    classes = grid_classes(label_count(cfg.model, info))
    images = sample.walks(generator, cfg.model.z_dim, steps, 0, torch.device("cpu"), classes)
    rows = len(classes) or GRID_ROWS
    walks = len(classes) - 1 if classes else 0
    assert images.shape == ((2 * rows + 1 + (walks + 1 if walks else 0)) * steps, *info.shape)
    blocks = [rows * steps, steps, rows * steps] + ([steps, walks * steps] if walks else [])
    line, gap1, arc, *rest = images.split(blocks)
    assert not gap1.any()
    line, arc = line.view(rows, steps, -1), arc.view(rows, steps, -1)
    torch.testing.assert_close(arc[:, [0, -1]], line[:, [0, -1]], atol=1e-5, rtol=0)
    assert not torch.allclose(arc[:, 1:-1], line[:, 1:-1])
    if not walks:  # every row its own pair of latents
        assert len({row.numpy().tobytes() for row in line[:, 0]}) == rows
        return
    gap2, labels = rest
    assert not gap2.any()
    labels = labels.view(walks, steps, -1)
    torch.testing.assert_close(labels[:, 0], line[:-1, 0])  # z0 and the k-th class
    torch.testing.assert_close(labels[:, -1], line[1:, 0])  # z0 and the next class


def test_embedding_path_matches_labels(runs):
    """Feeding G the table's own rows is the same as feeding it the class ids."""
    generator, cfg, _ = generator_from_checkpoint(checkpoint(runs["dcgan"]))
    z = sample.latents(cfg.model.z_dim, 10, 0, 0)
    from_table = sample.generate_from_embeddings(generator, z, generator.embed.weight)
    torch.testing.assert_close(from_table, generate(generator, z, torch.arange(10)))


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


@pytest.mark.integration
def test_no_ema_uses_the_raw_generator(runs, tmp_path, capsys):
    ema = checkpoint(runs["ema"])
    default, raw = outputs(capsys, ema, tmp_path / "ema"), outputs(capsys, ema, tmp_path / "raw", "--no-ema")
    assert not np.array_equal(default["images"], raw["images"])
    generator, cfg, _ = generator_from_checkpoint(ema, use_ema=False)
    z = sample.latents(cfg.model.z_dim, 3 * 10, 0, Stream.NPZ)
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
        state["run"]["config"]["model"]["z_dim"] = 7
        torch.save(state, path)
    elif case == "non-finite":  # what a diverged run saves
        state = torch.load(checkpoint(run_dir), weights_only=True)
        state["engine"]["generator"]["net.0.weight"][0, 0] = float("nan")
        torch.save(state, path)
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "does not exist"),
    ("not torch", "is not a gan_dist checkpoint: not a torch.save archive"),
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


@pytest.mark.integration
def test_module_entry_point_exit_status(tmp_path):
    """``python -m gan_dist.sample`` itself: status 2 and one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "gan_dist.sample", "--checkpoint", str(tmp_path / "none.pt"),
                           "--grid", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: checkpoint {tmp_path / 'none.pt'} does not exist\n"
