"""tools/subset_folder.py: a seeded share of each class's training images, the whole test split,
read back by the real folder source."""

from __future__ import annotations

from conftest import write_folder

from gan_dist.config import DataConfig
from gan_dist.data.sources import FolderSource
from tools.subset_folder import shares, write_subset


def test_shares_keep_each_class_and_sum_to_n():
    assert shares([600, 30, 10], 64) == [60, 3, 1]
    assert shares([5, 5, 1000], 10) == [1, 1, 8]
    assert sum(shares([598, 42, 71, 35], 100)) == 100


def test_a_subset_keeps_the_full_folders_test_split(tmp_path):
    write_folder(tmp_path / "full", {"a": 60, "b": 20}, size=8)
    full_names, full = FolderSource(DataConfig(name="folder", root=str(tmp_path / "full"))).layout()
    assert write_subset(tmp_path / "full", tmp_path / "small", 20) == (20, 8)
    names, small = FolderSource(DataConfig(name="folder", root=str(tmp_path / "small"))).layout()
    assert names == full_names
    assert [len(g) for g in small["train"]] == [15, 5]
    assert [[p.resolve() for p in g] for g in small["test"]] == [[p.resolve() for p in g] for g in full["test"]]
    assert all(p.resolve() in set(full["train"][i]) for i, g in enumerate(small["train"]) for p in g)
