"""Short runs of one recipe with one change each, scored side by side: what makes a run collapse.

    python benchmarks/ablate.py --config configs/cifar10_dcgan.yaml --steps 300 --out runs/ablate \\
        --run "recipe" --run "fp32 amp.enabled=false" --run "embed 10 model.embed_dim=10" \\
        -- data.name=folder data.root=/data/emoji data.resolution=32

Each ``--run "NAME key=value ..."`` trains the config with the shared overrides (after ``--``), then its
own, for ``--steps`` steps on one process with one thread (``--parallel`` of them at a time), without
EMA, W&B or sample grids. Every run is then scored from its last checkpoint by ``gan_dist.evaluate``
on the raw G (``--n-per-class`` samples per class, no floors). The table has, per run, the within-class
spread over z at each log step (``z_spread``, see README "Monitoring"), the judge's recall, conditional
accuracy and FID, and images/s. It is printed and written to ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUIET = ["ema.enabled=false", "log.wandb.mode=disabled", "log.progress=false", "dist.threads=1",
         "checkpoint.every_steps=0", "log.every_steps=50", "eval.every_steps=0"]


def train_and_score(args: argparse.Namespace, name: str, overrides: list[str]) -> dict:
    run_dir = args.out / name.replace(" ", "_")
    train = [sys.executable, "-m", "gan_dist.train", "--config", str(args.config), *QUIET,
             f"train.max_steps={args.steps}", f"run_dir={run_dir}", "train.resume=never", *args.shared, *overrides]
    trained = subprocess.run(train, capture_output=True, text=True)
    if trained.returncode != 0:
        return {"name": name, "error": (trained.stderr.strip().splitlines() or ["?"])[-1]}
    scores = run_dir / "scores.json"
    evaluate = [sys.executable, "-m", "gan_dist.evaluate", "--checkpoint", str(run_dir / "checkpoints" /
                f"step_{args.steps}.pt"), "--no-ema", "--no-floors", "--n-per-class", str(args.n_per_class),
                "--out", str(scores)]
    scored = subprocess.run(evaluate, capture_output=True, text=True)
    if scored.returncode != 0:
        return {"name": name, "error": (scored.stderr.strip().splitlines() or ["?"])[-1]}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "overrides": overrides, "scores": json.loads(scores.read_text()),
            "z_spread": [(r["step"], r["z_spread"]) for r in logged if "z_spread" in r],
            "images_per_s": logged[-1]["images_per_s"]}


def table(results: list[dict], steps: int) -> str:
    lines = ["| run | z_spread by step (50, 100, ...) | recall ↑ | cond. acc ↑ | FID ↓ | img/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        s = r["scores"]
        spread = " ".join(f"{v:.2f}" for _, v in r["z_spread"])
        lines.append(f"| {r['name']} (`{' '.join(r['overrides'])}`) | {spread} | {s['recall']:.3f} | "
                     f"{s['cond_acc']:.3f} | {s['fid']:.0f} | {r['images_per_s']:.0f} |")
    return "\n".join([f"Raw G at step {steps}:", "", *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the recipe")
    parser.add_argument("--run", action="append", required=True, metavar='"NAME key=value ..."',
                        help="a run: its name (one word) and its own overrides")
    parser.add_argument("--steps", type=int, default=300, help="steps of every run")
    parser.add_argument("--n-per-class", type=int, default=100, help="evaluated samples per class")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"), help="run folders and ablation.md")
    parser.add_argument("shared", nargs="*", metavar="key=value", help="overrides of every run (after --)")
    args = parser.parse_args(argv)
    runs = [shlex.split(spec) for spec in args.run]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda spec: train_and_score(args, spec[0], spec[1:]), runs))
    text = table(results, args.steps)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(text + "\n")
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
