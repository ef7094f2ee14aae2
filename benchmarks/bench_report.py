"""The report of ``benchmarks/bench.py``: the cases side by side, each round's per-rank results reduced
to medians and ratios taken within a round, the targets, and the table as printed and pasted into
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_worker import PHASES
from gan_dist.config import Config, DatasetInfo
from gan_dist.models.base import build_models

# (numerator, denominator, bar) per device: medians of per-round images/s ratios. The bars are the
# documented targets; docs/BENCHMARKS.md says what each means. They are reported, never enforced.
TARGETS = {"tutorial": {"cpu": [("b", "a", 1.6), ("c", "b", 0.95)], "cuda": [("b", "a", 30.0)]},
           "plain": {"cpu": [("b", "a", 0.95), ("c", "b", 0.95)], "cuda": [("b", "a", 0.95)]}}


@dataclass(frozen=True)
class Case:
    """A row of the table: which worker runs it, on how many ranks, with which overrides and variables."""

    key: str  # a, b, c, then b', c' for the --compare twins
    label: str
    kind: str  # "ref" (the tutorial), "plain" or "gan"
    nproc: int
    overrides: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # NAME=VALUE for the case's processes


def compare_tag(compare_env: Sequence[str], compare: Sequence[str]) -> str:
    """What sets the twins apart, as their labels show it."""
    return " ".join([*compare_env, *compare])


def model_flops(cfg: Config, info: DatasetInfo) -> dict[str, float]:
    """Forward FLOPs per image of G and D (the tutorial's pair has the same matmuls)."""
    g, d = build_models(cfg.model, info)
    z, y = torch.randn(2, cfg.model.z_dim), torch.zeros(2, dtype=torch.long)
    out = {}
    for name, run in (("G_forward", lambda: g(z, y)), ("D_forward", lambda: d(torch.zeros(2, *info.shape), y))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        out[name] = counter.get_total_flops() / 2
    return out


def global_images_per_s(rounds: list[list[dict[str, Any]]]) -> list[float]:
    """Per round, the sum over ranks: ranks step in lockstep, so this is the job's throughput."""
    return [sum(r["images_per_s"] for r in ranks) for ranks in rounds]


def _median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def summarise(case: Case, rounds: list[list[dict[str, Any]]],
              ref: list[list[dict[str, Any]]] | None) -> dict[str, Any]:
    """Medians over rounds of the per-round, all-rank figures; ratio to (a), when it ran, within each round."""
    global_ips = global_images_per_s(rounds)
    ratios = [g / a for g, a in zip(global_ips, global_images_per_s(ref), strict=True)] if ref else []
    first = rounds[0][0]
    ips = statistics.median(global_ips)
    achieved = first["flops_per_image"] * ips
    # The job's ceiling: its ranks' matmuls side by side, in the dtype the case computes in.
    ceiling = statistics.median(sum(r["matmul_ceiling_flop_per_s"][first["precision"]] for r in ranks)
                                for ranks in rounds)
    cuda_mb = _median(max(r["cuda_max_allocated_mb"] or 0 for r in ranks) for ranks in rounds)
    return {
        "ranks": case.nproc,
        "threads_per_rank": first["threads"],
        "precision": first["precision"],
        "first_step_s": statistics.median(max(r["first_step_s"] for r in ranks) for ranks in rounds),
        "images_per_s": ips,
        "images_per_s_per_rank": ips / case.nproc,
        "images_per_s_rounds": global_ips,
        "x_ref": _median(ratios),
        "x_ref_rounds": ratios,
        "step_ms": statistics.median(max(r["step_ms"] for r in ranks) for ranks in rounds),
        "phases_ms": {p: _median(statistics.fmean(r["phases_ms"][p] for r in ranks)
                                 if ranks[0]["phases_ms"][p] is not None else None for ranks in rounds)
                      for p in PHASES},
        "flops_per_image": first["flops_per_image"],
        "gflop_per_s": achieved / 1e9,
        "ceiling_gflop_per_s": ceiling / 1e9,
        "pct_of_ceiling": 100 * achieved / ceiling,
        "peak_rss_mb_per_rank": max(max(r["peak_rss_mb"] for r in ranks) for ranks in rounds),
        "z_spread_ms": _median(ranks[0].get("z_spread_ms") for ranks in rounds),
        "cuda_max_allocated_mb_per_rank": cuda_mb if first["device"].startswith("cuda") else None,
    }


def ratio(results: dict[str, list[list[dict[str, Any]]]], num: str, den: str) -> float:
    """The median over rounds of (num)'s global images/s over (den)'s, both taken in the same round."""
    pairs = zip(global_images_per_s(results[num]), global_images_per_s(results[den]), strict=True)
    return statistics.median(n / d for n, d in pairs)


def check_targets(reference: str, device: str, results: dict[str, list[list[dict[str, Any]]]]
                  ) -> list[dict[str, Any]]:
    """The bars of TARGETS between the cases that ran."""
    return [{"ratio": f"({num}) / ({den})", "value": value, "target": bar, "met": value >= bar}
            for num, den, bar in TARGETS[reference][device] if num in results and den in results
            for value in [ratio(results, num, den)]]


def twin_ratios(cases: Sequence[Case], results: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each --compare twin against its own case: what the override is worth, side by side."""
    return [{"ratio": f"({c.key}) / ({c.key[:-1]})", "value": ratio(results, c.key, c.key[:-1])}
            for c in cases if c.key.endswith("'")]


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, or "-" where it was not measured (a phase gloo alone times, a CPU's CUDA MB)."""
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    """The table and the lines around it, as printed and as pasted into docs/BENCHMARKS.md."""
    m, s = report["machine"], report["settings"]
    label = max(46, *(len(c["label"]) for c in report["cases"]))
    lines = [
        f"$ {report['command']}",
        f"{m['device_name']} ({m['capability']}), {m['cores']} cores, torch {m['torch']}; "
        f"load average {m['load_before']} -> {m['load_after']}",
        f"batch {s['batch']} per rank, {s['steps']} timed steps after {s['warmup']} warm-up, "
        f"{s['rounds']} rounds (A B C ...); data {s['data']}"
        + (f"; beside {s['background_load']} busy processes" if s["background_load"] else ""),
        "",
        f"{'case':<{label}} {'ranks×thr':>9} {'dtype':>8} {'img/s':>8} {'/rank':>8} {'×(a)':>6} {'1st s':>6} "
        f"{'step ms':>8} {'data':>6} {'fwd/bwd':>7} {'optim':>6} {'comm':>6} {'GFLOP/s':>8} {'%ceil':>6} "
        f"{'RSS MB':>7} {'CUDA MB':>8}",
    ]
    for case in report["cases"]:
        r, ph = case["summary"], case["summary"]["phases_ms"]
        layout = f"{r['ranks']}×{'gpu' if r['threads_per_rank'] is None else r['threads_per_rank']}"
        lines.append(
            f"{case['label']:<{label}} {layout:>9} {r['precision']:>8} {r['images_per_s']:>8.0f} "
            f"{r['images_per_s_per_rank']:>8.0f} {fmt(r['x_ref'], '6.2f'):>6} {r['first_step_s']:>6.1f} "
            f"{r['step_ms']:>8.2f} "
            f"{fmt(ph['data'], '6.2f'):>6} {fmt(ph['fwd_bwd'], '7.2f'):>7} {fmt(ph['optim'], '6.2f'):>6} "
            f"{fmt(ph['comm'], '6.2f'):>6} "
            f"{r['gflop_per_s']:>8.1f} {r['pct_of_ceiling']:>6.1f} {r['peak_rss_mb_per_rank']:>7.0f} "
            f"{fmt(r['cuda_max_allocated_mb_per_rank'], '8.0f'):>8}")
    flops = report["model_flops_per_image"]
    per_case = ", ".join(f"({c['key']}) {c['summary']['flops_per_image'] / 1e6:.1f}" for c in report["cases"])
    lines += [
        "",
        f"FLOPs per image: G forward {flops['G_forward'] / 1e6:.2f} M, D forward "
        f"{flops['D_forward'] / 1e6:.2f} M; one training step (matmuls, fwd+bwd): {per_case} M",
        f"%ceil: against a {report['settings']['matmul_size']}² matmul in the case's dtype, timed in each rank "
        "before its steps: " + ", ".join(f"({c['key']}) {c['summary']['ceiling_gflop_per_s']:.0f}"
                                         for c in report["cases"]) + " GFLOP/s",
        "1st s: the first step (lazy init; under train.compile, compiling); step ms split per rank: data | "
        "fwd/bwd (the rest) | optim (Adam.step) | comm (all-reduce in flight + step agreement; gloo only)",
    ]
    lines += [f"z_spread (each log step) in {c['key']}: {c['summary']['z_spread_ms']:.1f} ms = "
              f"{c['summary']['z_spread_ms'] / c['summary']['step_ms']:.2f} steps"
              for c in report["cases"] if c["summary"].get("z_spread_ms") is not None]
    tag = compare_tag(s["compare_env"], s["compare"])
    lines += [f"twin {t['ratio']} = {t['value']:.2f} ({tag})" for t in report["twins"]]
    lines += [f"target {t['ratio']} = {t['value']:.2f} (bar ≥ {t['target']}): "
              f"{'met' if t['met'] else 'NOT met'}" for t in report["targets"]]
    first = next((t for t in report["targets"] if t["ratio"] == "(b) / (a)"), None)
    if first is not None:
        lines.append(f"gan_dist/{s['reference']}: {first['value']:.2f}")
    return "\n".join(lines)
