"""The CPU mode of ``benchmarks/gpu_check.sh``: every stage a CPU can run, on tiny sizes, so the GPU
check cannot rot before a GPU runs it; and what decides the one GPU call: the CUDA plan's budget, the stage
statuses and the exit status, the summary after a signal or an exhausted budget (the script driven by a stub
python), and FLOPs counted off compiled code. Nothing here needs or touches CUDA."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import REPO, exited, run, wait_until

pytestmark = pytest.mark.integration  # starts processes or services

MAX_FILES = 8  # what the device tool brings back from $OUT
CUDA_ONLY = {"nccl_shared_gpu", "sync_batchnorm_resnet", "fp16_r1", "compile_ddp"}  # skipped, with a reason, on CPU


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_check(idx_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {"OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "DATA_ROOT": str(idx_root),
           "DATA_NAME": "mnist", "DATA_SPLIT": "test"}
    proc = run(["bash", REPO / "benchmarks" / "gpu_check.sh", "--cpu"], timeout=900, env_extra=env)
    assert proc.returncode == 0, proc.stdout[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["all_checks_passed"]
    stages = summary["stages"]
    assert {s["stage"]: s["status"] for s in stages if s["status"] != "passed"} == dict.fromkeys(CUDA_ONLY, "skipped")
    assert all(s["skipped"] for s in stages if s["stage"] in CUDA_ONLY)  # each says why
    assert "small_data_terms" in {s["stage"] for s in stages}
    assert {"throughput_rgb32_dcgan_b16", "throughput_rgb32_resnet_b16"} <= {s["stage"] for s in stages}
    assert all(c["ok"] for s in stages for c in s["checks"]) and sum(len(s["checks"]) for s in stages) > 50
    assert {"gpu_check.log", "summary.json", "bench.json", "samples_grid.png"} <= {p.name for p in out.iterdir()}
    assert len(list(out.rglob("*"))) <= MAX_FILES
    assert "every correctness check passed" in (out / "gpu_check.log").read_text()


def test_cuda_plan_fits_one_call_with_checks_first() -> None:
    """The CUDA plan's reserved timeouts and the summary's reserve fit the default budget of 6 minutes, the
    shell's numbers are the plan's, every check is reserved and comes before every speed stage, and the spare
    ones (on time the others leave unused) come last."""
    from benchmarks.gpu_check import CUDA_BUDGET_S, RESERVE_S, plan, reserved_s

    stages = plan("cuda")
    assert reserved_s(stages) + RESERVE_S <= CUDA_BUDGET_S <= 360
    kinds = ["spare" if s.spare else "speed" if s.speed else "check" for s in stages]
    assert kinds == sorted(kinds, key=["check", "speed", "spare"].index) and "spare" not in kinds[:-4]
    assert all(s.speed for s in stages if s.spare)
    assert {"compile_ddp", "sync_batchnorm_resnet", "fp16_r1", "small_data_terms", "nccl_shared_gpu"} <= \
        {s.name for s in stages if not s.speed}
    assert "throughput_max-autotune" not in {s.name for s in stages}
    shell = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert f"GPU_CHECK_BUDGET_S:-{CUDA_BUDGET_S}}}" in shell and f"RESERVE={RESERVE_S} " in shell


def write_stage(work: Path, name: str, rc: str | None, ok: bool = True, skipped: str | None = None) -> None:
    """A stage's files as a run leaves them: its report, and the exit status and seconds the shell wrote."""
    stages = work / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    report = {"stage": name, "checks": [{"name": "c", "ok": ok, "detail": ""}], "measured": {}, "targets": [],
              "notes": [], "skipped": skipped}
    (stages / f"{name}.json").write_text(json.dumps(report))
    if rc is not None:
        (stages / f"{name}.rc").write_text(f"{rc} 5\n")


