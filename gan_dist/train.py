"""Train a conditional GAN, on one process or many.

One process (CPU or one GPU):
    python -m gan_dist.train --config configs/mnist_dcgan.yaml
Several ranks on one machine (NCCL on GPUs, gloo on CPU):
    torchrun --nproc_per_node=4 -m gan_dist.train --config configs/mnist_dcgan.yaml train.batch_size=128
Offline, on Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist):
    python -m gan_dist.train data.name=fashion_mnist data.root=/usr/share/datasets/fashion-mnist
Slurm: python -m launch.slurm (it ends up in ``main`` below, with the same arguments).
In Python: ``gan_dist.training.trainer.Trainer(cfg, env, StopFlag(), Evaluator).fit()``;
``gan_dist.training.trainer.build(cfg, env)`` gives the data and the engine alone.

``--help`` lists every config key; ``--dry-run`` prints the resolved config and exits.
Exit status: 0 done; 2 bad config, data, checkpoint or run_dir; 3 diverged (non-finite losses or
weights: nothing non-finite is saved, the newest checkpoint is the last good one); 4 lost a peer (a
collective failed: a node died or is unreachable; relaunch to resume); 75 stopped by a signal after
saving (requeue me); 130 aborted by a second Ctrl-C (no partial file is left).
Under torchrun these arrive as torchrun's exit 1; its summary table lists each rank's own status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gan_dist import cli
from gan_dist.configio import describe, load_config, to_yaml
from gan_dist.signals import StopFlag


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(
        prog="python -m gan_dist.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override as key=value):\n" + "\n".join(describe()),
    )
    parser.add_argument("--config", help="YAML file layered over the defaults")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    # First of all, before torch loads (seconds): a signal during start-up is a clean stop, not a
    # silent death. This module imports nothing heavy for that reason; the trainer comes below.
    stop = StopFlag()
    args = parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from gan_dist.evaluation.evaluator import Evaluator, check_features
        from gan_dist.training.trainer import train

        if cfg.eval.every_steps > 0:
            check_features(cfg.eval)  # Inception's weights, before any data or process group
        return train(cfg, stop, Evaluator)

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
