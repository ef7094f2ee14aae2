"""Fault tolerance with real processes: SIGKILL and resume (bit-exact), stop signals, elastic restarts."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_weights,
    base_overrides,
    complete_records,
    exited,
    kill_all,
    run,
    saved_steps,
    torchrun_cmd,
    wait_for_checkpoint,
    workers,
    write_folder,
)

pytestmark = pytest.mark.integration  # starts processes or services

STEPS = 60
STOP_LATENCY_STEPS = 2
"""A stop signal seen at step k is agreed on during step k+1 and acted on by step k+2 (README, "When a job dies")."""


def overrides(run_dir: Path, root: Path, **extra: object) -> list[str]:
    return base_overrides(run_dir, root, **{"train.max_steps": STEPS, "checkpoint.every_steps": 5,
                                            "log.every_steps": 1} | extra)


STREAMED_FOLDER = {"data.name": "folder", "data.split": "train", "data.resolution": 16, "data.resident": "off",
                   "data.workers": 1, "data.flip": True, "model.arch": "dcgan", "model.dcgan.width": 8}
"""An RGB image folder fed by a DataLoader worker from the memory-mapped cache, with flips."""


RESNET = {"model.arch": "resnet", "model.resnet.g_width": 8, "model.resnet.d_width": 8, "model.resnet.z_chunks": True,
          "model.spectral_norm": True, "model.conditioning": "projection", "loss.kind": "hinge", "ema.enabled": True}
"""The residual pair with its options, and an EMA that ramps up: both must resume on the step's own schedule."""


R3GAN = {"model.arch": "r3gan", "model.r3gan.widths": "[16,8]", "model.r3gan.group_size": 8,
         "model.conditioning": "projection", "loss.kind": "rpgan", "loss.r1.gamma": 0.5, "loss.r1.every": 2,
         "loss.r2.gamma": 0.5, "loss.r2.every": 3, "ema.enabled": True, "train.labels": "data",
         "augment.kind": "diffaug", "augment.policy": "[translation]", "schedule.augment_p.start": 0.0,
         "schedule.augment_p.end": 0.6, "schedule.augment_p.shape": "cosine", "schedule.g_lr.shape": "cosine",
         "schedule.g_lr.end": 1e-5, "schedule.d_beta2.shape": "linear", "schedule.d_beta2.end": 0.99,
         "schedule.r1_gamma.shape": "cosine", "schedule.r1_gamma.end": 0.05, "schedule.ema_half_life.start": 0.0,
         "schedule.ema_half_life.end": 0.5, "schedule.ema_half_life.shape": "linear", "schedule.kimg": 1.92}
"""R3GAN's pair, RpGAN with R1 and R2 on their own lazy intervals, fake labels in the data's proportions, and ramps
over 60 steps of 2 × 16 images (set in kimg: the killed run is endless): the kill lands mid-way, and the resumed run
must take the same values from the step."""


SMALL_DATA = {"augment.kind": "ada", "augment.ada_interval": 3, "augment.ada_kimg": 0.5, "augment.ada_p": 0.3,
             "loss.lecam.weight": 0.3, "loss.bcr.weight": 10.0}
"""ADA moving p by 0.1 every 3 steps (from 0.3, so that it draws from the start), LeCam's EMAs, and bCR's draws
after ADA's in the step's stream."""


@pytest.mark.parametrize("source", ["idx_resident", "idx_resident_r1", "idx_resident_resnet", "idx_resident_r3gan",
                                    "folder_streamed", "folder_streamed_ada"])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, idx_root, start, source):
    """R1 (lazy, under the CPU's autocast default) resumes on its own schedule: it is a function of the step.
    ADA's p and LeCam's EMAs come back from the checkpoint."""
    root, data = idx_root, {}
    if source.endswith("r1"):
        data = {"loss.r1.gamma": 1.0, "loss.r1.every": 3, "amp.enabled": True}
    if source.endswith("resnet"):
        data = RESNET
    if source.endswith("r3gan"):
        data = R3GAN
    if source.startswith("folder_streamed"):  # 231 training images: 7 steps per epoch
        root, data = tmp_path / "images", STREAMED_FOLDER | (SMALL_DATA if source.endswith("ada") else {})
        write_folder(root, {"a": 86, "b": 85, "c": 85}, size=16)
    straight = run(torchrun_cmd(2, overrides(tmp_path / "straight", root, **data)))
    assert straight.returncode == 0, straight.stdout[-3000:]
    assert f"; {source.split('_')[1]}" in straight.stdout

    killed = tmp_path / "killed"
    endless = {"train.max_steps": 10**6, "train.epochs": 10**6}  # it cannot finish before the kill lands
    proc = start(torchrun_cmd(2, overrides(killed, root, **data | endless)))
    wait_for_checkpoint(killed, 10, 300, exited(proc))  # 7 or 8 steps per epoch: step 10 is mid-epoch 1
    assert proc.poll() is None
    kill_all(proc)

    resumed = run(torchrun_cmd(2, overrides(killed, root, **data)))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_weights(tmp_path / "straight" / "checkpoints" / f"step_{STEPS}.pt",
                        killed / "checkpoints" / f"step_{STEPS}.pt")
    if source.endswith("ada"):
        a, b = (torch.load(d / "checkpoints" / f"step_{STEPS}.pt", weights_only=True)["engine"]["loss"]
                for d in (tmp_path / "straight", killed))
        assert a["augment"]["p"] == b["augment"]["p"] != SMALL_DATA["augment.ada_p"]
        assert torch.equal(a["augment"]["signs"], b["augment"]["signs"]) and torch.equal(a["lecam"]["ema"],
                                                                                          b["lecam"]["ema"])


