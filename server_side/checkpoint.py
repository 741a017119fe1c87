"""A GE checkpoint is a directory: ``model.pt`` (weights), ``model.json``
(``CheckpointMeta``: architecture, labels, input normalisation, data hash,
seed, accuracy, the recipe, and how it was compressed or expanded) and
``replay.npz`` (a few generic training glyphs the device replays so that its
gate learns what to leave to GE).

Pretraining, compression and learngene expansion all write checkpoints, so
``server compress``, ``export bundle`` and ``demo --model`` take any of them.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edgetailor.toolkit import __version__, atomic
from edgetailor.toolkit.config import ExpertConfig, PersonalizeConfig, PretrainConfig
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import CheckpointError, ConfigError, SampleError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.server_side.models import build_model

FORMAT = "edgetailor-ge-checkpoint"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class CheckpointMeta:
    """``model.json``. Version 1; files written before the version was
    recorded are version 1 too. Keys a later minor version adds are ignored."""

    VERSION: ClassVar[int] = 1

    arch: str
    labels: list[str]
    input: InputSpec
    widths: list[int] | None = None
    depth: int | None = None
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)          # provenance of the training data
    recipe: dict[str, Any] = field(default_factory=dict)        # the Recipe, as a dict
    generic_accuracy: float | None = None
    train_seconds: float | None = None
    compression: dict[str, Any] | None = None                  # how `server compress` made it
    learngene: dict[str, Any] | None = None                    # how `learngene expand` made it
    training: dict[str, Any] | None = None                     # where it trained: device, processes, images/s
    toolkit_version: str = __version__
    created: str = field(default_factory=_now)
    format: str = FORMAT
    format_version: int = VERSION

    def renewed(self, **changes: Any) -> "CheckpointMeta":
        """A derived model's metadata (compressed, say): this one's, stamped now
        by this toolkit, with ``changes``."""
        return dataclasses.replace(copy.deepcopy(self), created=_now(), toolkit_version=__version__, **changes)

    @property
    def quantized(self) -> bool:
        return bool((self.compression or {}).get("quantization"))

    @property
    def pretrain_config(self) -> PretrainConfig:
        """How this GE was (or would be) trained: also the augmentation recovery training reuses."""
        return PretrainConfig(**self.recipe.get("pretrain", {}))

    @property
    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(**self.recipe.get("experts", {}))

    @property
    def personalize_config(self) -> PersonalizeConfig:
        return PersonalizeConfig(**self.recipe.get("personalize", {}))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input"] = self.input.to_dict()
        for optional in ("compression", "learngene", "train_seconds", "training"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model.json") -> "CheckpointMeta":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{where} is not a GE checkpoint's metadata (format {found!r})",
                                  hint="create a checkpoint with `edgetailor server pretrain --out DIR`")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise CheckpointError(f"{where} is checkpoint format {version!r}; this edgetailor reads up to "
                                  f"{cls.VERSION}",
                                  hint="upgrade edgetailor, or re-create the checkpoint with this version")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{**{k: v for k, v in data.items() if k in known}, "format_version": cls.VERSION,
                          "input": InputSpec.from_dict(data["input"])})
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{where} lacks a required entry: {exc}",
                                  hint="re-run `edgetailor server pretrain`") from None


@dataclass
class GECheckpoint:
    model: torch.nn.Module
    meta: CheckpointMeta
    replay: LabeledImages

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels)

    def normalize(self, images_uint8: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) -> the float (N, 1, H, W) tensor GE was trained on."""
        return torch.from_numpy(self.meta.input.normalize(images_uint8))

    def save(self, out_dir: Path) -> None:
        buffer = io.BytesIO()
        # CPU tensors: a checkpoint trained on a GPU loads (and exports) on a machine without one
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, buffer)
        atomic.write_bytes(out_dir / "model.pt", buffer.getvalue())
        replay = io.BytesIO()
        np.savez_compressed(replay, x=self.replay.images, y=self.replay.labels)
        atomic.write_bytes(out_dir / "replay.npz", replay.getvalue())
        atomic.write_text(out_dir / "model.json", json.dumps(self.meta.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "GECheckpoint":
        model_dir = Path(model_dir)
        meta_path = model_dir / "model.json"
        if not model_dir.is_dir() or not meta_path.exists():
            raise CheckpointError(f"{model_dir} is not a GE checkpoint (no model.json)",
                                  hint="create one with `edgetailor server pretrain --out DIR`")
        try:
            data = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_path} is not valid JSON: {exc}",
                                  hint="re-run `edgetailor server pretrain`") from None
        meta = CheckpointMeta.from_dict(data, str(meta_path))
        try:
            model = build_model(meta.arch, len(meta.labels), meta.widths, meta.depth)
            model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
            with np.load(model_dir / "replay.npz") as archive:
                replay = LabeledImages(archive["x"], archive["y"], list(meta.labels), "replay")
        except (KeyError, FileNotFoundError, RuntimeError, ValueError, OSError, ConfigError, SampleError) as exc:
            why = exc.message if isinstance(exc, (ConfigError, SampleError)) else exc
            raise CheckpointError(f"cannot load the GE checkpoint in {model_dir}: {why}",
                                  hint="re-run `edgetailor server pretrain`") from None
        model.eval()
        return cls(model, meta, replay)


def replay_subset(train: Any, size: int, seed: int) -> LabeledImages:
    """A class-balanced handful of generic training glyphs for the device's
    replay, in memory (``train``: LabeledImages or a server-side SampleStore)."""
    rng = np.random.default_rng(seed + 1)
    per_class = max(1, size // len(train.label_names))
    labels = train.labels
    index = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                            for c in range(len(train.label_names))])
    subset = train.subset(np.sort(index))
    return subset if isinstance(subset, LabeledImages) else subset.to_images()
