"""Data: every source read through its real path on files the tests write, the cache, and the feeders."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU, REPO, base_overrides, file_group, write_cifar, write_folder, write_idx
from PIL import Image
from torchvision.datasets import FashionMNIST

from gan_dist.config import DataConfig, DataError
from gan_dist.data.batches import ResidentBatches, ShardedBatches, StreamedBatches, loader_workers, make_batches
from gan_dist.data.cache import Split, has_split, load_split
from gan_dist.data.pixels import to_pixels, to_unit
from gan_dist.train import main

REAL_MNIST = Path("/work/shared/data/mnist")
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def config(root: Path, cache: Path, **kw) -> DataConfig:
    """An offline config reading ``root``, caching under ``cache``."""
    return DataConfig(root=str(root), cache_dir=str(cache), download=False, **kw)


# ---- IDX -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_loads_with_shapes_and_values(tmp_path, cache, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    images, labels = write_idx(folder, 50, split="train", gz=gz)
    split = load_split(config(tmp_path, cache, name="fashion_mnist", split="train"), CPU)
    assert split.images.shape == (50, 1, 28, 28) and split.images.dtype == np.uint8
    assert isinstance(split.images, np.memmap)
    assert split.labels.shape == (50,) and split.labels.dtype == np.int64
    assert np.array_equal(split.labels, labels) and np.array_equal(split.images[:, 0], images)
    assert split.info.shape == (1, 28, 28) and split.info.sizes == {"train": 50}
    assert split.info.class_names == tuple(FashionMNIST.classes) and split.info.num_classes == 10
    x, y = split.tensors("cpu")
    assert torch.equal(to_unit(x)[:, 0], torch.from_numpy(images).float().div(127.5).sub(1.0))
    assert y.dtype == torch.int64 and len(split) == 50


def test_to_pixels_inverts_to_unit_on_every_value():
    pixels = torch.arange(256, dtype=torch.uint8)
    unit = to_unit(pixels)
    assert unit.dtype == torch.float32 and unit.min() == -1 and unit.max() == 1
    assert torch.equal(to_pixels(unit), pixels)
    assert torch.equal(to_pixels(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_idx_counts_its_classes_and_converts_on_request(tmp_path, cache):
    write_idx(tmp_path, 30, split="train")
    write_idx(tmp_path, 20, split="test")
    path = tmp_path / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[8:] = bytes(v % 4 for v in blob[8:])  # test labels 0..3; train still has 0..9
    path.write_bytes(bytes(blob))
    split = load_split(config(tmp_path, cache, name="idx", split="test", resolution=16, channels=3), CPU)
    assert split.images.shape == (20, 3, 16, 16)
    assert split.info.num_classes == 10 and split.info.class_names == tuple(str(c) for c in range(10))
    assert split.info.sizes == {"train": 30, "test": 20}
    assert (split.images[:, 0] == split.images[:, 2]).all()  # grey stays grey in RGB


def test_missing_files_say_where(tmp_path, cache):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as err:
        load_split(config(tmp_path, cache, split="test"), CPU)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def test_has_split_looks_at_the_disk_only(tmp_path, cache):
    write_idx(tmp_path / "MNIST" / "raw", 20, split="test")
    cfg = config(tmp_path, cache)
    assert has_split(cfg, "test") and not has_split(cfg, "train")
    with pytest.raises(DataError, match="mnist train split not found"):
        load_split(cfg, CPU, "train")
    assert load_split(cfg, CPU, "test").info.sizes == {"test": 20}


def load(root: Path) -> Split:
    return load_split(config(root, root / "cache", split="test"), CPU)


def test_truncated_file_says_what_its_header_promised(tmp_path):
    write_idx(tmp_path, 20)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert str(err.value) == (f"{path} is cut short or padded: its header says images of shape [20, 28, 28], "
                              "15696 bytes, the file has 1000")


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic_number_says_which_and_what_was_expected(tmp_path, gz):
    write_idx(tmp_path, 20)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
    if gz:
        path.with_name(f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        path = path.with_name(f"{path.name}.gz")
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert str(err.value) == f"{path} is not an IDX images file: magic number 0x12345678, expected 0x00000803"


def test_images_given_as_labels_are_named_as_such(tmp_path):
    write_idx(tmp_path, 20)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert str(err.value) == (f"{labels} is not an IDX labels file: magic number 0x00000803 "
                              "(that of an IDX images file), expected 0x00000801")


def spoil_labels(root: Path, values: dict[int, int]) -> Path:
    """Set the labels at the given positions (8 header bytes, then one byte per label)."""
    path = root / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    for index, value in values.items():
        blob[8 + index] = value
    path.write_bytes(bytes(blob))
    return path


def test_out_of_range_labels_name_the_file_the_values_and_their_count(tmp_path):
    write_idx(tmp_path, 100)
    path = spoil_labels(tmp_path, {3: 200, 50: 10})
    with pytest.raises(DataError) as err:
        load(tmp_path)
    assert str(err.value) == f"{path}: 2 of 100 labels are outside 0..9 (values: 10, 200)"


def test_out_of_range_labels_stop_training_with_exit_2(tmp_path, capsys):
    write_idx(tmp_path / "data", 64)
    path = spoil_labels(tmp_path / "data", dict.fromkeys(range(0, 64, 2), 99))
    overrides = base_overrides(tmp_path / "run", tmp_path / "data", **{"data.cache_dir": tmp_path / "cache"})
    assert main(overrides) == 2
    assert capsys.readouterr().err == f"error (rank 0): {path}: 32 of 64 labels are outside 0..9 (values: 99)\n"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_idx_labels_with_a_gap_are_refused_naming_the_values(tmp_path, cache):
    write_idx(tmp_path, 30)
    spoil_labels(tmp_path, {i: i % 3 for i in range(30)} | {7: 200})
    with pytest.raises(DataError) as err:
        load_split(config(tmp_path, cache, name="idx", split="test"), CPU)
    assert str(err.value) == (f"{tmp_path}: labels must be the class ids 0..K-1 with every class present; they take "
                              "4 values (0, 1, 2, 200), so 197 of the classes 0..200 would be empty")


# ---- CIFAR -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_read_through_torchvision(tmp_path, cache, kind):
    written = write_cifar(tmp_path, 40, kind)
    for split in ("train", "test"):
        got = load_split(config(tmp_path, cache, name=kind), CPU, split)
        images, labels = written[split]
        assert got.images.shape == (len(labels), 3, 32, 32)
        assert np.array_equal(got.images, images.transpose(0, 3, 1, 2)) and np.array_equal(got.labels, labels)
    classes = 10 if kind == "cifar10" else 100
    assert got.info.num_classes == classes and len(got.info.class_names) == classes
    assert got.info.class_names[1] == ("class_1" if kind == "cifar10" else "fine_01")
    assert got.info.sizes == {"train": 40, "test": 20}
    assert len(list(cache.iterdir())) == 1  # one cache holds both splits


def test_cifar_converts_to_grey_and_another_resolution(tmp_path, cache):
    write_cifar(tmp_path, 10)
    got = load_split(config(tmp_path, cache, name="cifar10", channels=1, resolution=16), CPU, "test")
    assert got.images.shape == (5, 1, 16, 16) and got.info.shape == (1, 16, 16)


def test_cifar_missing_says_what_to_put_where(tmp_path, cache):
    with pytest.raises(DataError) as err:
        load_split(config(tmp_path, cache, name="cifar10"), CPU)
    assert str(err.value) == (f"cifar10 train split not found: put data_batch_1, data_batch_2, data_batch_3, "
                              f"data_batch_4, data_batch_5, batches.meta in {tmp_path / 'cifar-10-batches-py'} "
                              "(or set data.download=true)")


def test_cifar_damaged_batch_names_the_folder(tmp_path, cache):
    write_cifar(tmp_path, 10, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=f"cannot read the test batches in {tmp_path / 'cifar-100-python'}"):
        load_split(config(tmp_path, cache, name="cifar100", split="test"), CPU)


# ---- image folders ---------------------------------------------------------------------------------

def test_folder_of_mixed_sizes_modes_and_formats(tmp_path, cache, capsys):
    root = tmp_path / "images"
    write_folder(root, {"cat": 8, "dog": 8, "eel": 8}, formats=("png", "jpg", "bmp", "webp"))
    got = load_split(config(root, cache, name="folder", resolution=12), CPU)
    assert got.images.shape == (len(got), 3, 12, 12)  # a colour image makes the whole set RGB
    assert got.info.class_names == ("cat", "dog", "eel") and got.info.num_classes == 3
    assert got.info.sizes == {"train": 21, "test": 3} and sorted(np.bincount(got.labels)) == [7, 7, 7]
    assert "data: built cache" in capsys.readouterr().out
    grey = load_split(config(root, cache, name="folder", resolution=8, channels=1), CPU, "test")
    assert grey.images.shape == (3, 1, 8, 8) and grey.labels.tolist() == [0, 1, 2]


def test_folder_conversion_pixels(tmp_path, cache):
    """Native size: the pixels themselves; transparency on black; a wide image's centre square."""
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(root / "a" / "grey.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(root / "a" / "clear.png")
    wide = np.zeros((8, 24), dtype=np.uint8)
    wide[:, 8:16] = 255
    Image.fromarray(wide).save(root / "a" / "wide.png")
    got = load_split(config(root, cache, name="folder", resolution=8, holdout=0.01), CPU)
    by_name = dict(zip(["clear", "grey", "wide"], got.images, strict=True))  # sorted file order
    assert (by_name["clear"] == 0).all()
    assert np.array_equal(by_name["grey"][0], grey) and (by_name["grey"][1:] == by_name["grey"][0]).all()
    assert (by_name["wide"] == 255).all()


def test_folder_native_size_and_grey_channels(tmp_path, cache):
    write_folder(tmp_path / "images", {"a": 4, "b": 4}, size=10, modes=("L",))
    got = load_split(config(tmp_path / "images", cache, name="folder", holdout=0.25), CPU)
    assert got.info.shape == (1, 10, 10) and got.info.sizes == {"train": 6, "test": 2}


def test_folder_mixed_sizes_need_a_resolution(tmp_path, cache):
    root = tmp_path / "images"
    write_folder(root, {"a": 4})
    with pytest.raises(DataError, match=r"come in 4 sizes \(12×18, 16×16, 20×14, 24×24\): set data.resolution"):
        load_split(config(root, cache, name="folder"), CPU)


def test_folder_with_train_and_test_subfolders(tmp_path, cache):
    write_folder(tmp_path / "train", {"x": 5, "y": 3}, size=8)
    write_folder(tmp_path / "test", {"x": 2, "y": 1}, size=8)
    cfg = config(tmp_path, cache, name="folder")
    assert load_split(cfg, CPU).info.sizes == {"train": 8, "test": 3}
    assert load_split(cfg, CPU, "test").labels.tolist() == [0, 0, 1]


def test_folder_holdout_is_seeded_and_per_class(tmp_path):
    write_folder(tmp_path / "images", {"a": 20, "b": 20, "c": 10}, size=8)
    cfg = config(tmp_path / "images", tmp_path / "one", name="folder", holdout=0.2)
    first = load_split(cfg, CPU, "test")
    again = load_split(dataclasses.replace(cfg, cache_dir=str(tmp_path / "two")), CPU, "test")
    assert first.info.sizes == {"train": 40, "test": 10} and np.bincount(first.labels).tolist() == [4, 4, 2]
    assert np.array_equal(first.images, again.images)


def test_flat_folder_is_unconditional(tmp_path, cache):
    write_folder(tmp_path / "images", None, size=8, n=10)
    got = load_split(config(tmp_path / "images", cache, name="folder"), CPU)
    assert got.info.num_classes == 0 and not got.info.conditional and got.info.class_names == ()
    assert (got.labels == 0).all() and got.info.sizes == {"train": 9, "test": 1}


@pytest.mark.parametrize("classes", [1, 12])
def test_one_and_many_class_folders(tmp_path, cache, classes):
    write_folder(tmp_path / "images", {f"c{i:02d}": 3 for i in range(classes)}, size=8)
    got = load_split(config(tmp_path / "images", cache, name="folder", holdout=0.34), CPU)
    assert got.info.num_classes == classes and got.info.class_names[-1] == f"c{classes - 1:02d}"
    assert np.bincount(got.labels).tolist() == [2] * classes


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path, cache):
    ramp = (np.arange(8 * 8).reshape(8, 8) * 1000).astype(np.uint16)  # 0..63000 of 65535
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "images" / "a" / "0.png")
    with Image.open(tmp_path / "images" / "a" / "0.png") as img:
        assert img.mode == "I;16"
    got = load_split(config(tmp_path / "images", cache, name="folder", split="train", holdout=0.5), CPU)
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(got.images[0, 0], expected) and got.images.max() == 245


