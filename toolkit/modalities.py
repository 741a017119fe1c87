"""What kind of input a GE reads, and everything that depends on it: one
``Modality`` per kind, registered in ``MODALITIES``.

The bundle's input spec names its modality and the parameters of its
augmentation (``InputSpec.modality``, ``InputSpec.augment``), so every client
turns raw input into the same samples and augments them the same way:

- ``image``: 28x28 uint8 glyphs made by the bundle's preprocessing
  (``toolkit.preprocess``). Augmented by a small affine warp: rotation, scale
  and shift, drawn per copy.
- ``timeseries``: float32 windows ``(channels, length)`` from a sensor,
  taken as they are (a window of another length or with NaN is refused, not
  cut or padded: that would change what it means). Augmented by jitter
  (Gaussian noise), per-channel scaling, and a smooth time warp
  (Um et al. 2017, "Data augmentation of wearable sensor data").

Augmentation is vectorised and seeded: all copies' random numbers are drawn
as whole arrays, in a fixed order, from the one ``numpy.random.Generator``
the personalization runs on, so the same seed gives the same copies on every
device. Copies are what the device trains LE on besides the originals, while
a user has few samples (``PersonalizeConfig.augment_copies``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.imaging import affine_batch
from edgetailor.toolkit.limits import Limits

if TYPE_CHECKING:
    from edgetailor.toolkit.input_spec import InputSpec

CHUNK = 256  # inputs augmented at once: bounds the temporary arrays (~5 MB for glyphs)


class Modality(Protocol):
    name: str
    sample_dtype: str                  # how samples are stored: "uint8" or "float32"
    default_augment: dict[str, Any]

    def sample_shape(self, spec: "InputSpec") -> tuple[int, ...]:
        """One stored sample's shape (the model's input shape, less any axis the spec adds)."""

    def prepare(self, raw: Any, spec: "InputSpec") -> np.ndarray:
        """Inputs as an app passes them -> validated samples, (N, *sample_shape), ``sample_dtype``."""

    def load(self, path: str | Path, spec: "InputSpec", label_names: list[str] | None = None,
             skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
        """Labelled samples from a file or folder, made as ``prepare`` makes them
        (``labelled=False``: every input labelled 0, for prediction)."""

    def augment(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                params: dict[str, Any]) -> np.ndarray:
        """The originals, then ``copies`` augmented versions of each (copy k of sample i at
        ``len(samples) * (1 + k) + i``), drawn from ``rng`` in a fixed order."""


@dataclass(frozen=True)
class ImageModality:
    name: ClassVar[str] = "image"
    sample_dtype: ClassVar[str] = "uint8"
    # Degrees, relative scale and pixels: a glyph a user writes again differs by about this much.
    default_augment: ClassVar[dict[str, Any]] = {"name": "affine-v1", "rotation": 6.0, "scale": 0.05,
                                                 "translate": 1.0}

    def sample_shape(self, spec: "InputSpec") -> tuple[int, ...]:
        return tuple(spec.shape[1:])

    def prepare(self, raw: Any, spec: "InputSpec") -> np.ndarray:
        from edgetailor.toolkit.preprocess import prepare_images

        return prepare_images(raw, spec.preprocessing()).images

    def load(self, path: str | Path, spec: "InputSpec", label_names: list[str] | None = None,
             skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
        from edgetailor.toolkit.loaders import load_images, load_samples

        if labelled:
            return load_samples(path, label_names, spec.preprocessing(), skip_bad, limits)
        return load_images(path, spec.preprocessing(), skip_bad, limits)

    def augment(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                params: dict[str, Any]) -> np.ndarray:
        """Affine copies, uint8 in and out. The draw order (all rotations, all
        scales, all shifts) is what the mobile SDK and the firmware reproduce."""
        total = len(samples) * copies
        rotation = rng.uniform(-params["rotation"], params["rotation"], total)
        scale = rng.uniform(1.0 - params["scale"], 1.0 + params["scale"], total)
        translate = rng.uniform(-params["translate"], params["translate"], (total, 2))
        out = np.empty((len(samples) * (copies + 1), *samples.shape[1:]), np.uint8)
        out[:len(samples)] = samples
        for start in range(0, total, CHUNK):
            index = np.arange(start, min(total, start + CHUNK))
            source = samples[index % len(samples)].astype(np.float32) / 255.0
            warped = affine_batch(source, rotation[index], scale[index], translate[index])
            out[len(samples) + index] = np.clip(np.rint(warped * 255.0), 0, 255).astype(np.uint8)
        return out


@dataclass(frozen=True)
class TimeSeriesModality:
    name: ClassVar[str] = "timeseries"
    sample_dtype: ClassVar[str] = "float32"
    # Noise and scaling as shares of each channel's spread in the window; the
    # warp moves each of ``warp_knots`` inner knots of time by up to
    # ``warp`` of the window's length between knots.
    default_augment: ClassVar[dict[str, Any]] = {"name": "sensor-v1", "jitter": 0.03, "scaling": 0.1,
                                                 "warp": 0.2, "warp_knots": 4}

    def sample_shape(self, spec: "InputSpec") -> tuple[int, ...]:
        return tuple(spec.shape)

    def prepare(self, raw: Any, spec: "InputSpec") -> np.ndarray:
        """Windows (N, channels, length), or (N, length) for one channel; any real dtype."""
        if isinstance(raw, (list, tuple)):
            try:
                raw = np.stack([np.asarray(w) for w in raw]) if len(raw) else np.zeros((0, *spec.shape))
            except ValueError:
                shapes = sorted({np.shape(w) for w in raw})
                raise SampleError(f"the windows have different shapes {shapes[:4]}; each must be "
                                  f"{tuple(spec.shape)}") from None
        array = np.asarray(raw)
        channels, length = spec.shape
        if array.ndim == 2 and channels == 1:
            array = array[:, None, :]
        if array.ndim != 3 or array.shape[1:] != (channels, length):
            got = array.shape[1:] if array.ndim >= 2 else array.shape
            raise SampleError(f"a window must be ({channels} channels, {length} steps); got windows of shape "
                              f"{tuple(got)}",
                              hint=f"cut your recordings into windows of exactly {length} steps with {channels} "
                                   "channel(s), as the model was trained")
        if array.dtype.kind not in "fiu":
            raise SampleError(f"windows must hold numbers, got dtype {array.dtype}")
        array = array.astype(np.float32)
        bad = ~np.isfinite(array).all(axis=(1, 2))
        if bad.any():
            raise SampleError(f"{int(bad.sum())} window(s) hold NaN or infinite values (the first is window "
                              f"{int(np.flatnonzero(bad)[0])})",
                              hint="drop or repair those windows; a gap in a recording is not a value")
        return array

    def load(self, path: str | Path, spec: "InputSpec", label_names: list[str] | None = None,
             skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
        from edgetailor.toolkit.windows import load_windows

        return load_windows(path, tuple(spec.shape), label_names, skip_bad, limits, labelled)

    def augment(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                params: dict[str, Any]) -> np.ndarray:
        """Jittered, scaled and time-warped copies, float32. Drawn: the scales
        (copies x channels), the noise (copies x channels x length), the knot
        shifts (copies x knots), each as one array."""
        n, channels, length = samples.shape
        total = n * copies
        knots = int(params["warp_knots"])
        scales = rng.normal(1.0, params["scaling"], (total, channels)).astype(np.float32)
        noise = rng.standard_normal((total, channels, length), dtype=np.float32)
        shifts = rng.uniform(-params["warp"], params["warp"], (total, knots))
        out = np.empty((n * (copies + 1), channels, length), np.float32)
        out[:n] = samples
        spread = samples.std(axis=2, keepdims=True).astype(np.float32)           # (n, channels, 1)
        step = (length - 1) / (knots + 1)
        anchors = np.arange(knots + 2) * step                                    # knot times, ends fixed
        grid = np.arange(length, dtype=np.float64)
        for start in range(0, total, CHUNK):
            index = np.arange(start, min(total, start + CHUNK))
            source = samples[index % n]
            # Warp: inner knots moved by up to `warp` of the knot spacing; times stay increasing.
            moved = anchors[None, :].repeat(len(index), 0)
            moved[:, 1:-1] += shifts[index] * step
            warped = np.empty_like(source)
            for row, (times, series) in enumerate(zip(moved, source)):
                where = np.interp(grid, anchors, times)                         # output step -> source time
                for c in range(channels):
                    warped[row, c] = np.interp(where, grid, series[c])
            warped *= scales[index][:, :, None]
            warped += noise[index] * params["jitter"] * spread[index % n]
            out[n + index] = warped
        return out


MODALITIES: dict[str, Modality] = {m.name: m for m in (ImageModality(), TimeSeriesModality())}


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise SampleError(f"unknown input modality {name!r}; this toolkit knows {', '.join(MODALITIES)}",
                          hint="upgrade edgetailor, or re-export the bundle") from None


def augment_params(spec: "InputSpec") -> dict[str, Any]:
    """The bundle's augmentation parameters, the modality's defaults for what it leaves out."""
    modality = get_modality(spec.modality)
    return {**modality.default_augment, **(spec.augment or {})}
