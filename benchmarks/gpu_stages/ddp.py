"""Stage ``ddp_gloo``: ranks sharing the device over gloo, and the worker each of its ranks runs."""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as live objects.
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from benchmarks.gpu_stages.mode import Mode
from benchmarks.gpu_stages.report import Report, outcome, run_cmd, torchrun
from benchmarks.gpu_stages.run import Run
from gan_dist.config import Config
from gan_dist.dist import DistEnv, StepAgreement, setup, teardown

DDP_OPTIONS = {"mlp": ("mlp", ()), "dcgan": ("dcgan", ()), "dcgan_bn": ("dcgan_bn", ()),
               "mlp_n_critic_2": ("mlp", ("train.n_critic=2",))}


def counting_hook(counts: Counter, tag: str) -> Callable:
    """DDP's all-reduce, counted: the proof of which network synchronises in which step."""

    def hook(state: object, bucket: tdist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counts[tag] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def mismatches_with_rank0(tensors: list[torch.Tensor], env: DistEnv) -> int:
    """Elements, summed over ranks, that differ from rank 0's."""
    mine = torch.cat([t.detach().flatten() for t in tensors]).cpu()
    theirs = mine.clone()
    tdist.broadcast(theirs, src=0, group=env.control)
    count = torch.tensor([int((mine != theirs).sum())])
    tdist.all_reduce(count, group=env.control)
    return int(count)


def ddp_option(mode: Mode, env: DistEnv, cfg: Config) -> dict[str, int]:
    """The invariants of tests/test_ddp.py with real data sharded by rank: weights equal across ranks,
    and D's gradients never all-reduced in the G step."""
    run = Run(cfg, env)
    eng, counts = run.engine, Counter()
    eng.nets.G.step.register_comm_hook(None, counting_hook(counts, "G"))
    eng.nets.D.step.register_comm_hook(None, counting_hook(counts, "D"))
    run.train(mode.sizes.steps)
    before = dict(counts)
    eng.g_step(*eng.noise.draw(run.step, 0, cfg.train.batch_size), run.step, next(run.batches)[0])
    weights = [*eng.generator.parameters(), *eng.discriminator.parameters(),
               *(eng.ema.module.parameters() if eng.ema else ())]
    return {"mismatched": mismatches_with_rank0(weights, env), "elements": sum(w.numel() for w in weights),
            "d_total": counts["D"], "d_in_g_step": counts["D"] - before["D"], "g_in_g_step": counts["G"] - before["G"]}


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    """Median wall time of one call, in µs."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def agreement_cost(env: DistEnv, calls: int) -> dict[str, float]:
    """µs per step of the stop agreement with nothing to hide behind: blocking, and the asynchronous one."""
    env.barrier()
    blocking = per_call_us(lambda: env.any(False), calls)
    agreement = StepAgreement(env)
    env.barrier()
    overlapped = per_call_us(lambda: agreement.exchange(False, False), calls)
    agreement.drain()
    return {"blocking_us": blocking, "async_us": overlapped}


def ddp_worker(mode: Mode) -> int:
    """One rank of the ``ddp_gloo`` stage (under torchrun); rank 0 writes ``ddp_<world>.json``."""
    gloo = ("dist.backend=gloo",)
    env = setup(mode.config("mlp", *gloo).dist)
    try:
        options = {name: ddp_option(mode, env, mode.config(recipe, *gloo, *extra))
                   for name, (recipe, extra) in DDP_OPTIONS.items()}
        mine = {"rank": env.rank, "local_rank": env.local_rank, "device": str(env.device)}
        mine |= agreement_cost(env, mode.sizes.agreement_calls)
        ranks: list[Any] = [None] * env.world_size
        tdist.all_gather_object(ranks, mine, group=env.control)
    finally:
        teardown(env)
    if env.is_main:
        (mode.work / f"ddp_{env.world_size}.json").write_text(json.dumps({"options": options, "ranks": ranks}))
    return 0


def ddp_gloo(mode: Mode, report: Report) -> None:
    """The mode's ``worlds`` (2 ranks on CUDA) sharing one device over gloo, every DDP option trained a few steps.
    Checked: torchrun exits 0; weights bit-identical across ranks; D never all-reduced in the G step; each rank on
    ``cuda:(local_rank % GPUs)`` (or the CPU). Measured: the stop agreement's µs per step, blocking and async."""
    for world in mode.sizes.worlds:
        result = mode.work / f"ddp_{world}.json"
        result.unlink(missing_ok=True)
        proc = run_cmd([*torchrun(world), "-m", "benchmarks.gpu_check", "ddp-worker", *mode.argv()])
        ok = proc.returncode == 0 and result.exists()
        if not report.check(f"{world} ranks: torchrun exit 0", ok, outcome(proc, ok, "")):
            continue
        found = json.loads(result.read_text())
        for name, r in found["options"].items():
            report.check(f"{world} ranks, {name}: weights bit-identical across ranks", r["mismatched"] == 0,
                         f"{r['mismatched']} of {r['elements']} x {world} elements differ")
            report.check(f"{world} ranks, {name}: D never all-reduced in the G step",
                         r["d_in_g_step"] == 0 and r["g_in_g_step"] > 0 and r["d_total"] > 0,
                         f"D buckets: {r['d_total']} in D steps, {r['d_in_g_step']} in the G step; "
                         f"G buckets in the G step: {r['g_in_g_step']}")
        gpus = torch.cuda.device_count() if mode.cuda else 0
        expected = [f"cuda:{r['local_rank'] % gpus}" if mode.cuda else "cpu" for r in found["ranks"]]
        devices = [r["device"] for r in found["ranks"]]
        report.check(f"{world} ranks: devices are cuda:(local_rank % GPUs)" if mode.cuda else f"{world} ranks: on CPU",
                     devices == expected, ", ".join(devices))
        for key, label in (("blocking_us", "blocking env.any"), ("async_us", "StepAgreement.exchange")):
            values = [r[key] for r in found["ranks"]]
            report.measure(f"{world} ranks: stop agreement, {label}, µs per step (median, slowest rank)",
                           round(max(values), 1))