# ---- the cache -------------------------------------------------------------------------------------

def test_cache_layout_reuse_and_invalidation(tmp_path, cache, capsys):
    root = tmp_path / "images"
    files = write_folder(root, {"a": 4, "b": 4}, size=8)
    cfg = config(root, cache, name="folder", holdout=0.25)
    load_split(cfg, CPU)
    (built,) = cache.iterdir()
    assert sorted(p.name for p in built.iterdir()) == ["info.json", "test_images.npy", "test_labels.npy",
                                                      "train_images.npy", "train_labels.npy"]
    meta = json.loads((built / "info.json").read_text())
    assert meta["sizes"] == {"train": 6, "test": 2} and meta["skipped"] == [] and meta["channels"] == 3
    assert capsys.readouterr().out.count("built cache") == 1
    stamp = (built / "train_images.npy").stat().st_mtime_ns
    load_split(cfg, CPU, "test")
    assert "built" not in capsys.readouterr().out and (built / "train_images.npy").stat().st_mtime_ns == stamp
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    load_split(cfg, CPU)
    files[1].write_bytes(files[2].read_bytes())  # modified
    load_split(cfg, CPU)
    write_folder(root, {"b": 5}, size=8)  # one added
    load_split(cfg, CPU)
    files[3].unlink()  # one removed
    load_split(cfg, CPU)
    load_split(dataclasses.replace(cfg, resolution=4), CPU)  # another conversion
    assert len(list(cache.iterdir())) == 6