def test_summary_skipped_stages_pass_and_timed_out_checks_fail(tmp_path: Path) -> None:
    """From fabricated stage files: a stage skipped for lack of time, or as not runnable on this device, does not
    fail the exit status; a check stage that timed out, crashed, failed, was interrupted or never ran does; a
    speed stage's time out does not, its crash does."""
    from benchmarks.gpu_check import fails_exit, plan, stage_status, summary
    from benchmarks.gpu_stages.mode import Mode

    stages = {s.name: s for s in plan("cuda")}
    mode = Mode("cuda", tmp_path / "work", tmp_path / "out", ())
    mode.out.mkdir()

    def run_summary(**changed: tuple) -> tuple[int, dict[str, str]]:
        for name in stages:
            write_stage(mode.work, name, *changed.get(name, ("0",)))
        code = summary(mode)
        found = json.loads((mode.out / "summary.json").read_text())
        assert found["all_checks_passed"] == (code == 0)
        return code, {s["stage"]: s["status"] for s in found["stages"]}

    assert run_summary() == (0, dict.fromkeys(stages, "passed"))
    code, status = run_summary(resume=("skipped",), fp16_r1=("0", True, "float16 is CUDA only"),
                               throughput_default=("skipped",))
    assert code == 0 and status["resume"] == "skipped (out of time)" and status["fp16_r1"] == "skipped"
    for rc in ("124", "137", "interrupted"):
        code, status = run_summary(compile_ddp=(rc,), batch_sweep=(rc,))
        assert code == 1 and status["compile_ddp"] == status["batch_sweep"] == stage_status(None, rc)
    assert run_summary(batch_sweep=("124",), **{"throughput_reduce-overhead": ("interrupted",)})[0] == 0
    assert run_summary(matrix=("1", False))[1]["matrix"] == "failed"
    assert run_summary(batch_sweep=("1",)) == (1, dict.fromkeys(stages, "passed") | {"batch_sweep": "crashed"})
    (mode.work / "stages" / "preflight.rc").unlink()
    write_stage(mode.work, "preflight", None)
    assert summary(mode) == 1
    assert [fails_exit(stages["preflight"], s) for s in ("not run", "timed out", "skipped (out of time)")] == \
        [True, True, False]


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python in gpu_check.sh: "-m benchmarks.gpu_check COMMAND ...", without torch.
case "$3" in
    plan) printf 'first 30 check\\nsecond 30 check\\n' ;;
    summary) echo "stub summary"
             for f in "$GPU_CHECK_WORK"/stages/*.rc; do echo "rc $(basename "$f") $(cat "$f")"; done ;;
    *) echo "stage $3 started"; exec sleep 60 ;;
esac
"""


def stub_python(tmp_path: Path) -> Path:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_stage_and_still_summarises(tmp_path: Path, start, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT to the script's whole process group mid-stage: the stage is stopped and recorded as
    interrupted, the next one never starts, and the summary is printed and logged (tee outlives the signal)."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = start(["bash", REPO / "benchmarks" / "gpu_check.sh"], OUT=str(out), GPU_CHECK_WORK=str(work),
                 PYTHON=str(stub_python(tmp_path)))
    log = out / "gpu_check.log"
    wait_until(lambda: log.exists() and "stage first started" in log.read_text(), "the first stage", 30,
               alive=exited(proc))
    began = time.monotonic()
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    assert time.monotonic() - began < 10  # not the stage's 60 s sleep, nor its 30 s timeout
    text = log.read_text()
    got = f"got {sig.name}"
    assert got in text and "stub summary" in text and "rc first.rc interrupted" in text, text
    assert "second" not in text.split(got)[1].split("stub summary")[0]
    assert not (work / "stages" / "second.rc").exists()


def test_out_of_budget_stages_are_skipped_and_summarised(tmp_path: Path) -> None:
    """A budget with no room for a stage: each is recorded as skipped, none starts, and the summary still runs."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run(["bash", REPO / "benchmarks" / "gpu_check.sh"], timeout=60, env_extra={
        "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": str(stub_python(tmp_path)),
        "GPU_CHECK_BUDGET_S": "20"})
    assert proc.returncode == 0 and "stage first started" not in proc.stdout, proc.stdout
    assert "rc first.rc skipped 0" in proc.stdout and "rc second.rc skipped 0" in proc.stdout


def test_flops_of_a_compiled_twin_are_counted_on_its_eager_modules(idx_root: Path) -> None:
    """bench_worker.measure counts FLOPs inside ``Workload.eager()``: under ``train.compile`` the engine then steps
    its modules as built (nothing compiles, no CUDA graph is stepped), as many FLOPs as the uncompiled twin's,
    and the compiled modules are back afterwards."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_worker import EngineWorkload
    from gan_dist.configio import load_config

    def counted(compile_mode: str) -> tuple[int, EngineWorkload]:
        cfg = load_config(REPO / "configs" / "mnist_cgan.yaml", [
            f"data.root={idx_root}", "data.name=mnist", "data.split=test", "data.download=false", "dist.device=cpu",
            "train.batch_size=16", "model.mlp.g_hidden=[32]", "model.mlp.d_hidden=[32]", "log.z_spread=false",
            f"train.compile={compile_mode}"])
        work = EngineWorkload(cfg)
        torch.manual_seed(0)
        with work.eager(), FlopCounterMode(display=False) as flops:
            nets = work.engine.nets
            assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
                           for m in (nets.G.step, nets.G.no_grad, nets.D.step, nets.D.no_grad))
            assert not work.engine.graphed
            work.train_step(0, work.next_batch())
        work.close()
        return flops.get_total_flops(), work

    (eager, _), (compiled, work) = counted("off"), counted("default")
    assert compiled == eager > 0
    assert isinstance(work.engine.nets.G.step, torch._dynamo.eval_frame.OptimizedModule)
