"""Scores in Inception's feature space, through torch-fidelity (the ``metrics`` extra): the FID, KID and IS
that papers and StudioGAN's tables report.

``eval.features=inception`` embeds images with torch-fidelity's InceptionV3 (its port of the TensorFlow
graph behind the published FIDs) and scores them with torch-fidelity's own FID, KID and IS functions;
only the sharding (each rank embeds its share, the features are all-gathered) and precision/recall are
gan_dist's. The images enter as torch-fidelity takes them: uint8 RGB (one channel is replicated to
three), resized by its TensorFlow-1-compatible bilinear resize to 299×299.

Nothing is downloaded: ``eval.inception_weights`` names torch-fidelity's weights file, and a path that
is unset, missing, or holds other tensors is a config error before any work. The reference split's
features are cached under ``eval.features_dir``, keyed like the judge by the split's pixels and labels
(a content hash), its name and the weights' hash: the reference is embedded once, and read back after
(the cost of each: docs/QUALITY.md, "Two feature spaces").
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from gan_dist.checkpoint import CheckpointError, atomic_save
from gan_dist.config import ConfigError
from gan_dist.data.cache import Split, file_sha256
from gan_dist.data.pixels import to_pixels
from gan_dist.evaluation.scores import in_batches, kid_subset_size

if TYPE_CHECKING:
    from gan_dist.dist import DistEnv

KEY = "eval.inception_weights"
NAME = "inception-v3-compat"  # torch-fidelity's name of this extractor, in its registry and its cache files
WEIGHTS = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
OFFICIAL = WEIGHTS.rsplit("-", 1)[1].split(".")[0]
"""The official file's SHA-256 starts with this (torch.hub's naming)."""
LAYERS = ("2048", "logits_unbiased")  # pool3 (FID, KID, precision/recall) and the logits IS reads
REFERENCE_VERSION = 1  # bump when the cached reference's content changes: old files then stop matching


class _Mismatch(Exception):
    """The weights file holds other tensors than InceptionV3's; the message says which."""


