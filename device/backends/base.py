"""What a device backend provides: run GE, train a bundle's trainable parts
(LE, GN), and run a trained part again from its stored weights.

Trained parts are stored as their weights (an ``.npz`` of the part's own
parameter names, checked against the manifest), not as a runtime's model
file: any training backend can run a personalization that another one
trained, so switching the app's runtime keeps the user's personalization.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BundleError, StateError
from edgetailor.toolkit.manifest import GlobalExpertSpec


class GlobalExpertRunner(Protocol):
    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Normalised (N, 1, H, W) float32 -> logits (N, C) and features by tap name."""


class PartTrainer(Protocol):
    """One trainable part (LE or GN) being trained on the device."""

    def set_learning_rate(self, lr: float) -> None: ...

    def step(self, *inputs: np.ndarray) -> float:
        """One optimiser step on a batch (model inputs, then the int64 targets); returns the loss."""

    def weights(self) -> dict[str, np.ndarray]:
        """The trained parameters by the part's own names (as in the manifest)."""


class TrainedPart(Protocol):
    def __call__(self, *inputs: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    """Which format a backend reads and whether it trains are registered
    once, in ``backends.BACKENDS`` and the format registry."""

    name: str

    def load_global_expert(self, bundle: Bundle) -> GlobalExpertRunner: ...

    def trainer(self, bundle: Bundle, part: str) -> PartTrainer:
        """``part`` is the manifest key: ``local_expert`` or ``gating_network``."""

    def load_trained(self, bundle: Bundle, part: str, blob: bytes) -> TrainedPart:
        """A stored trained part (``pack_weights``'s bytes) ready to run."""


def split_outputs(outputs: list[np.ndarray], spec: GlobalExpertSpec) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Positional GE outputs (logits, then the taps, in the manifest's order) -> logits, features."""
    order = spec.output_order
    if len(outputs) != len(order):
        raise BundleError(f"GE returned {len(outputs)} outputs, the manifest lists {order}",
                          hint="the GE file does not belong to this manifest; re-export the bundle")
    return outputs[0], dict(zip(order[1:], outputs[1:]))


def pack_weights(weights: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value, dtype=np.float32) for name, value in weights.items()})
    return buffer.getvalue()


def is_weights_blob(blob: bytes) -> bool:
    """Weights are an .npz (a zip); personalizations stored before version 0.2 are ONNX models."""
    return blob[:2] == b"PK"


def unpack_weights(blob: bytes, bundle: Bundle, part: str, backend: str) -> dict[str, np.ndarray]:
    """Stored weights, checked against the part's parameters in the manifest."""
    if not is_weights_blob(blob):
        raise StateError(f"the stored {part.replace('_', ' ')} is an ONNX model from edgetailor 0.1, which "
                         f"only the ort-training backend runs (this runtime trains with {backend})",
                         hint="personalize again (the samples are kept), or open with --backend ort-training")
    expected = bundle.manifest.part(part).parameters  # absent in version-1 manifests
    try:
        with np.load(io.BytesIO(blob)) as archive:
            weights = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise StateError(f"the stored {part.replace('_', ' ')} weights are unreadable: {exc}",
                         hint="reset the personalization (edgetailor device reset --keep-samples) "
                              "and personalize again") from None
    shapes = {name: list(value.shape) for name, value in weights.items()}
    if expected is not None and shapes != expected:
        raise StateError(f"the stored {part.replace('_', ' ')} has parameters {shapes}, this bundle's has {expected}",
                         hint="personalize again for this bundle")
    if not all(np.isfinite(v).all() for v in weights.values()):
        raise StateError(f"the stored {part.replace('_', ' ')} weights contain NaN or infinity",
                         hint="personalize again")
    return weights
