"""What GE expects as input, and the one normalisation every side applies.

A sample is what the device stores: a 28x28 uint8 glyph (modality
``image``), or a float32 sensor window (``timeseries``); ``toolkit.modalities``
says how each kind is made and augmented. GE reads samples scaled by
``scale`` (uint8 -> [0, 1] for glyphs) and standardised with the training
set's mean and std. The checkpoint or the user's export records those
numbers, the bundle carries them, and the server (training, evaluation,
export checks) and the device (inference, personalization) all normalise
through ``normalize`` below, so that the inputs GE sees on the phone are the
ones it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetailor.toolkit.preprocess import DEFAULT, Preprocessing, from_spec


@dataclass(frozen=True)
class InputSpec:
    shape: list[int]                   # GE's input for one sample: (1, height, width) or (channels, length)
    scale: float                       # sample -> model units before standardising (uint8 -> [0, 1]: 1/255)
    mean: float                        # of the scaled training samples
    std: float
    dtype: str = "uint8"               # how samples are stored: uint8 glyphs, float32 windows
    ink: str = "white-on-black"
    # How any image becomes a sample (toolkit.preprocess): a dict with the
    # preprocessing's name and parameters, so every client applies it
    # identically; a string or None in bundles from before 0.2.
    preprocess: dict[str, Any] | str | None = field(default=None)
    modality: str = "image"            # toolkit.modalities.MODALITIES
    # The modality's augmentation parameters (toolkit.modalities); None: its defaults.
    augment: dict[str, Any] | None = None

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

    @classmethod
    def for_timeseries(cls, channels: int, length: int, mean: float = 0.0, std: float = 1.0,
                       augment: dict[str, Any] | None = None) -> "InputSpec":
        """The spec of a model reading float windows of ``channels`` x ``length``
        steps, standardised with ``mean`` and ``std`` (0 and 1: as they are)."""
        if channels < 1 or length < 2:
            raise ValueError(f"a window needs at least 1 channel and 2 steps, got {channels} x {length}")
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"the input normalisation needs a finite mean and a std > 0, got {mean} and {std}")
        return cls(shape=[int(channels), int(length)], scale=1.0, mean=float(mean), std=float(std),
                   dtype="float32", ink="none", modality="timeseries", augment=augment)

    @classmethod
    def for_audio(cls, sample_rate: int = 16000, seconds: float = 1.0, frontend: dict[str, Any] | None = None,
                  augment: dict[str, Any] | None = None) -> "InputSpec":
        """The spec of a model hearing mono clips of ``seconds`` at
        ``sample_rate``, as float in [-1, 1]. The model's program begins with
        its front-end (e.g. ``server_side.frontends.LogMel``), described by
        ``frontend``, so the clips reach it as they are: no standardising here."""
        length = int(round(sample_rate * seconds))
        if sample_rate < 1000 or length < 256:
            raise ValueError(f"audio needs a sample rate >= 1000 Hz and clips of >= 256 samples, got {sample_rate} "
                             f"Hz and {length}")
        preprocess = {"name": "clip-v1", "sample_rate": int(sample_rate), "length": length,
                      **({"frontend": frontend} if frontend else {})}
        return cls(shape=[1, length], scale=1.0, mean=0.0, std=1.0, dtype="float32", ink="none",
                   preprocess=preprocess, modality="audio", augment=augment)

    @property
    def is_image(self) -> bool:
        return self.modality == "image"

    def preprocessing(self) -> Preprocessing:
        if not self.is_image:
            raise ValueError(f"a {self.modality} input has no image preprocessing")
        return from_spec(self.preprocess)

    def normalize(self, samples: np.ndarray) -> np.ndarray:
        """Samples (N, *sample shape) -> float32 (N, *shape), as GE was trained:
        uint8 glyphs (N, H, W) become (N, 1, H, W)."""
        # Divided by 1/scale (255), not multiplied by scale: that is how ``fit``
        # scaled GE's training images, and x / 255 and x * (1/255) differ in the
        # last bit for half the pixel values, enough to change a retrained GE.
        x = np.asarray(samples).astype(np.float32) / np.float32(1.0 / self.scale)
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        # reshape, not x[:, None]: a broadcast axis has stride 0, which ExecuTorch's exporter refuses
        if self.is_image:
            return x.reshape(len(x), 1, *x.shape[1:])      # glyphs of any size (the firmware's lookup tables)
        return x.reshape(len(x), *self.shape)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("preprocess", "augment"):
            if data[key] is None:
                del data[key]
        if self.is_image:
            del data["modality"]     # image bundles stay readable by clients that predate modalities
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
