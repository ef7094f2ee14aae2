"""The loop's own faults, with real processes: divergence, timed saves under skewed clocks, Ctrl-C,
signals during start-up, and the start-up mistakes that must end in one line and exit 2."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, base_overrides, run, saved_steps, torchrun_cmd

from gan_dist.checkpoint import atomic_save

pytestmark = pytest.mark.integration  # starts processes or services

TRAIN = [sys.executable, "-m", "gan_dist.train"]


def start(cmd: list[str]) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
    """Lines of ``proc``'s output up to and including the first that starts with ``prefix``."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the run ended before printing {prefix!r}:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize(("log_every", "found"), [
    (1, "non-finite g_loss from step 1 (found at the log step 1)"),  # G's step meets the overflowing D
    (5, "non-finite weights at step 2"),  # the weights, at a save before any log step
])
def test_divergence_stops_with_exit_3_and_saves_nothing_non_finite(tmp_path, idx_root, log_every, found):
    run_dir = tmp_path / "run"
    # Adam's first update moves every weight by about 1e30: still finite, but the forwards after it overflow.
    extra = {"optim.g_lr": 1e30, "optim.d_lr": 1e30, "log.every_steps": log_every, "checkpoint.every_steps": 2,
             "train.max_steps": 50}
    result = run([*TRAIN, *base_overrides(run_dir, idx_root, **extra)])
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"training diverged: {found}" in result.stdout and "exit 3" in result.stdout
    assert "done" not in result.stdout and saved_steps(run_dir) == []


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    extra = {"log.every_steps": 1, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1}
    good = run([*TRAIN, *base_overrides(run_dir, idx_root, **extra, **{"train.max_steps": 2})])
    assert good.returncode == 0, good.stderr[-3000:]
    # Resumed with a learning rate that diverges at once: the config's rate applies to the restored Adam.
    diverging = {"optim.g_lr": 1e30, "optim.d_lr": 1e30, "train.max_steps": 50}
    result = run([*TRAIN, *base_overrides(run_dir, idx_root, **extra, **diverging)])
    assert result.returncode == 3, result.stdout[-3000:]
    assert "non-finite g_loss from step 3" in result.stdout
    assert f"{run_dir / 'checkpoints' / 'step_2.pt'} is the newest and last good checkpoint" in result.stdout
    assert saved_steps(run_dir) == [2]
    state = torch.load(run_dir / "checkpoints" / "step_2.pt", weights_only=True)
    assert all(t.isfinite().all() for net in ("generator", "discriminator") for t in state["engine"][net].values())


@pytest.mark.parametrize("fast_rank", ["0", "1"])
def test_timed_saves_follow_rank_0s_clock(tmp_path, idx_root, fast_rank):
    run_dir = tmp_path / "run"
    extra = {"checkpoint.every_minutes": 10, "train.max_steps": 12, "dist.timeout_s": 30}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "skewed_clock.py"), *base_overrides(run_dir, idx_root, **extra)]
    result = run(cmd, timeout=240, env_extra={"FAST_CLOCK_RANK": fast_rank})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saves = [line for line in result.stdout.splitlines() if line.startswith("saved ")]
    if fast_rank == "0":  # rank 0 finds a save due at every step: every rank saves with it, one step late
        assert len(saves) >= 10 and saved_steps(run_dir) == [10, 11, 12]
    else:  # only rank 1's clock says so, and rank 1 does not decide: the final save alone
        assert saves == [f"saved {run_dir / 'checkpoints' / 'step_12.pt'}"]


def test_first_ctrl_c_saves_and_exits_75(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    proc = start([*TRAIN, *base_overrides(run_dir, idx_root, **{"train.max_steps": 10**6, "log.every_steps": 1})])
    seen = read_until(proc, "step       5")
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    stopped = int(out.split("stopped by signal (SIGINT) at step ")[1].split(";")[0])
    assert saved_steps(run_dir) == [stopped] and "Traceback" not in out
    # The agreement is read one step late: the step in flight, then at most one more (README: "When a job dies").
    assert 5 <= stopped <= 5 + 2 + 1  # + 1: the line of step 5 is printed before the step boundary


def interrupt_twice(cmd: list[str], first_after: str, second_after: str) -> tuple[int, str]:
    """Ctrl-C once a line starts with ``first_after``, again once one starts with ``second_after``:
    the exit status and the output from there on."""
    proc = start(cmd)
    read_until(proc, first_after)
    proc.send_signal(signal.SIGINT)
    read_until(proc, second_after)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def test_second_ctrl_c_aborts_at_once_and_leaves_no_partial_file(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 10**6, "log.every_steps": 1, "checkpoint.every_steps": 1}
    status, out = interrupt_twice([*TRAIN, *base_overrides(run_dir, idx_root, **extra)], "saved ",
                                  "interrupt: saving at the next step boundary")
    assert status == 130, out[-3000:]
    assert out.rstrip().endswith("aborted by a second interrupt; every checkpoint on disk is complete")
    assert "Traceback" not in out
    # Complete checkpoints and their manifest only: no temporary file of a save cut short.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()
            if not p.name.startswith("step_") and p.name != "saved.json"] == []


