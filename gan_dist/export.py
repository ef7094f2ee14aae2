"""Export a trained G for use outside gan_dist: safetensors, TorchScript or ONNX.

    python -m gan_dist.export --checkpoint runs/folder_small/checkpoints/step_3000.pt --format onnx --out g.onnx
    python -m gan_dist.export --checkpoint CKPT --format torchscript --out g.pt --uint8
    python -m gan_dist.export --checkpoint CKPT --format safetensors --out g.safetensors --no-ema

Inputs: ``z`` float32 [N, z_dim] and ``labels`` int64 [N] (class ids; 0 when unconditional), any N.
Output: images float32 [N, C, H, W] in [-1, 1]; with --uint8, pixels uint8 [N, H, W, C].
The EMA of G is exported when the checkpoint holds one, unless --no-ema; BatchNorm runs on the statistics
the sampler uses, and any spectral norm is folded into plain weights. The metadata (architecture, z_dim,
classes and their names, channels, resolution, the gan_dist version, the config) travels under the key
``gan_dist``: in safetensors' header, TorchScript's extra files and ONNX's metadata properties.

  safetensors   weights only: ``gan_dist.load_generator(path)`` rebuilds G, and ``.sample(n, classes, seed)``
  torchscript   ``torch.jit.load(path)`` in any program, no gan_dist needed
  onnx          onnxruntime or any ONNX runtime (opset 18); needs ``pip install 'gan_dist[onnx]'``

Exit status: 0 written; 2 bad arguments, an unusable checkpoint, an unwritable --out or a G the format
cannot express.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from gan_dist import cli
from gan_dist.checkpoint import load_file
from gan_dist.config import UsageError
from gan_dist.models.export import FORMATS, SAVERS, Description, ExportedGenerator
from gan_dist.models.loading import generator_from_state

OPERATION = re.compile(r"target=(torch\.ops\.[\w.]+)")
"""How torch's ONNX exporter names the node it could not translate."""


class NotExportable(UsageError):
    """G holds an operation the format cannot express."""


def reason(error: BaseException) -> str:
    """The exporter's error in one line: the operation it stopped at (named in some link of the chain of
    causes) and the innermost cause's first line."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    ops = [m.group(1) for e in chain for m in [OPERATION.search(str(e))] if m]
    first = (str(chain[-1]).strip().splitlines() or [""])[0]
    return ", ".join([*ops[:1], f"{type(chain[-1]).__name__}: {first}" if first else type(chain[-1]).__name__])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m gan_dist.export", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                        help="a step_<N>.pt or best.pt written by gan_dist.train")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=cli.writable_file, metavar="PATH")
    parser.add_argument("--no-ema", action="store_true", help="export the raw G, not its saved EMA")
    parser.add_argument("--uint8", action="store_true", help="output uint8 pixels [N, H, W, C]")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    state = load_file(args.checkpoint)
    generator, cfg, info = generator_from_state(state, args.checkpoint, use_ema=not args.no_ema)
    ema = "generator_ema" in state["engine"] and not args.no_ema
    model = ExportedGenerator(generator, Description.of(cfg, info, ema, state["step"], args.uint8))
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    try:
        SAVERS[args.format](model, tmp)
        os.chmod(tmp, 0o666 & ~umask())  # as any new file (safetensors writes 0600)
        os.replace(tmp, args.out)
    except UsageError:
        raise
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    except Exception as e:
        raise NotExportable(f"the {cfg.model.arch} G of {args.checkpoint} cannot be exported to {args.format}: "
                            f"{reason(e)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    d = model.description
    print(f"wrote {args.out}: {args.format}, the {'EMA of G' if ema else 'G'} ({d.arch}, step {d.step}, "
          f"{d.channels}×{d.resolution}×{d.resolution}, {d.num_classes or 'no'} classes); in: {d.inputs}; "
          f"out: {d.output}")
    return 0


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
