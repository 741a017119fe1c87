"""What export knows about a trainable part (LE or GN), and the interface
every way of writing its training programs implements.

A ``TrainablePart`` is the torch module plus how the device calls it; a
``TrainingExporter`` writes one training kind of one format
(``toolkit.formats``) for it. They are registered in ``export.trainable``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class AdamWSettings:
    """The update every training program applies: ``torch.optim.AdamW``'s,
    at onnxruntime-training's settings (betas 0.9/0.999, eps 1e-6, no weight
    decay); the parity backends place eps as onnxruntime-training does, a
    difference invisible at these scales."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "adamw", **asdict(self), "betas": list(self.betas)}


@dataclass
class TrainablePart:
    """The module and how it is called: inputs of the given widths (the
    batch is the first dimension), one logits output."""

    key: str                        # manifest key: local_expert or gating_network
    directory: str                  # folder in the bundle: le or gn
    module: nn.Module
    input_dims: list[int]           # width of each input
    input_names: list[str]
    output: str
    num_classes: int
    max_batch: int                  # rows per training step
    learning_rate: float            # the device's default, used to check the programs
    optimizer: AdamWSettings = field(default_factory=AdamWSettings)

    def example(self, batch: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(batch, d, generator=generator) for d in self.input_dims]
        target = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return inputs, target

    def parameters(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self.module.named_parameters()}

    @property
    def parameter_order(self) -> list[str]:
        """A flat parameter vector's order (the manifest's): sorted by name."""
        return sorted(name for name, _ in self.module.named_parameters())

    def flat_parameters(self) -> torch.Tensor:
        named = dict(self.module.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n in self.parameter_order])


class TrainingExporter(Protocol):
    format: str    # the format's name in the registry (toolkit.formats.FORMATS)
    kind: str      # the training kind it writes (a key of that format's training_kinds)

    def export(self, part: TrainablePart, out_dir: Path) -> dict[str, str]:
        """Write the part's program(s) under ``out_dir`` and check them against
        torch; returns {role: path relative to the bundle}."""
