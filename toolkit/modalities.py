"""What kind of input a GE reads, and everything that depends on it: one
``Modality`` per kind, registered in ``MODALITIES``.

The bundle's input spec names its modality and the parameters of its
augmentation (``InputSpec.modality``, ``InputSpec.augment``), so every client
turns raw input into the same samples and augments them the same way:

- ``image``: 28x28 uint8 glyphs made by the bundle's preprocessing
  (``toolkit.preprocess``). Augmented by a small affine warp: rotation, scale
  and shift, drawn per copy.
- ``audio``: mono float32 clips ``(1, length)`` at the bundle's sample rate,
  read from WAV files with the checks of ``toolkit.audio``; GE's program
  begins with the log-mel front-end, so the device computes exactly the
  features training saw. Augmented by a time shift, gain, noise mixed in at
  a random SNR, and SpecAugment-style time and frequency masks.
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
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol

import numpy as np

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import SampleError
from edgetailor.toolkit.imaging import affine_batch
from edgetailor.toolkit.limits import Limits

if TYPE_CHECKING:
    from edgetailor.toolkit.input_spec import InputSpec

CHUNK = 256  # inputs augmented at once: bounds the temporary arrays (~5 MB for glyphs)
AUDIO_CHUNK = 8  # clips augmented at once: their temporaries (~6 MB) stay below GE's; 32 cost 20 MB of peak RSS


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

    def augment_chunks(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                       params: dict[str, Any]) -> Iterator[np.ndarray]:
        """The originals, then ``copies`` augmented versions of each (copy k of
        sample i at row ``len(samples) * (1 + k) + i`` of the chunks joined),
        drawn from ``rng`` in a fixed order; chunk by chunk, so that the
        device can run GE on each and keep only its features."""

    def augment(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                params: dict[str, Any]) -> np.ndarray:
        """``augment_chunks`` joined into one array."""


class ChunkedAugmentation:
    """``augment`` for a modality that writes ``augment_chunks``."""

    def augment(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                params: dict[str, Any]) -> np.ndarray:
        return np.concatenate(list(self.augment_chunks(samples, copies, rng, params)))


@dataclass(frozen=True)
class ImageModality(ChunkedAugmentation):
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

    def augment_chunks(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                       params: dict[str, Any]) -> Iterator[np.ndarray]:
        """Affine copies, uint8 in and out. The draw order (all rotations, all
        scales, all shifts) is what the mobile SDK and the firmware reproduce."""
        total = len(samples) * copies
        rotation = rng.uniform(-params["rotation"], params["rotation"], total)
        scale = rng.uniform(1.0 - params["scale"], 1.0 + params["scale"], total)
        translate = rng.uniform(-params["translate"], params["translate"], (total, 2))
        yield samples
        for start in range(0, total, CHUNK):
            index = np.arange(start, min(total, start + CHUNK))
            source = samples[index % len(samples)].astype(np.float32) / 255.0
            warped = affine_batch(source, rotation[index], scale[index], translate[index])
            yield np.clip(np.rint(warped * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class TimeSeriesModality(ChunkedAugmentation):
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

    def augment_chunks(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                       params: dict[str, Any]) -> Iterator[np.ndarray]:
        """Jittered, scaled and time-warped copies, float32. Drawn: the scales
        (copies x channels), the noise (copies x channels x length), the knot
        shifts (copies x knots), each as one array."""
        n, channels, length = samples.shape
        total = n * copies
        knots = int(params["warp_knots"])
        # float32 normals (numpy's single-precision ziggurat), the one normal draw the mobile SDK reproduces
        scales = 1.0 + params["scaling"] * rng.standard_normal((total, channels), dtype=np.float32)
        noise = rng.standard_normal((total, channels, length), dtype=np.float32)
        shifts = rng.uniform(-params["warp"], params["warp"], (total, knots))
        yield samples.astype(np.float32, copy=False)
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
            yield warped


@dataclass(frozen=True)
class AudioModality(ChunkedAugmentation):
    name: ClassVar[str] = "audio"
    sample_dtype: ClassVar[str] = "float32"
    # Shift and time masks as shares of the clip, gain in dB, noise mixed in at an SNR in dB, frequency
    # masks as shares of the band (SpecAugment's masks, Park et al. 2019, applied to the waveform so that
    # the log-mel front-end inside GE sees them as it would on a spectrogram).
    default_augment: ClassVar[dict[str, Any]] = {"name": "audio-v1", "shift": 0.1, "gain_db": 6.0,
                                                 "snr_db": [15.0, 35.0], "time_mask": 0.08, "freq_mask": 0.12}

    def sample_shape(self, spec: "InputSpec") -> tuple[int, ...]:
        return tuple(spec.shape)

    def prepare(self, raw: Any, spec: "InputSpec") -> np.ndarray:
        """Clips (N, length) or (N, 1, length), or a list of 1-D clips of any
        length (centred or cut as ``toolkit.audio.fit_length`` does); float in
        [-1, 1] or int16, mono, at the bundle's sample rate."""
        from edgetailor.toolkit.audio import check_clip, fit_length

        length = spec.shape[-1]
        if isinstance(raw, (list, tuple)):
            clips = [np.asarray(c) for c in raw]
            if any(c.ndim != 1 for c in clips):
                raise SampleError("each clip in a list must be 1-D mono samples",
                                  hint="mix stereo clips down to one channel first")
        else:
            array = np.asarray(raw)
            if array.ndim == 3 and array.shape[1] == 1:
                array = array[:, 0]
            if array.ndim != 2:
                raise SampleError(f"clips must be (N, samples) mono, got shape {array.shape}",
                                  hint="give a batch of mono clips, or a list of 1-D clips")
            clips = list(array)
        out = np.empty((len(clips), 1, length), np.float32)
        for i, clip in enumerate(clips):
            if clip.dtype.kind not in "fiu":
                raise SampleError(f"clip {i} holds {clip.dtype}, not audio samples")
            scaled = clip.astype(np.float32) / (32768.0 if clip.dtype == np.int16 else 1.0)
            out[i, 0] = fit_length(check_clip(scaled, f"clip {i}"), length)
        return out

    def load(self, path: str | Path, spec: "InputSpec", label_names: list[str] | None = None,
             skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
        from edgetailor.toolkit.audio import load_clips

        return load_clips(path, int(spec.preprocess["sample_rate"]), spec.shape[-1], label_names, skip_bad, limits,
                          labelled)

    def augment_chunks(self, samples: np.ndarray, copies: int, rng: np.random.Generator,
                       params: dict[str, Any]) -> Iterator[np.ndarray]:
        """Shifted, gained, noisy, time- and frequency-masked copies, float32.
        Drawn, each as one array: shifts, gains, SNRs, time-mask starts,
        frequency-mask starts; then the noise, ``AUDIO_CHUNK`` copies at a
        time (a whole array of it would be as large as the copies)."""
        n, _, length = samples.shape
        total = n * copies
        most = int(params["shift"] * length)
        shifts = rng.integers(-most, most + 1, total)
        gains = 10.0 ** (rng.uniform(-params["gain_db"], params["gain_db"], total) / 20.0)
        low, high = params["snr_db"]
        snr = rng.uniform(low, high, total)
        mask = int(params["time_mask"] * length)
        mask_start = rng.integers(0, length - mask + 1, total)
        bins = length // 2 + 1
        band = int(params["freq_mask"] * bins)
        band_start = rng.integers(0, bins - band + 1, total)
        yield samples.astype(np.float32, copy=False)
        steps = np.arange(length)
        for start in range(0, total, AUDIO_CHUNK):
            index = np.arange(start, min(total, start + AUDIO_CHUNK))
            noise = rng.standard_normal((len(index), length), dtype=np.float32)   # drawn chunk by chunk, last
            source = samples[index % n, 0]
            where = steps[None, :] - shifts[index, None]                 # zero-filled shift
            inside = (where >= 0) & (where < length)
            clip = np.where(inside, np.take_along_axis(source, np.clip(where, 0, length - 1), axis=1), 0.0)
            clip *= gains[index, None]
            power = np.sqrt(np.mean(clip ** 2, axis=1, keepdims=True)) / 10.0 ** (snr[index, None] / 20.0)
            clip += noise * power
            clip[(steps[None, :] >= mask_start[index, None]) & (steps[None, :] < mask_start[index, None] + mask)] = 0
            spectrum = np.fft.rfft(clip, axis=1)
            freqs = np.arange(bins)[None, :]
            spectrum[(freqs >= band_start[index, None]) & (freqs < band_start[index, None] + band)] = 0
            yield np.clip(np.fft.irfft(spectrum, n=length, axis=1), -1.0, 1.0).astype(np.float32)[:, None, :]


MODALITIES: dict[str, Modality] = {m.name: m for m in (ImageModality(), TimeSeriesModality(), AudioModality())}


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


def check_augment(spec: "InputSpec") -> None:
    """Refuse augmentation parameters the modality does not have, of the wrong kind, or out of range
    (ValueError), before they reach a device. A glyph bundle keeps the defaults: the mobile SDK and the
    firmware apply them as constants."""
    modality = get_modality(spec.modality)
    if spec.augment is None:
        return
    if spec.is_image and {**modality.default_augment, **spec.augment} != modality.default_augment:
        raise ValueError("a glyph bundle's augmentation is fixed (the mobile SDK and the firmware apply "
                         f"{modality.default_augment}); leave input.augment out")
    defaults = modality.default_augment
    unknown = sorted(set(spec.augment) - set(defaults))
    if unknown:
        raise ValueError(f"input.augment has key(s) {', '.join(unknown)} that {modality.name} augmentation lacks; "
                         f"it has: {', '.join(sorted(defaults))}")
    if spec.augment.get("name", defaults["name"]) != defaults["name"]:
        raise ValueError(f"input.augment names {spec.augment['name']!r}; {modality.name} inputs are augmented "
                         f"by {defaults['name']!r}")
    for key, value in augment_params(spec).items():
        if key == "name":
            continue
        values = value if isinstance(defaults[key], list) else [value]
        if (isinstance(defaults[key], list) and (not isinstance(value, list) or len(value) != len(defaults[key]))) \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and np.isfinite(v)
                           for v in values):
            raise ValueError(f"input.augment.{key} must be {'a pair of' if isinstance(defaults[key], list) else 'a'} "
                             f"finite number(s) >= 0 like {defaults[key]!r}, got {value!r}")
    params = augment_params(spec)
    fractions = [k for k in ("shift", "time_mask", "freq_mask", "scale") if k in params and params[k] >= 1]
    if fractions or params.get("warp", 0) >= 0.5:
        raise ValueError(f"input.augment.{(fractions or ['warp'])[0]} is a share of the input and must be under "
                         f"{'0.5' if not fractions else '1'}")