class _Extractor(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3, comparing a weights file with its own tensors before loading it:
    torch's error on a wrong file lists every key, this one names the first difference."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = self.state_dict()
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise _Mismatch(f"it holds a {type(state_dict).__name__} of other things, not a state dict of tensors")
        missing, extra = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
        if missing or extra:
            raise _Mismatch(f"it lacks {len(missing)} of InceptionV3's {len(own)} tensors {missing[:2]} and has "
                            f"{len(extra)} others {extra[:2]}")
        for key, tensor in own.items():
            if state_dict[key].shape != tensor.shape:
                raise _Mismatch(f"its {key} is {tuple(state_dict[key].shape)}, InceptionV3's is {tuple(tensor.shape)}")
        return super().load_state_dict(state_dict, strict, assign)


def _refused(path: Path | None, why: str) -> ConfigError:
    where = f"{path} {why}" if path is not None else why
    return ConfigError(f"{KEY}: {where}; eval.features=inception needs torch-fidelity's {WEIGHTS}, from "
                       f"{URL_INCEPTION_V3} (gan_dist never downloads it)")


def weights_file(path: str | None) -> Path:
    """The file ``eval.inception_weights`` names; a ``ConfigError`` naming the key when it is unset or missing."""
    if path is None:
        raise _refused(None, "unset")
    file = Path(path).expanduser()
    if not file.is_file():
        raise _refused(file, "does not exist" if not file.exists() else "is not a file")
    return file


def load_extractor(file: Path) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 on the CPU, in eval mode, from a weights file; a ``ConfigError`` naming
    ``eval.inception_weights`` when the file holds anything else.

    The file is first read with ``weights_only=True``: torch-fidelity's own read would run any pickle.
    """
    try:
        torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch.save file, truncated, or a pickle of more than tensors
        raise _refused(file, "is not a PyTorch weights file: torch.load(weights_only=True) refuses it "
                             f"({type(e).__name__})") from None
    try:
        return _Extractor(NAME, list(LAYERS), feature_extractor_weights_path=str(file))
    except _Mismatch as e:
        raise _refused(file, f"is not InceptionV3's weights: {e}") from None


def as_rgb_pixels(images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's input, uint8 RGB: float images in [-1, 1] (G's) are rounded to pixels as saved
    samples are, and one channel is replicated to three."""
    pixels = images if images.dtype == torch.uint8 else to_pixels(images)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class Inception:
    """The feature space of ``eval.features=inception``, called like the judge: pool3 features [N, 2048] and
    the unbiased logits [N, 1008] (what IS reads), float32, of uint8 images or float ones in [-1, 1]."""

    def __init__(self, path: str | None, device: torch.device) -> None:
        self.path = weights_file(path)
        self.net = load_extractor(self.path).to(device)
        self.sha256 = file_sha256(self.path)
        self.info: dict[str, Any] = {
            "extractor": f"torch-fidelity {torch_fidelity.__version__} {NAME}: pool3 features (2048) for FID, KID "
                         "and precision/recall, unbiased logits (1008) for IS",
            "weights": str(self.path),
            "weights_sha256": self.sha256,
            "weights_official": self.sha256.startswith(OFFICIAL),
            "is_splits": DEFAULTS["isc_splits"],
        }

    def __call__(self, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return in_batches(lambda x: self.net(as_rgb_pixels(x)), images, batch)

    def reference(
        self, split: Split, cache_dir: str, env: DistEnv, embed: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
        """The split's features and logits on every rank, and where they came from.

        Every rank reads the cache, or, if any rank cannot, all ranks ``embed`` (each its share, then
        gathered) and rank 0 writes the file atomically: as the judge is cached.
        """
        key = f"{split.info.name}-{split.name}-{self._content_hash(split)}"
        path = Path(cache_dir).expanduser() / f"{key}.pt"
        cached = _read(path, len(split), env.device)
        if not env.any(cached is None):
            return *cached, {"reference_key": key, "reference_cache": "hit"}
        features, logits = embed()
        if env.is_main:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save({"features": features.cpu(), "logits": logits.cpu()}, path)
            except (OSError, CheckpointError) as e:  # every rank holds the features: a cache miss next time only
                warnings.warn(f"reference features not cached: {e}", stacklevel=1)
        return features, logits, {"reference_key": key, "reference_cache": "computed"}

    def _content_hash(self, split: Split) -> str:
        """SHA-256 of the split's uint8 pixels and labels, its shape, the layers and the weights' hash."""
        shape = "×".join(map(str, split.info.shape))
        digest = hashlib.sha256(f"inception reference v{REFERENCE_VERSION} {NAME} layers={','.join(LAYERS)} "
                                f"weights={self.sha256} shape={shape}".encode())
        digest.update(np.ascontiguousarray(split.images, dtype=np.uint8))
        digest.update(np.ascontiguousarray(split.labels, dtype=np.int64))
        return digest.hexdigest()[:16]


def _read(path: Path, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached features and logits of ``n`` images, or None when missing or unreadable (then embedded again)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        features, logits = state["features"], state["logits"]
    except Exception:  # missing, truncated or foreign file: all mean "embed it again"
        return None
    return (features, logits) if features.shape[0] == logits.shape[0] == n else None


def distances(real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor) -> dict[str, float]:
    """``fid``, ``kid`` and ``kid_std``, ``is`` and ``is_std`` of the fakes, by torch-fidelity's functions with
    its defaults (KID's subsets no larger than the sets); the fakes are its ``input1``, the reference its
    ``input2``, as ``calculate_metrics`` takes them."""
    fake, real = fake.cpu(), real.cpu()
    fid = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    kid = kid_features_to_metric(fake, real, kid_subset_size=kid_subset_size(real.shape[0], fake.shape[0]),
                                 verbose=False)
    isc = isc_features_to_metric(fake_logits.cpu(), DEFAULTS["isc_splits"], DEFAULTS["samples_shuffle"],
                                 DEFAULTS["rng_seed"])
    return {"fid": fid[KEY_METRIC_FID], "kid": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD],
            "is": isc[KEY_METRIC_ISC_MEAN], "is_std": isc[KEY_METRIC_ISC_STD]}
