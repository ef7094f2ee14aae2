"""A trained G on its own: weights folded for inference, its description as metadata, and the three export
formats (safetensors, TorchScript, ONNX) plus the loader of the first.

An export maps ``z`` (float32 [N, z_dim]) and ``labels`` (int64 [N], class ids; 0 when unconditional) to
images: float32 [N, C, H, W] in [-1, 1], or with ``uint8`` pixels [N, H, W, C], the layout image files use.
Every format carries the same metadata under the key ``gan_dist``: a JSON object (``Description``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from gan_dist.config import DatasetInfo, UsageError
from gan_dist.configio import resolve, to_dict
from gan_dist.data.pixels import to_pixels
from gan_dist.models.base import build_generator, label_count
from gan_dist.seeds import Stream, latents

KEY = "gan_dist"
"""The metadata key of every format."""
FORMATS = ("safetensors", "torchscript", "onnx")
ONNX_OPSET = 18


class NotAnExport(UsageError):
    """A file that ``load_generator`` cannot read as a gan_dist safetensors export."""


@dataclasses.dataclass(frozen=True)
class Description:
    """What an export is: enough to rebuild G (``config``, ``data``) and to use it without reading them."""

    arch: str
    z_dim: int
    num_classes: int
    """Classes G is conditioned on (0: unconditional)."""
    class_names: tuple[str, ...]
    channels: int
    resolution: int
    ema: bool
    step: int
    uint8: bool
    inputs: str
    output: str
    gan_dist_version: str
    config: dict[str, Any]
    data: dict[str, Any]

    @classmethod
    def of(cls, cfg: Any, info: DatasetInfo, ema: bool, step: int, uint8: bool) -> Description:
        classes = label_count(cfg.model, info)
        c, h, w = info.shape
        output = f"uint8 [N, {h}, {w}, {c}] pixels" if uint8 else f"float32 [N, {c}, {h}, {w}] in [-1, 1]"
        return cls(cfg.model.arch, cfg.model.z_dim, classes, info.class_names if classes else (), c, h, ema, step,
                   uint8, f"z: float32 [N, {cfg.model.z_dim}]; labels: int64 [N], class ids "
                   f"{f'0..{classes - 1}' if classes else '(0: unconditional)'}", output, version(),
                   to_dict(cfg), info.to_dict())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"class_names": list(self.class_names)})

    @classmethod
    def from_json(cls, text: str, where: Path) -> Description:
        try:
            fields = json.loads(text)
            return cls(**fields | {"class_names": tuple(fields["class_names"])})
        except (ValueError, TypeError, KeyError) as e:
            raise NotAnExport(f"{where}: its {KEY} metadata is not a gan_dist export's ({e})") from None


class ExportedGenerator(nn.Module):
    """G in eval mode with plain weights (``fold``: it takes G over), mapping (z, labels) to images as the
    module docstring says."""

    def __init__(self, generator: nn.Module, description: Description) -> None:
        super().__init__()
        self.generator = fold(generator)
        self.description = description
        self.uint8 = description.uint8
        self.eval()

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = self.generator(z, labels)
        return to_pixels(images).permute(0, 2, 3, 1) if self.uint8 else images

    @torch.no_grad()
    def sample(self, n: int, classes: int | Sequence[int] | None = None, seed: int = 0,
               batch: int = 1000) -> torch.Tensor:
        """``n`` images per class of ``classes`` (default: every class), class-major, from latents drawn as
        ``python -m gan_dist.sample --npz --n-per-class n --seed seed`` draws them: with every class, these
        are that file's images."""
        rows = max(self.description.num_classes, 1)
        picked = list(range(rows)) if classes is None else [classes] if isinstance(classes, int) else list(classes)
        if n < 1 or not picked or any(not 0 <= c < rows for c in picked):
            raise ValueError(f"sample: n must be at least 1 and classes in 0..{rows - 1}; got n={n}, "
                             f"classes={classes}")
        device = next(self.parameters()).device
        labels = torch.tensor(picked, device=device).repeat_interleave(n)
        z = latents(self.description.z_dim, len(labels), seed, Stream.NPZ).to(device)
        return torch.cat([self(z[i:i + batch], labels[i:i + batch]) for i in range(0, len(labels), batch)])


def version() -> str:
    try:
        return importlib.metadata.version("gan_dist")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def fold(generator: nn.Module) -> nn.Module:
    """G itself, in eval mode without gradients, with every parametrization (spectral norm, weight norm) folded
    into a plain weight, in place: a parametrized module's class is its own, and a copy would share it."""
    plain = generator.eval().requires_grad_(False)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain


def example_inputs(description: Description, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, description.z_dim), torch.zeros(n, dtype=torch.int64)


def save_safetensors(model: ExportedGenerator, path: Path) -> None:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in model.generator.state_dict().items()}
    save_file(weights, str(path), metadata={KEY: model.description.to_json()})


def save_torchscript(model: ExportedGenerator, path: Path) -> None:
    """Traced, so that ``torch.jit.load`` alone runs it; the batch size stays free (checked on a second one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        traced = torch.jit.trace(model, example_inputs(model.description), check_inputs=[
            example_inputs(model.description, 3)])
        torch.jit.save(traced, str(path), _extra_files={KEY: model.description.to_json()})


def save_onnx(model: ExportedGenerator, path: Path) -> None:
    """torch.export's ONNX exporter (torch 2.5+), with a dynamic batch; the metadata as a model property."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's dependency, named here so its absence is one line)
    except ImportError as e:
        raise UsageError(f"--format onnx needs the onnx extra ({e.name} is missing): pip install 'gan_dist[onnx]'"
                         ) from None
    if "dynamo" not in torch.onnx.export.__code__.co_varnames:
        raise UsageError(f"--format onnx needs torch 2.5 or newer (its torch.export-based exporter); this is torch "
                         f"{torch.__version__}")
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example_inputs(model.description), dynamo=True, verbose=False,
                                    input_names=["z", "labels"], output_names=["images"], opset_version=ONNX_OPSET,
                                    dynamic_shapes=({0: batch}, {0: batch}), report=False)
    proto = program.model_proto
    proto.metadata_props.add(key=KEY, value=model.description.to_json())
    onnx.save(proto, str(path))


SAVERS = {"safetensors": save_safetensors, "torchscript": save_torchscript, "onnx": save_onnx}


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> ExportedGenerator:
    """G from a safetensors export alone (no training config, no optimizer state), in eval mode on ``device``;
    its metadata is ``.description``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no mapping)
    except (SafetensorError, OSError) as e:
        raise NotAnExport(f"{path}: not a safetensors file ({e})") from None
    if KEY not in metadata:
        raise NotAnExport(f"{path}: a safetensors file, but not a gan_dist export (no {KEY!r} metadata)")
    description = Description.from_json(metadata[KEY], path)
    cfg, info = resolve(description.config), DatasetInfo.from_dict(description.data)
    model = ExportedGenerator(build_generator(cfg.model, info), description)
    model.generator.load_state_dict(weights)
    return model.to(device)
