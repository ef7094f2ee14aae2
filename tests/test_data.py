"""Data: the real IDX loading path on files the tests write, and the sharding contract."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, write_idx

from gan_dist.config import DataConfig
from gan_dist.data import DataError, ShardedBatches, load_split
from gan_dist.dist import DistEnv
from gan_dist.train import main

CPU = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_loads_with_shapes_and_values(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    images, labels = write_idx(folder, 50, split="train", gz=gz)
    x, y = load_split(DataConfig(name="fashion_mnist", root=str(tmp_path), split="train", download=False), CPU)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels).long())
    expected = torch.from_numpy(images).float() / 127.5 - 1
    assert torch.allclose(x[:, 0], expected) and x.min() >= -1 and x.max() <= 1


def test_missing_files_say_where(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as err:
        load_split(DataConfig(root=str(tmp_path), split="test", download=False), CPU)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def load(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(DataConfig(root=str(root), split="test", download=False), CPU)


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
    assert main(base_overrides(tmp_path / "run", tmp_path / "data")) == 2
    assert capsys.readouterr().err == f"error (rank 0): {path}: 32 of 64 labels are outside 0..9 (values: 99)\n"


def _shards(n: int, world: int, batch: int, epoch: int = 0) -> list[torch.Tensor]:
    data = torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long)
    return [ShardedBatches(*data, batch, r, world, seed=3).indices(epoch) for r in range(world)]


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
    x = torch.arange(40).float().view(40, 1, 1, 1).expand(40, 1, 28, 28).contiguous()
    batches = ShardedBatches(x, torch.arange(40), 4, 0, 1, seed=0)
    full = torch.stack([y for _, y in batches.epoch(2)])
    resumed = torch.stack([y for _, y in batches.epoch(2, start=3)])
    assert torch.equal(resumed, full[3:])