def test_both_checks_see_a_rewrite_that_keeps_size_and_mtime(tmp_path, cache):
    """cp -p and rsync -a keep the size and mtime: data.verify=names notices by the inode change time, which no
    rewrite keeps, and data.verify=content by the bytes."""
    root = tmp_path / "images"
    files = write_folder(root, {"a": 4, "b": 4}, size=8, modes=("RGB",), formats=("bmp",))  # one size in bytes
    by_names, by_content = (config(root, cache, name="folder", holdout=0.25, verify=v) for v in ("names", "content"))
    first = load_split(by_names, CPU), load_split(by_content, CPU)
    st = files[0].stat()
    files[0].write_bytes(files[4].read_bytes())  # class b's image, the same size in bytes
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files[0].stat().st_size == st.st_size
    again = load_split(by_names, CPU), load_split(by_content, CPU)
    assert not np.array_equal(again[0].images, first[0].images)
    assert not np.array_equal(again[1].images, first[1].images)
    assert np.array_equal(again[0].images, again[1].images)
    assert len(list(cache.iterdir())) == 4


def test_failed_build_leaves_no_cache(tmp_path, cache, monkeypatch):
    write_folder(tmp_path / "images", {"a": 3}, size=8)
    cfg = config(tmp_path / "images", cache, name="folder")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(DataError, match="cannot write the data cache .*No space left on device"):
        load_split(cfg, CPU)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert len(load_split(cfg, CPU)) == 3


