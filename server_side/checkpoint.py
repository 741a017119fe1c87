"""A GE checkpoint is a directory: ``model.pt`` (weights), ``model.json``
(architecture, labels, input normalisation, data hash, seed, accuracy, the
recipe) and ``replay.npz`` (a few generic training glyphs the device replays
so that its gate learns what to leave to GE)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import atomic
from toolkit.data import LabeledImages
from toolkit.errors import CheckpointError
from toolkit.models import build_model

FORMAT = "edgetailor-ge-checkpoint"


@dataclass
class GECheckpoint:
    model: torch.nn.Module
    meta: dict[str, Any]
    replay: LabeledImages

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def normalize(self, images_uint8: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) -> the float (N, 1, H, W) tensor GE was trained on."""
        norm = self.meta["input"]
        x = torch.as_tensor(images_uint8, dtype=torch.float32) * norm["scale"]
        return ((x - norm["mean"]) / norm["std"]).unsqueeze(1)

    def save(self, out_dir: Path) -> None:
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        atomic.write_bytes(out_dir / "model.pt", buffer.getvalue())
        replay = io.BytesIO()
        np.savez_compressed(replay, x=self.replay.images, y=self.replay.labels)
        atomic.write_bytes(out_dir / "replay.npz", replay.getvalue())
        atomic.write_text(out_dir / "model.json", json.dumps(self.meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "GECheckpoint":
        model_dir = Path(model_dir)
        meta_path = model_dir / "model.json"
        if not model_dir.is_dir() or not meta_path.exists():
            raise CheckpointError(f"{model_dir} is not a GE checkpoint (no model.json)",
                                  hint="create one with `edgetailor server pretrain --out DIR`")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{model_dir} is not a GE checkpoint (model.json format is {meta.get('format')!r})")
        try:
            model = build_model(meta["arch"], len(meta["labels"]), meta.get("widths"), meta.get("depth"))
            model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
            with np.load(model_dir / "replay.npz") as archive:
                replay = LabeledImages(archive["x"], archive["y"], list(meta["labels"]), "replay")
        except (KeyError, FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"cannot load the GE checkpoint in {model_dir}: {exc}",
                                  hint="re-run `edgetailor server pretrain`") from None
        model.eval()
        return cls(model, meta, replay)
