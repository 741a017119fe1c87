"""What a device backend provides: run GE, train a bundle's trainable part,
and run a trained part from the bytes the state store keeps."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from toolkit.bundle import Bundle


class GlobalExpertRunner(Protocol):
    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Normalised (N, 1, H, W) float32 -> logits (N, C) and features by tap name."""


class PartTrainer(Protocol):
    """One trainable part (LE or GN) being trained on the device."""

    def set_learning_rate(self, lr: float) -> None: ...

    def step(self, *inputs: np.ndarray) -> float:
        """One optimiser step on a batch (model inputs, then the loss target); returns the loss."""

    def export(self) -> bytes:
        """The trained part as a self-contained inference model."""


class TrainedPart(Protocol):
    def __call__(self, *inputs: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str

    def load_global_expert(self, bundle: Bundle) -> GlobalExpertRunner: ...

    def trainer(self, bundle: Bundle, part: str) -> PartTrainer:
        """``part`` is the manifest key: ``local_expert`` or ``gating_network``."""

    def load_trained(self, model: bytes, input_names: list[str]) -> TrainedPart: ...