def test_a_cache_built_meanwhile_by_another_node_is_kept(tmp_path, cache):
    from gan_dist.data.cache import build_cache, cache_path, open_source

    write_folder(tmp_path / "images", {"a": 3}, size=8)
    cfg = config(tmp_path / "images", cache, name="folder")
    source = open_source(cfg)
    path = cache_path(cfg, source)
    build_cache(cfg, source, path)
    stamp = (path / "info.json").stat().st_mtime_ns
    build_cache(cfg, source, path)  # the second builder of the same key
    assert (path / "info.json").stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1


def _two_ranks(rank: int, root: Path, out: Path) -> None:
    """One rank of a gloo group (local rank = rank: only rank 0 builds): a good folder, then a bad one."""
    torch.set_num_threads(1)
    env = file_group(rank, 2, out / "store")
    got = load_split(config(root / "good", out / "cache", name="folder", resolution=8), env)
    results = {"sizes": got.info.sizes, "images": got.images.tolist(), "built": len(list((out / "cache").iterdir()))}
    try:
        load_split(config(root / "bad", out / "cache", name="folder"), env)
    except DataError as e:
        results["error"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_ranks_wait_for_local_rank_0_and_fail_together(tmp_path, capfd):
    write_folder(tmp_path / "good", {"a": 4, "b": 4})
    (tmp_path / "bad").mkdir()
    torch.multiprocessing.spawn(_two_ranks, args=(tmp_path, tmp_path), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["images"] == ranks[1]["images"] and ranks[1]["built"] == 1
    assert ranks[0]["error"].startswith(f"{tmp_path / 'bad'} has no images")
    assert ranks[1]["error"] == "preparing folder failed on another rank"
    assert capfd.readouterr().out.count("data: built cache") == 1


# ---- bad folders -----------------------------------------------------------------------------------

def test_empty_folder(tmp_path, cache):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'images'} has no images: expected <class>/<image>"):
        load_split(config(tmp_path / "images", cache, name="folder"), CPU)


def test_class_folder_without_images_is_named(tmp_path, cache):
    write_folder(tmp_path / "images", {"a": 2}, size=8)
    (tmp_path / "images" / "b").mkdir()
    (tmp_path / "images" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'images' / 'b'} has no images"):
        load_split(config(tmp_path / "images", cache, name="folder"), CPU)


def test_loose_images_beside_class_folders(tmp_path, cache):
    write_folder(tmp_path / "images", {"a": 2}, size=8)
    Image.new("L", (8, 8)).save(tmp_path / "images" / "stray.png")
    with pytest.raises(DataError, match=r"holds both images \(stray.png\) and class folders \(a\)"):
        load_split(config(tmp_path / "images", cache, name="folder"), CPU)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, cache, capsys, damage):
    root = tmp_path / "images"
    files = write_folder(root, {"a": 4, "b": 4}, size=16, modes=("RGB",), formats=("png", "jpg"))
    bad = files[5]
    bad.write_bytes(b"not an image" if damage == "garbage" else bad.read_bytes()[:200])
    cfg = config(root, cache, name="folder", resolution=8, holdout=0.25)
    with pytest.raises(DataError, match=f"{bad}: cannot read the image .*set data.skip_bad=true"):
        load_split(cfg, CPU)
    got = load_split(dataclasses.replace(cfg, skip_bad=True), CPU)
    assert sum(got.info.sizes.values()) == 7
    assert "data: skipped 1 unreadable images (b/1.jpg: " in capsys.readouterr().out
    (built,) = cache.iterdir()
    assert [s.split(":")[0] for s in json.loads((built / "info.json").read_text())["skipped"]] == ["b/1.jpg"]


