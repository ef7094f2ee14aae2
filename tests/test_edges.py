"""Bad input, round 4: the newer features' edge cases, data that lies, and signals during long phases. Each ends
in one line and exit 2, or is said where it used to pass without a word."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU, base_overrides, run, write_folder
from shapes import RGB32, info

from gan_dist.config import CheckpointConfig, ConfigError, DataError, UsageError
from gan_dist.configio import load_config
from gan_dist.data.cache import Split, cache_path, open_source
from gan_dist.data.classes import class_notes
from gan_dist.evaluate import NpzError, read_npz
from gan_dist.evaluation.diversity import ZSpread
from gan_dist.models.base import build_generator
from gan_dist.sample import check_npz_size
from gan_dist.training.checkpointer import Checkpointer
from gan_dist.training.position import Position

pytestmark = pytest.mark.integration  # starts processes or services


class Part:
    def state_dict(self) -> dict:
        return {"x": 1}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_pruning_leaves_files_the_run_did_not_write_and_names_them_once(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step_1.pt").write_bytes(b"another tool's file")
    checkpointer = Checkpointer(CheckpointConfig(keep_last=2), tmp_path, CPU, {"run": Part(), "engine": Part()})
    for step in (2, 3, 4, 5):
        checkpointer.save(step)
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_1.pt", "step_4.pt", "step_5.pt"]
    assert capsys.readouterr().out.count("left alone, not written by this run: step_1.pt") == 1
    assert json.loads((folder / "saved.json").read_text()) == ["step_4.pt", "step_5.pt"]


def test_a_resume_with_another_batch_size_repositions_by_samples_seen():
    pos = Position(steps_per_epoch=50, n_critic=1, batch_size=2, world_size=1)
    pos.load_state_dict({"step": 6, "epoch": 0, "batch": 6, "world_size": 1, "batch_size": 8})
    assert pos.batch == 24 and pos.resharded == "train.batch_size 8 -> 2"  # 48 samples seen


def test_a_class_folder_linking_back_into_the_data_root_is_refused(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"c000": 4, "c001": 4})
    (root / "c002").symlink_to(".")
    cfg = load_config(None, ["data.name=folder", f"data.root={root}"]).data
    with pytest.raises(DataError, match=r"class folder .*c002 is a link to .*images, which holds the data root"):
        open_source(cfg).files()


def test_a_class_of_identical_images_is_left_out_of_z_spread_and_named(capsys):
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    images[6:] = images[6]  # class 1: six copies of one image
    labels = np.repeat([0, 1], 6)
    described = info(3, 32, 2)
    spread = ZSpread(Split("train", images, labels, described), 2, 100, 0, torch.device("cpu"), 0.2)
    g = build_generator(load_config(None, ["model.arch=dcgan", "model.dcgan.width=8"]).model, described)
    record = spread.record(g, warn_here=True)
    assert spread.classes == [0] and 0 < record["z_spread"] < 100
    assert "z_spread: the real images of 1 are all alike" in capsys.readouterr().err
    spread.record(g, warn_here=True)
    assert capsys.readouterr().err == ""  # said once


def test_a_yaml_key_given_twice_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  batch_size: 8\n  epochs: 2\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"train.batch_size: given twice in .*twice.yaml, on lines 2 and 4"):
        load_config(path)


def test_an_image_rewritten_with_its_old_size_and_mtime_is_a_new_cache_key(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"a": 3, "b": 3}, size=16)
    cfg = load_config(None, ["data.name=folder", f"data.root={root}"]).data
    before = cache_path(cfg, open_source(cfg))
    image = sorted((root / "a").iterdir())[0]
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    time.sleep(0.01)
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p and rsync -a keep it
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert cache_path(cfg, open_source(cfg)) != before


def test_an_unreadable_file_under_content_hashing_is_skipped_and_counted_with_skip_bad(tmp_path, monkeypatch):
    from gan_dist.data import cache

    root = tmp_path / "images"
    write_folder(root, {"a": 3, "b": 3}, size=16)
    bad = sorted((root / "a").iterdir())[0]
    real = cache.file_sha256

    def denied(path: Path) -> str:
        if path == bad:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(cache, "file_sha256", denied)
    strict = load_config(None, ["data.name=folder", f"data.root={root}", "data.verify=content"]).data
    with pytest.raises(DataError, match=f"cannot read {bad}: Permission denied; data.skip_bad=true skips"):
        cache_path(strict, open_source(strict))
    lenient = load_config(None, ["data.name=folder", f"data.root={root}", "data.verify=content",
                                 "data.skip_bad=true"]).data
    assert cache_path(lenient, open_source(lenient)).name.startswith("folder-")


def test_numeric_class_names_and_one_image_classes_are_named_in_the_data_line():
    described = info(3, 32, 3)
    described = type(described)(**(described.to_dict() | {"class_names": ("10", "2", "3"), "sizes": {"train": 5}}))
    split = Split("train", np.zeros((5, 3, 32, 32), np.uint8), np.array([0, 0, 1, 1, 2]), described)
    notes = class_notes(split)
    assert notes[0] == "labels follow the class folders' names sorted as text, not as numbers: 0=10, 1=2, 2=3"
    assert notes[1].startswith("1 class of one image") and notes[1].endswith(": 3")


def test_more_samples_than_memory_is_one_line_naming_what_fits():
    with pytest.raises(UsageError, match=r"--n-per-class: 90,000,000 samples of 3×32×32 need 301.1 GiB in memory, "
                                         r"and 20.0 GiB are free here; ask for at most 664,279 per class"):
        check_npz_size(90_000_000, (3, 32, 32), 128, 9, 20 * 2**30)


def test_a_plain_npy_and_a_cut_short_npz_are_one_line(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 32, 32, 3), np.uint8))
    with pytest.raises(NpzError, match="one array \\(.npy\\), not an .npz of named arrays"):
        read_npz(tmp_path / "x.npy", RGB32, 10)
    np.savez(tmp_path / "y.npz", images=np.zeros((20, 32, 32, 3), np.uint8))
    whole = (tmp_path / "y.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(NpzError, match="cut.npz: cannot read it .*a file cut short"):
        read_npz(tmp_path / "cut.npz", RGB32, 10)


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_imports_taking_a_built_in_name_are_one_line_in_evaluate_and_sample(tmp_path, command):
    (tmp_path / "again.py").write_text("from gan_dist.config import ARCHITECTURES\nARCHITECTURES.register('resnet')"
                                       "(object())\n")
    config = tmp_path / "c.yaml"
    config.write_text("imports: [again]\n")
    args = {"evaluate": ["--npz", tmp_path / "x.npz", "--config", config],
            "sample": ["--checkpoint", tmp_path / "none.pt", "--grid", tmp_path / "g.png"]}[command]
    if command == "sample":  # a checkpoint whose config imports the module
        from gan_dist.checkpoint import FORMAT_VERSION

        torch.save({"format_version": FORMAT_VERSION, "step": 1, "run": {"config": {"imports": ["again"]}, "data": {}},
                    "engine": {}}, tmp_path / "none.pt")
    done = run([sys.executable, "-m", f"gan_dist.{command}", *args], env_extra={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "imports: cannot import 'again' (ValueError: model.arch: 'resnet' is registered twice)" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_checkpoint_whose_imports_cannot_be_imported_names_pythonpath(tmp_path):
    from gan_dist.checkpoint import FORMAT_VERSION, IncompatibleCheckpoint
    from gan_dist.models.loading import generator_from_state

    state = {"format_version": FORMAT_VERSION, "step": 1, "run": {"config": {"imports": ["gone_module"]}, "data": {}},
             "engine": {}}
    with pytest.raises(IncompatibleCheckpoint, match="its config imports: cannot import 'gone_module' .*PYTHONPATH"):
        generator_from_state(state, tmp_path / "x.pt")


def test_attention_at_a_resolution_with_no_such_stage_says_why():
    cfg = load_config(None, ["model.arch=resnet", "model.resnet.attention=4"]).model
    with pytest.raises(ConfigError, match="at 8 px no stage lies between the coarsest and the image's; set 0"):
        build_generator(cfg, info(3, 8, 10))


def test_the_apptainer_image_is_checked_where_it_can_be(tmp_path, capsys):
    from launch.slurm import SlurmConfig

    with pytest.raises(ConfigError, match=f"apptainer_image: {tmp_path}/gan.sif does not exist"):
        SlurmConfig(apptainer_image=str(tmp_path / "gan.sif"))
    SlurmConfig(apptainer_image="/cluster/only/gan.sif")
    assert "apptainer_image /cluster/only/gan.sif is not here; it must exist on the cluster's nodes" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------- runs and their signals

def small_run(tmp_path: Path, root: Path, name: str = "run", **extra: object) -> list[str]:
    return [sys.executable, "-m", "gan_dist.train",
            *base_overrides(tmp_path / name, root, **{"eval.judge_dir": tmp_path / "judges"} | extra)]


def test_an_evaluation_cadence_beyond_the_run_trains_no_judge(tmp_path, idx_root):
    done = run(small_run(tmp_path, idx_root, **{"train.max_steps": 4, "eval.every_steps": 100}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval: eval.every_steps=100 falls on no step from 1 to the last, 4: nothing is scored" in done.stdout
    assert not (tmp_path / "judges").exists()


def test_the_judge_trains_on_a_folder_smaller_than_its_batch(tmp_path):
    root = tmp_path / "images"
    write_folder(root, {"a": 40, "b": 40}, size=16)
    done = run(small_run(tmp_path, root, **{"data.name": "folder", "data.split": "train", "train.max_steps": 2,
                                            "eval.every_steps": 2, "eval.n_samples": 40}), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval        2 |" in done.stdout


class Lines:
    """A process's output, line by line, as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self.seen = proc, queue.Queue(), []
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in self.seen[-1]:
                return
        raise AssertionError(f"{text!r} never came:\n{''.join(self.seen)[-3000:]}")

    def rest(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def sigterm_once(proc: subprocess.Popen, when: str, within: float) -> str:
    """SIGTERM a second after ``when`` is printed; the run must then exit 75 within ``within`` seconds."""
    lines = Lines(proc)
    lines.wait_for(when, 300)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = lines.rest(120)
    assert proc.returncode == 75, out[-3000:]
    assert time.monotonic() - sent < within, out[-3000:]
    return out


def test_sigterm_during_the_judges_training_exits_75_within_seconds(tmp_path, idx_root, start):
    out = sigterm_once(start(small_run(tmp_path, idx_root, **{"train.max_steps": 50, "eval.every_steps": 10})),
                       "judge: none cached", within=15)
    assert "stopped by signal (SIGTERM) in the judge's training, before the first step: nothing new to save" in out


def test_a_stop_during_an_evaluation_skips_it_saves_and_resumes_at_that_step(tmp_path, idx_root, start):
    warm = run(small_run(tmp_path, idx_root, "warm", **{"train.max_steps": 2, "eval.every_steps": 2,
                                                        "eval.n_samples": 40}), timeout=900)
    assert warm.returncode == 0, warm.stderr[-2000:]  # the judge is cached from here on
    long_eval = {"train.max_steps": 6, "eval.every_steps": 3, "eval.n_samples": 400_000, "eval.batch_size": 500,
                 "log.every_steps": 1}
    out = sigterm_once(start(small_run(tmp_path, idx_root, **long_eval)), "step       3", within=20)
    assert "stopped by signal (SIGTERM) in an evaluation at step 3: it is skipped" in out
    assert (tmp_path / "run" / "checkpoints" / "step_3.pt").exists()
    resumed = run(small_run(tmp_path, idx_root, **long_eval | {"train.max_steps": 4, "eval.n_samples": 40}))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout and "at step 3" in resumed.stdout
