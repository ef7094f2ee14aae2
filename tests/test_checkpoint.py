"""Checkpoints: weights_only contents, retention, fallback past broken files, refusals with exit 2,
and one resume file for every rank (two real gloo processes)."""

from __future__ import annotations

import json
import math
import pickle
import resource
import signal
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import base_overrides, file_group, run, write_folder

from gan_dist.checkpoint import FORMAT_VERSION, REQUIRED, CheckpointError, load_file
from gan_dist.config import CheckpointConfig
from gan_dist.dist import Agreed, DistEnv, teardown
from gan_dist.train import main
from gan_dist.training import checkpointer as checkpointer_module
from gan_dist.training.checkpointer import Checkpointer
from gan_dist.training.position import Position
from gan_dist.training.trainer import BestScore

ONE_RANK = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def train(run_dir: Path, root: Path, **extra: object) -> int:
    return main(base_overrides(run_dir, root, **extra))


@pytest.fixture
def trained(tmp_path, idx_root) -> Path:
    """A run of 5 steps that saved every step and kept 2."""
    run_dir = tmp_path / "run"
    assert train(run_dir, idx_root, **{"train.max_steps": 5, "checkpoint.every_steps": 1,
                                       "checkpoint.keep_last": 2}) == 0
    return run_dir


@pytest.mark.integration
def test_keep_last_prunes_and_nothing_temporary_is_left(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["saved.json", "step_4.pt", "step_5.pt"]
    assert json.loads((trained / "checkpoints" / "saved.json").read_text()) == ["step_4.pt", "step_5.pt"]


@pytest.mark.integration
def test_contents_load_with_weights_only(trained):
    state = torch.load(trained / "checkpoints" / "step_5.pt", weights_only=True)
    assert state["format_version"] == FORMAT_VERSION and state["step"] == 5
    assert state.keys() == {"format_version", "step", "run", "position", "engine", "best"}  # one entry per part
    assert state["position"] == {"step": 5, "epoch": 0, "batch": 5, "world_size": 1, "batch_size": 16}
    assert {"generator", "discriminator", "opt_g", "opt_d", "scaler", "loss"} == state["engine"].keys()
    assert {"config", "data", "wandb_run_id", "ramp_steps", "rng"} == state["run"].keys()
    assert state["run"]["config"]["train"]["max_steps"] == 5
    assert state["engine"]["opt_d"]["state"]  # Adam moments are there
    assert state["best"] == {"fid": math.inf, "features": "judge"}


@pytest.mark.integration
def test_auto_resume_says_so_and_continues(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"train.max_steps": 7, "checkpoint.every_steps": 1}) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(trained / "checkpoints" / "step_7.pt", weights_only=True)["step"] == 7


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.integration
def test_corrupt_newest_is_moved_aside_with_a_warning(trained, idx_root, capsys):
    truncate(trained / "checkpoints" / "step_5.pt")
    assert train(trained, idx_root, **{"train.max_steps": 6}) == 0
    out, err = capsys.readouterr()
    assert f"resuming from {trained / 'checkpoints' / 'step_4.pt'}" in out
    notice = [line for line in err.splitlines() if "moved it aside" in line]  # one line, no source line after it
    assert len(notice) == 1 and notice[0].startswith(f"warning: checkpoint {trained / 'checkpoints' / 'step_5.pt'} "
                                                     "is unreadable") and "warn(" not in err
    assert (trained / "checkpoints" / "step_5.pt.corrupt").is_file()


@pytest.mark.integration
def test_a_broken_later_checkpoint_never_prunes_fresh_saves(trained, idx_root, capsys):
    """A garbage step_9.pt ahead of the run: moved aside, so the saves of steps 6 and 7 are both kept."""
    (trained / "checkpoints" / "step_9.pt").write_bytes(b"garbage")
    assert train(trained, idx_root, **{"train.max_steps": 7, "checkpoint.every_steps": 1,
                                       "checkpoint.keep_last": 2}) == 0
    assert "step_9.pt is not a gan_dist checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["saved.json", "step_6.pt", "step_7.pt",
                                                                           "step_9.pt.corrupt"]


