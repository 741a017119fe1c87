"""What GE expects as input, and the one normalisation every side applies.

GE is trained on uint8 glyphs scaled to [0, 1] and standardised with the
training set's mean and std. The checkpoint records those numbers, the bundle
carries them, and the server (training, evaluation, export checks) and the
device (inference, personalization) all normalise through ``normalize``
below, so that the inputs GE sees on the phone are the ones it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetailor.toolkit.preprocess import DEFAULT, Preprocessing, from_spec


@dataclass(frozen=True)
class InputSpec:
    shape: list[int]                   # (channels, height, width) of one input
    scale: float                       # uint8 -> [0, 1]
    mean: float                        # of the scaled training images
    std: float
    dtype: str = "uint8"
    ink: str = "white-on-black"
    # How any image becomes a sample (toolkit.preprocess): a dict with the
    # preprocessing's name and parameters, so every client applies it
    # identically; a string or None in bundles from before 0.2.
    preprocess: dict[str, Any] | str | None = field(default=None)

    @classmethod
    def fit(cls, images: np.ndarray, preprocess: dict[str, Any] | None = None) -> "InputSpec":
        """The spec of GE trained on ``images`` (uint8 samples, (N, H, W))."""
        scaled = images.astype(np.float32) / 255.0
        return cls(shape=[1, *images.shape[1:]], scale=1.0 / 255.0, mean=float(scaled.mean()),
                   std=float(scaled.std()), preprocess=preprocess or DEFAULT.to_dict())

    @classmethod
    def for_glyphs(cls, mean: float = 0.0, std: float = 1.0, preprocess: dict[str, Any] | None = None) -> "InputSpec":
        """The spec of a model trained on 28x28 glyphs made by ``preprocess``
        (default glyph-v1), scaled to [0, 1] and then standardised with
        ``mean`` and ``std``: 0 and 1 for torchvision's ``ToTensor()`` alone,
        the two numbers of its ``Normalize`` otherwise."""
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"the input normalisation needs a finite mean and a std > 0, got {mean} and {std}")
        preprocessing = from_spec(preprocess or DEFAULT.to_dict())
        size = getattr(preprocessing, "canvas", 28)
        return cls(shape=[1, size, size], scale=1.0 / 255.0, mean=float(mean), std=float(std),
                   preprocess=preprocessing.to_dict())

    def preprocessing(self) -> Preprocessing:
        return from_spec(self.preprocess)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) -> float32 (N, 1, H, W), as GE was trained."""
        # Divided by 1/scale (255), not multiplied by scale: that is how ``fit``
        # scaled GE's training images, and x / 255 and x * (1/255) differ in the
        # last bit for half the pixel values, enough to change a retrained GE.
        x = np.asarray(images).astype(np.float32) / np.float32(1.0 / self.scale)
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        # reshape, not x[:, None]: a broadcast axis has stride 0, which ExecuTorch's exporter refuses
        return x.reshape(len(x), 1, *x.shape[1:])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["preprocess"] is None:
            del data["preprocess"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