def test_stop_signal_saves_within_the_stop_latency_and_exits_75(tmp_path, idx_root, start):
    run_dir = tmp_path / "run"
    proc = start([sys.executable, "-m", "gan_dist.train", *overrides(run_dir, idx_root, **{"train.max_steps": 10**6})])
    wait_for_checkpoint(run_dir, 5, 300, exited(proc))
    proc.send_signal(signal.SIGUSR2)
    signalled_at = max(record["step"] for record in complete_records(run_dir / "metrics.jsonl"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    saved = saved_steps(run_dir)[-1]
    # +1: the step in flight when the signal came may not have written its log line yet.
    assert signalled_at <= saved <= signalled_at + STOP_LATENCY_STEPS + 1
    assert "stopped by signal" in out


def test_stop_signal_on_one_rank_stops_all_ranks_together(tmp_path, idx_root, start):
    run_dir = tmp_path / "run"
    proc = start(torchrun_cmd(2, overrides(run_dir, idx_root, **{"train.max_steps": 10**6})))
    wait_for_checkpoint(run_dir, 5, 300, exited(proc))
    os.kill(workers(proc)[-1], signal.SIGTERM)  # one rank only: the others learn it through the agreement
    out, _ = proc.communicate(timeout=300)
    assert "stopped by signal" in out and "exitcode  : 75" in out, out[-3000:]
    assert len(saved_steps(run_dir)) >= 2


def test_elastic_restart_after_sigkill_of_one_worker(tmp_path, idx_root, start):
    run_dir = tmp_path / "run"
    # A short collective timeout: a restarted group that cannot connect fails fast rather than hangs.
    proc = start(torchrun_cmd(2, overrides(run_dir, idx_root, **{"dist.timeout_s": 30}), "--max-restarts=3"))
    wait_for_checkpoint(run_dir, 10, 300, exited(proc))
    os.kill(workers(proc)[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out  # the group was restarted and picked up the checkpoint
    # The first restart connects: no attempt fails on a peer address left from the killed group.
    assert out.count("failed (exitcode") == 1, out[-3000:]
    assert (run_dir / "checkpoints" / f"step_{STEPS}.pt").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fresh = [r["step"] for r in records if not r.get("replayed")]
    assert fresh == list(range(1, STEPS + 1))  # no gap, no duplicate outside the replay
    # Steps between the checkpoint and the kill ran twice; their second records are marked.
    replayed = [r["step"] for r in records if r.get("replayed")]
    assert replayed == sorted(set(replayed)) and all(10 < s < STEPS for s in replayed)


def test_resume_on_another_world_size_reshards_and_says_so(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    one = run([sys.executable, "-m", "gan_dist.train",
               *base_overrides(run_dir, idx_root, **{"train.max_steps": 4, "checkpoint.every_steps": 4})])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun_cmd(2, base_overrides(run_dir, idx_root, **{"train.max_steps": 6})))
    assert two.returncode == 0, two.stdout[-3000:]
    # 4 steps × 16 samples on 1 rank = 64 seen = 2 steps of 2 × 16 on 2 ranks.
    assert "world size 1 -> 2: data re-sharded, the run is no longer bit-exact" in two.stdout
    assert "at step 4 (epoch 0, batch 2)" in two.stdout
    state = torch.load(run_dir / "checkpoints" / "step_6.pt", weights_only=True)
    assert (state["step"], state["position"]["world_size"], state["position"]["batch"]) == (6, 2, 4)