def test_unreadable_image_found_by_the_size_probe(tmp_path, cache):
    root = tmp_path / "images"
    write_folder(root, {"a": 3}, size=8)
    (root / "a" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=f"{root / 'a' / 'x.png'}: cannot read the image"):
        load_split(config(root, cache, name="folder"), CPU)
    assert load_split(config(root, cache, name="folder", skip_bad=True), CPU).info.sizes == {"train": 3, "test": 0}


def test_empty_split_is_an_error_on_load(tmp_path, cache):
    write_folder(tmp_path / "images", {"a": 3}, size=8)
    with pytest.raises(DataError, match="the test split of folder .* is empty"):
        load_split(config(tmp_path / "images", cache, name="folder"), CPU, "test")


def test_train_without_test_and_mismatched_classes(tmp_path, cache):
    write_folder(tmp_path / "train", {"a": 2, "b": 2}, size=8)
    with pytest.raises(DataError, match=f"{tmp_path} has train/ but no test/"):
        load_split(config(tmp_path, cache, name="folder"), CPU)
    write_folder(tmp_path / "test", {"a": 1, "c": 1}, size=8)
    with pytest.raises(DataError, match=r"different class folders \(only in train: b; only in test: c\)"):
        load_split(config(tmp_path, cache, name="folder"), CPU)