def fake_state(step: int) -> dict:
    """The smallest dict ``load_file`` accepts, at ``step``, with a position that says it."""
    return dict.fromkeys(REQUIRED, 0) | {"format_version": FORMAT_VERSION, "step": step, "position": {"step": step}}


class Recorder:
    """A component that keeps what it last loaded."""

    def __init__(self) -> None:
        self.state: dict = {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_a_best_fid_of_the_other_feature_space_is_not_kept():
    """Judge and Inception FIDs do not compare: best.pt restarts when eval.features changed."""
    best = BestScore("inception")
    best.load_state_dict({"fid": 3.0, "features": "judge"})
    assert best.fid == math.inf
    best.load_state_dict({"fid": 3.0})  # a checkpoint from before the key: the judge's
    assert best.fid == math.inf
    best.load_state_dict({"fid": 3.0, "features": "inception"})
    assert best.fid == 3.0


def test_a_timed_save_is_asked_for_once_per_interval(tmp_path, monkeypatch):
    """The agreement brings the save one step after the ask: asked again meanwhile, it saved twice in a row."""
    clock = [1000.0]
    monkeypatch.setattr(checkpointer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    checkpointer = Checkpointer(CheckpointConfig(every_minutes=1), tmp_path, ONE_RANK, {"run": Recorder()})
    asked = []
    for _ in range(4):
        clock[0] += 40
        asked.append(checkpointer.time_due())
    assert asked == [False, True, False, True]


def test_the_checkpointer_decides_a_timed_save_from_the_flags_the_ranks_agreed(tmp_path):
    """Rank 0's clock only offers a save; ``due`` takes it from the agreed flags, so every rank saves at one step."""
    checkpointer = Checkpointer(CheckpointConfig(every_steps=10, every_minutes=1), tmp_path, ONE_RANK, {})
    pos = Position(steps_per_epoch=100, n_critic=1, batch_size=8, world_size=1)
    pos.step = 7
    assert not checkpointer.due(pos, Agreed()) and checkpointer.due(pos, Agreed(timed_save=True))
    pos.step = 10
    assert checkpointer.due(pos, Agreed())


def test_pruning_keeps_later_steps_and_counts_only_earlier_ones(tmp_path):
    checkpointer = Checkpointer(CheckpointConfig(keep_last=2), tmp_path, ONE_RANK, {"run": Recorder()})
    for step in (1, 2, 10):
        torch.save(fake_state(step), tmp_path / "checkpoints" / f"step_{step}.pt")
    checkpointer.save(3)
    assert [p.name for p in checkpointer.existing()] == ["step_10.pt", "step_3.pt", "step_2.pt"]


@pytest.mark.integration
def test_no_readable_checkpoint_exits_2_naming_them(trained, idx_root, capsys):
    for name in ("step_4.pt", "step_5.pt"):
        truncate(trained / "checkpoints" / name)
    assert train(trained, idx_root, **{"train.max_steps": 6}) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {trained / 'checkpoints'} is readable (step_5.pt, step_4.pt;" in err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["saved.json", "step_4.pt", "step_5.pt"]
    assert json.loads((trained / "checkpoints" / "saved.json").read_text()) == ["step_4.pt", "step_5.pt"]


@pytest.mark.integration
def test_resume_never_refuses_to_overwrite(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"train.resume": "never"}) == 2
    assert "train.resume=never" in capsys.readouterr().err


@pytest.mark.integration
def test_resume_from_an_explicit_path(trained, idx_root, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other, idx_root, **{"train.max_steps": 6, "train.resume": trained / "checkpoints" / "step_4.pt"}) == 0
    assert "at step 4" in capsys.readouterr().out


@pytest.mark.integration
def test_resume_from_a_plain_pickle_says_it_is_not_a_checkpoint(trained, idx_root, tmp_path, capsys):
    with open(tmp_path / "weights.pkl", "wb") as f:
        pickle.dump({"generator": [0.0]}, f)
    assert train(tmp_path / "other", idx_root, **{"train.resume": tmp_path / "weights.pkl"}) == 2
    err = capsys.readouterr().err
    assert err == f"error (rank 0): {tmp_path / 'weights.pkl'} is not a gan_dist checkpoint: not a torch.save " \
                  "archive (a plain pickle, or another file)\n"


@pytest.mark.integration
def test_resume_from_non_finite_weights_is_refused_at_load(trained, idx_root, tmp_path, capsys):
    state = torch.load(trained / "checkpoints" / "step_5.pt", weights_only=True)
    next(iter(state["engine"]["discriminator"].values())).view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "diverged.pt")
    assert train(tmp_path / "other", idx_root, **{"train.resume": tmp_path / "diverged.pt"}) == 2
    err = capsys.readouterr().err
    assert "discriminator has non-finite values in 1 tensor(s)" in err and "diverged.pt" in err
    assert len(err.splitlines()) == 1 and not list((tmp_path / "other").rglob("*.pt"))


@pytest.mark.integration
def test_other_model_shape_exits_2_saying_what_differs(trained, idx_root, capsys):
    assert train(trained, idx_root, **{"model.mlp.g_hidden": "[128,512,1024]"}) == 2
    err = capsys.readouterr().err
    assert "generator.net.0.weight" in err and "(256, 110)" in err and "(128, 110)" in err


@pytest.mark.integration
def test_unknown_format_version_exits_2(trained, idx_root, capsys):
    path = trained / "checkpoints" / "step_5.pt"
    state = torch.load(path, weights_only=True)
    torch.save(state | {"format_version": 99}, path)
    assert train(trained, idx_root) == 2
    assert "format version 99" in capsys.readouterr().err


def as_flat(path: Path, version: int, data_name: str = "mnist") -> None:
    """Rewrite a checkpoint as format 1 or 2 wrote it: every part at the top level, the architecture's
    options flat in ``model``, ``label_smoothing`` in ``loss``; format 1 without the data description."""
    state = torch.load(path, weights_only=True)
    run, position = state["run"], state["position"]
    config = run["config"]
    config["model"] |= config["model"].pop(config["model"]["arch"])
    config["loss"] |= config["loss"].pop("bce")
    flat = state["engine"] | {k: position[k] for k in ("step", "epoch", "batch", "world_size")} | {
        "config": config, "data": run["data"], "wandb_run_id": run["wandb_run_id"], "best_fid": state["best"]["fid"],
        "format_version": version}
    if version == 1:
        del flat["data"]
        config["data"] = {"name": data_name, "root": "data", "split": "train", "download": True}
    torch.save(flat, path)


@pytest.mark.integration
@pytest.mark.parametrize("version", [1, 2])
def test_a_flat_format_of_the_builds_before_the_first_release_exits_2_naming_it(trained, idx_root, capsys, version):
    as_flat(trained / "checkpoints" / "step_5.pt", version)
    assert train(trained, idx_root, **{"train.resume": trained / "checkpoints" / "step_5.pt"}) == 2
    assert f"format version {version}; this gan_dist reads {FORMAT_VERSION}" in capsys.readouterr().err


@pytest.mark.integration
def test_resuming_on_other_data_exits_2_saying_what_each_is(trained, tmp_path, capsys):
    write_folder(tmp_path / "faces", {"a": 40, "b": 40}, size=28)
    folder = {"data.name": "folder", "data.root": tmp_path / "faces", "data.split": "train",
              "data.cache_dir": tmp_path / "cache"}
    assert main(base_overrides(trained, tmp_path / "faces", **folder)) == 2
    err = capsys.readouterr().err
    assert "trained on mnist, 1×28×28, 10 classes" in err
    assert "this run's data is folder, 3×28×28, 2 classes" in err


@pytest.mark.integration
def test_disk_full_names_the_path_and_keeps_older_checkpoints(trained, idx_root):
    """A file-size limit makes the next save fail mid-write, as a full disk would."""
    before = {p.name: p.read_bytes() for p in (trained / "checkpoints").iterdir()}

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = run([sys.executable, "-m", "gan_dist.train",
                *base_overrides(trained, idx_root, **{"train.max_steps": 8, "checkpoint.every_steps": 1})],
               preexec_fn=limit)
    assert proc.returncode == 2
    assert f"saving checkpoint {trained / 'checkpoints' / 'step_6.pt'} failed (disk full?): " in proc.stderr
    assert "enforce fail" not in proc.stderr and "inline_container" not in proc.stderr  # no torch internals
    after = {p.name: p.read_bytes() for p in (trained / "checkpoints").iterdir()}
    assert after == before  # old files intact, no step_6.pt, no temporary left behind


def test_load_file_rejects_non_checkpoints(tmp_path):
    from gan_dist.checkpoint import CheckpointError

    torch.save({"hello": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_file(tmp_path / "x.pt")


class Opaque:
    """Any class: pickled by reference, so ``weights_only`` refuses to load it."""


def test_refused_pickle_shows_the_whole_reason(tmp_path):
    torch.save(fake_state(1) | {"generator": Opaque()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as refused:
        load_file(tmp_path / "x.pt")
    assert str(refused.value) == (f"checkpoint {tmp_path / 'x.pt'} is unreadable (it holds objects other than "
                                  "tensors and builtins: Unsupported global: GLOBAL test_checkpoint.Opaque was not "
                                  "an allowed global by default)")


def test_a_plain_pickle_is_named_as_not_a_checkpoint_without_torch_warnings(tmp_path):
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump({"generator": [1.0, 2.0]}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as refused:
            load_file(tmp_path / "x.pkl")
    assert str(refused.value) == (f"{tmp_path / 'x.pkl'} is not a gan_dist checkpoint: not a torch.save archive "
                                  "(a plain pickle, or another file)")


# ------------------------------------------------------------------ two ranks, one resume file


def _resume_worker(rank: int, store: Path, run_dir: Path, fault: str) -> None:
    """Resume on two gloo ranks, rank 1 seeing the folder through ``fault``; each writes what it got."""
    env = file_group(rank, 2, store, timeout_s=30)
    position = Recorder()
    checkpointer = Checkpointer(CheckpointConfig(), run_dir, env, {"position": position})
    folder = run_dir / "checkpoints"
    if rank == 1 and fault == "stale listing":  # a directory cache from before step_4.pt was written
        checkpointer.existing = lambda: [folder / "step_2.pt"]
    if rank == 1 and fault == "stale file":  # step_4.pt's name, with the bytes of an older save
        read = checkpointer_module.load_file  # the checkpointer's reader, as it looks it up
        checkpointer_module.load_file = lambda path, device="cpu": read(path.with_name("step_2.pt"), device)
    try:
        checkpointer.restore("auto")
        got: int | str = position.state["step"]
    except CheckpointError as e:
        got = str(e)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(got))
    env.barrier()  # neither rank leaves the group while the other is still in the agreement's collective
    teardown(env)


def resume_on_two_ranks(tmp_path: Path, fault: str) -> list[int | str]:
    """What each rank resumed from (its step), or the message it raised."""
    for step in (2, 4):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        torch.save(fake_state(step), tmp_path / "checkpoints" / f"step_{step}.pt")
    mp.spawn(_resume_worker, args=(tmp_path / "store", tmp_path, fault), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.integration
def test_ranks_resume_from_rank_0s_choice_whatever_they_list(tmp_path):
    assert resume_on_two_ranks(tmp_path, "stale listing") == [4, 4]


@pytest.mark.integration
def test_ranks_that_read_other_steps_refuse_together(tmp_path):
    path = tmp_path / "checkpoints" / "step_4.pt"
    assert resume_on_two_ranks(tmp_path, "stale file") == [
        f"another rank could not resume from {path} at step 4; see its error",
        f"rank 1 read step 2 from {path}, rank 0 read step 4; all ranks must see the same run_dir "
        "(a shared file system with stale caches?)",
    ]