def test_stop_during_start_up_exits_75_before_step_1(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    # W&B's offline start takes seconds: a signal sent right after the precision line lands before step 1.
    proc = start([*TRAIN, *base_overrides(run_dir, idx_root, **{"log.wandb.mode": "offline"})])
    read_until(proc, "precision: ")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by signal (SIGTERM) before step 1: nothing new to save" in out and "Traceback" not in out


def signal_caught(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
    return bool(caught >> (sig - 1) & 1)


def test_the_stop_handlers_come_before_torch_and_a_sigterm_then_exits_75(tmp_path, idx_root):
    """The entry imports nothing heavy before it installs its handlers (test_imports.py), so torch's
    seconds of loading are covered: a SIGTERM sent the moment the handler is there stops the run cleanly."""
    proc = start([*TRAIN, *base_overrides(tmp_path / "run", idx_root)])
    while not signal_caught(proc.pid, signal.SIGTERM):
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by signal (SIGTERM) before step 1: nothing new to save" in out and "Traceback" not in out


def test_a_second_ctrl_c_during_shutdown_keeps_the_decided_status(tmp_path, idx_root):
    # W&B's offline finish takes a second or more: the second interrupt lands while the run shuts down.
    extra = {"train.max_steps": 10**6, "log.every_steps": 1, "log.wandb.mode": "offline"}
    status, out = interrupt_twice([*TRAIN, *base_overrides(tmp_path / "run", idx_root, **extra)], "step       3",
                                  "stopped by signal (SIGINT)")
    assert status == 75, out[-3000:]
    assert "interrupt: the run is already ending; its exit status stands" in out and "Traceback" not in out


@pytest.mark.parametrize(("what", "room", "extra"), [
    ("samples/step_2.png", 62 << 10, {"log.samples_every_steps": 2}),
    ("metrics.jsonl", 1000, {"log.every_steps": 1}),
])
def test_a_full_disk_under_any_file_of_the_run_is_one_line_and_exit_2(tmp_path, idx_root, what, room, extra):
    """A file-size limit fails the write as a full disk would; the data cache and a checkpoint exist before it.
    The limit leaves ``room`` above config.yaml, which the run rewrites first and whose size follows the config."""
    run_dir = tmp_path / "run"
    assert run([*TRAIN, *base_overrides(run_dir, idx_root, **{"train.max_steps": 1})]).returncode == 0
    before = (run_dir / "checkpoints" / "step_1.pt").read_bytes()
    limit = (run_dir / "config.yaml").stat().st_size + room

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run([*TRAIN, *base_overrides(run_dir, idx_root, **{"train.max_steps": 50, **extra})],
                 preexec_fn=limited)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr == (f"error (rank 0): writing {run_dir / what} failed: File too large (disk full?); "
                             "every checkpoint on disk is complete\n")
    assert saved_steps(run_dir) == [1] and (run_dir / "checkpoints" / "step_1.pt").read_bytes() == before


def test_refused_resume_leaves_config_yaml_alone(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    assert run([*TRAIN, *base_overrides(run_dir, idx_root, **{"train.max_steps": 2})]).returncode == 0
    before = (run_dir / "config.yaml").read_text()
    refused = run([*TRAIN, *base_overrides(run_dir, idx_root, **{"train.max_steps": 4, "model.arch": "dcgan"})])
    assert refused.returncode == 2 and "check model.*" in refused.stderr
    assert (run_dir / "config.yaml").read_text() == before


def read_only_dir(tmp_path: Path) -> Path:
    """A read-only tmpfs mount (root only); skip where it cannot be made."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a read-only mount needs root and mount(8)")
    return path


@pytest.mark.parametrize("case", ["file", "read_only", "cuda"])
def test_start_up_mistakes_give_one_line_and_exit_2(tmp_path, idx_root, case):
    run_dir, extra, expected = tmp_path / "run", {}, ""
    if case == "file":
        run_dir.write_text("not a folder")
        expected = f"error (rank 0): run_dir: {run_dir} exists and is not a folder"
    elif case == "read_only":
        run_dir = read_only_dir(tmp_path) / "run"
        expected = f"error (rank 0): run_dir: cannot create {run_dir}: Read-only file system"
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra = {"dist.device": "cuda"}
        expected = "error (rank 0): dist.device=cuda: "  # then what CUDA says when it does not start
    try:
        result = run([*TRAIN, *base_overrides(run_dir, idx_root, **extra)])
    finally:
        if case == "read_only":
            subprocess.run(["umount", str(run_dir.parent)], check=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(expected) and "Traceback" not in result.stderr


def test_under_torchrun_the_ranks_reason_is_the_last_line_before_its_summary(tmp_path, idx_root):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a folder")
    result = run(torchrun_cmd(2, base_overrides(run_dir, idx_root)))
    # torchrun's own status is 1. Its summary shows a rank's 2; a rank still exiting when the agent
    # stops the group may be listed with the agent's SIGTERM instead.
    assert result.returncode == 1 and "exitcode  : 2" in result.stderr
    lines = result.stderr.splitlines()
    tail = lines[lines.index(f"error (rank 0): run_dir: {run_dir} exists and is not a folder") + 1:]
    # After the reason: only the agent's log records, then its traceback and summary.
    agent = tail[:tail.index("Traceback (most recent call last):")]
    assert all(re.match(r"[WEI]\d{4} ", line) for line in agent), result.stderr[-3000:]


def test_an_abort_mid_write_leaves_no_partial_file(tmp_path):
    class Interrupting:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"weights": torch.zeros(1000), "then": Interrupting()}, tmp_path / "step_1.pt")
    assert list(tmp_path.iterdir()) == []