# ---- the feeders -----------------------------------------------------------------------------------

@pytest.fixture
def digits(tmp_path: Path, cache: Path) -> Split:
    """44 IDX images (not a multiple of the batches: the last partial one is dropped) as a cached split."""
    write_idx(tmp_path, 44)
    return load_split(config(tmp_path, cache, split="test"), CPU)


def _shards(n: int, world: int, batch: int, epoch: int = 0) -> list[torch.Tensor]:
    return [ShardedBatches(n, batch, r, world, seed=3).indices(epoch) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_disjoint_equal_and_covering(world):
    n, batch = 103, 4
    shards = _shards(n, world, batch)
    assert len({s.shape for s in shards}) == 1  # equal step counts on every rank
    flat = torch.cat([s.flatten() for s in shards])
    # DistributedSampler pads by repeating the first indices; only padding may repeat.
    per_rank = -(-n // world)
    padding = per_rank * world - n
    assert len(flat) - len(set(flat.tolist())) <= padding
    dropped = world * (per_rank % batch)  # the partial last batch of each rank
    assert len(set(flat.tolist())) >= n - dropped
    # Disjoint apart from padding:
    sets = [set(s.flatten().tolist()) for s in shards]
    overlap = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert overlap <= padding


def test_shards_match_distributed_sampler_and_set_epoch_reshuffles():
    from torch.utils.data import DistributedSampler

    shards = _shards(64, 2, 8, epoch=0)
    sampler = DistributedSampler(range(64), num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.set_epoch(0)
    assert shards[1].flatten().tolist() == list(sampler)
    assert not torch.equal(shards[0], _shards(64, 2, 8, epoch=1)[0])


def test_resume_position_skips_batches():
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 28, 28).contiguous()
    batches = ResidentBatches(x, torch.arange(40), 4, 0, 1, seed=0)
    full = torch.stack([y for _, y in batches.epoch(2)])
    resumed = torch.stack([y for _, y in batches.epoch(2, start=3)])
    assert torch.equal(resumed, full[3:])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_resident_and_streamed_batches_are_identical(digits, workers, flip):
    cfg = DataConfig(flip=flip, workers=workers, prefetch=2)
    resident = make_batches(digits, dataclasses.replace(cfg, resident="on"), CPU, 8, seed=5)
    streamed = make_batches(digits, dataclasses.replace(cfg, resident="off"), CPU, 8, seed=5)
    assert (resident.mode, streamed.mode) == ("resident", "streamed") and len(resident) == len(streamed) == 5
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        a, b = list(resident.epoch(epoch, start)), list(streamed.epoch(epoch, start))
        assert len(a) == len(b) == 5 - start
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.dtype == xb.dtype == torch.float32 and xa.shape == (8, 1, 28, 28)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = make_batches(digits, DataConfig(resident="on"), CPU, 8, seed=5)
    mirrored = [not torch.equal(x, p) for (x, _), (p, _) in zip(resident.epoch(0), plain.epoch(0), strict=True)]
    assert any(mirrored) == flip


def test_flips_follow_the_sample_not_the_rank(digits):
    """2 ranks × B see the same (flipped) images as 1 rank × 2B: the same samples, flipped alike."""
    images, labels = digits.tensors("cpu")

    def seen(world: int, batch: int) -> list[dict[int, torch.Tensor]]:
        steps = []
        for rank in range(world):
            feed = ResidentBatches(images, labels, batch, rank, world, seed=1, flip=True)
            for step, ((x, _), idx) in enumerate(zip(feed.epoch(3), feed.indices(3), strict=True)):
                if rank == 0:
                    steps.append({})
                steps[step].update(zip(idx.tolist(), x, strict=True))
        return steps

    two, one = seen(2, 4), seen(1, 8)
    assert [sorted(s) for s in two] == [sorted(s) for s in one]
    assert all(torch.equal(a[i], b[i]) for a, b in zip(two, one, strict=True) for i in a)
    flipped = [not torch.equal(x, to_unit(images[i])) for s in one for i, x in s.items()]
    assert 0 < sum(flipped) < len(flipped)


def test_auto_keeps_what_fits_resident(digits):
    assert make_batches(digits, DataConfig(), CPU, 8, 0).mode == "resident"
    assert make_batches(digits, DataConfig(resident_max_gb=0.0), CPU, 8, 0).mode == "streamed"


def test_unset_workers_suit_the_device(digits):
    assert loader_workers(DataConfig(), torch.device("cpu")) == 0  # the workers would share the training cores
    assert loader_workers(DataConfig(), torch.device("cuda", 0)) == 2
    assert loader_workers(DataConfig(workers=3), torch.device("cpu")) == 3
    streamed = make_batches(digits, DataConfig(resident="off"), CPU, 8, 0)
    assert streamed.workers == 0 and str(streamed) == "streamed in the training process"


def test_abandoned_streamed_epoch_stops_its_workers(digits):
    feed = StreamedBatches(digits, 8, 0, 1, seed=0, workers=2, prefetch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = feed.epoch(0)
        next(batches)
        assert len(multiprocessing.active_children()) == 2
        del batches
        assert multiprocessing.active_children() == []
        assert len(list(feed.epoch(1))) == len(feed)  # the next epoch starts new workers
        assert len(multiprocessing.active_children()) == 2  # a finished epoch keeps them for the next
    feed.close()
    assert multiprocessing.active_children() == []


@pytest.mark.integration
def test_streamed_workers_let_the_process_exit_cleanly(digits):
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from gan_dist.data.cache import Split
        from gan_dist.data.batches import StreamedBatches
        images = np.load({str(digits.images.filename)!r}, mmap_mode="r")
        split = Split("test", images, np.zeros(len(images), dtype=np.int64), None)
        feed = StreamedBatches(split, 8, 0, 1, seed=0, workers=2, prefetch=2)
        epoch = feed.epoch(0)
        first = [next(epoch) for _ in range(len(feed))]  # every batch taken, the iterator left open
        midway = feed.epoch(1)
        next(midway)  # abandoned with batches in flight when the process ends
        print("done")
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (out.returncode, out.stdout, out.stderr) == (0, "done\n", ""), out.stderr


# ---- real data and the colour script ---------------------------------------------------------------

@pytest.mark.skipif(not (REAL_MNIST / "MNIST" / "raw").is_dir(), reason="no MNIST on this machine")
def test_real_mnist_test_split(cache):
    got = load_split(config(REAL_MNIST, cache, split="test"), CPU)
    assert got.images.shape == (10000, 1, 28, 28) and np.bincount(got.labels).min() > 800


def _colour_script():
    spec = importlib.util.spec_from_file_location("colour_fashion", REPO / "tools" / "colour_fashion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_colour_fashion_writes_a_colour_folder(tmp_path, cache, capsys):
    write_idx(tmp_path / "fashion", 30, split="train")
    write_idx(tmp_path / "fashion", 10, split="test")
    out = tmp_path / "colour"
    assert _colour_script().main(["--root", str(tmp_path / "fashion"), "--out", str(out), "--n-train", "25"]) == 0
    assert "wrote 25 train and 10 test images" in capsys.readouterr().out
    got = load_split(config(out, cache, name="folder"), CPU)
    assert got.info.shape == (3, 32, 32) and got.info.sizes == {"train": 25, "test": 10}
    assert "T-shirt-top" in got.info.class_names and got.info.num_classes == 10
    assert (got.images[:, :, :2] == 0).all()  # the padding stays black
    saturation = got.images.max(axis=1).astype(int) - got.images.min(axis=1)
    assert saturation.max() > 100  # coloured, not grey


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="no Fashion-MNIST on this machine")
def test_colour_fashion_on_the_real_data(tmp_path, capsys):
    args = ["--root", str(REAL_FASHION), "--out", str(tmp_path), "--n-train", "20", "--n-test", "10", "--seed", "1"]
    assert _colour_script().main(args) == 0
    assert len(list(tmp_path.glob("train/*/*.png"))) == 20 and len(list(tmp_path.glob("test/*/*.png"))) == 10
