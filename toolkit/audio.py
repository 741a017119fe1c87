"""Reading labelled audio clips, and the mel filterbank the log-mel front-end uses.

A clip becomes a sample of the ``audio`` modality: mono float32 in [-1, 1] at
the bundle's sample rate, exactly ``length`` samples (one second of 16 kHz by
default). Containers:
- a folder with one sub-folder per label, holding ``.wav`` files;
- for prediction, a folder of ``.wav`` files, or one ``.wav``;
- an ``.npz`` with ``x`` (N, length) float in [-1, 1] (or int16) and ``y``.

WAV files are read with the standard library's ``wave`` (16-bit, 8-bit,
24-bit and 32-bit integer PCM). What would silently change what a model hears
is refused, the file named:
- another sample rate (resampling is not ours to guess: resample with the
  tool that recorded it);
- more than one channel;
- an empty or silent clip;
- a clipped one: more than ``CLIPPED_SHARE`` of its samples at full scale.

A clip shorter than ``length`` is centred in silence; a longer one is cut to
the ``length`` samples with the most energy, where a spoken word is. Like
the glyph preprocessing, this is the one path every input takes.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from edgetailor.toolkit.arrayfiles import NpzArchive
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.limits import Limits, current_limits
from edgetailor.toolkit.loaders import UNLABELLED, labelled_files, read_each, read_labelled_npz, relabel

CLIPPED_SHARE = 0.01      # of samples at full scale: a clipped recording, whose spectrum is smeared
SILENT_PEAK = 1e-3        # a clip whose loudest sample is below this holds no sound
FORMATS_HINT = "give a folder with one sub-folder per label holding mono .wav files, or an .npz with x and y"


def read_wav(path: str | Path, sample_rate: int, limits: Limits | None = None) -> np.ndarray:
    """One mono WAV file as float32 in [-1, 1], checked (module doc)."""
    path, limits = Path(path), current_limits(limits)
    limits.check("max_sample_bytes", path.stat().st_size, f"{path}: the file's size")
    try:
        with wave.open(str(path), "rb") as reader:
            channels, width, rate, frames = (reader.getnchannels(), reader.getsampwidth(), reader.getframerate(),
                                             reader.getnframes())
            raw = reader.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataFormatError(f"{path} is not a readable PCM WAV file: {exc}",
                              hint="save clips as 16-bit PCM WAV (e.g. sox in.x -b 16 out.wav)") from None
    if channels != 1:
        raise SampleError(f"{path} has {channels} channels; the model hears mono",
                          hint="mix down to one channel (e.g. sox in.wav -c 1 out.wav)")
    if rate != sample_rate:
        raise SampleError(f"{path} is sampled at {rate} Hz; the bundle's model hears {sample_rate} Hz",
                          hint=f"resample it to {sample_rate} Hz (e.g. sox in.wav -r {sample_rate} out.wav)")
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(np.iinfo(kind).max + 1)
    elif width == 3:
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = bytes3[:, 0] | (bytes3[:, 1] << 8) | (bytes3[:, 2] << 16)
        samples = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    else:
        raise DataFormatError(f"{path} has {8 * width}-bit samples, which no WAV reader here decodes")
    return check_clip(samples, str(path))


def check_clip(samples: np.ndarray, where: str) -> np.ndarray:
    """Refuse an empty, silent, clipped or non-finite clip (float32 in [-1, 1])."""
    if samples.size == 0:
        raise SampleError(f"{where} is empty (no samples)", hint="record the clip again")
    if not np.isfinite(samples).all():
        raise SampleError(f"{where} holds NaN or infinite values")
    peak = float(np.abs(samples).max())
    if peak > 1.0 + 1e-6:
        raise SampleError(f"{where} goes to {peak:.2f}; audio samples lie in [-1, 1]",
                          hint="scale float audio to [-1, 1], or give int16 samples")
    if peak < SILENT_PEAK:
        raise SampleError(f"{where} is silent (loudest sample {peak:.1e})", hint="record the clip again")
    clipped = float((np.abs(samples) >= 0.999).mean())
    if clipped > CLIPPED_SHARE:
        raise SampleError(f"{where} is clipped: {clipped:.1%} of its samples are at full scale",
                          hint="record it again at a lower gain; clipping smears the spectrum the model hears")
    return samples


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """``length`` samples: a short clip centred in silence, a long one cut to its loudest stretch."""
    if len(samples) <= length:
        out = np.zeros(length, np.float32)
        start = (length - len(samples)) // 2
        out[start:start + len(samples)] = samples
        return out
    energy = np.concatenate([[0.0], np.cumsum(samples.astype(np.float64) ** 2)])
    window = energy[length:] - energy[:-length]
    start = int(np.argmax(window))
    return samples[start:start + length].astype(np.float32)


def load_clips(path: str | Path, sample_rate: int, length: int, label_names: list[str] | None = None,
               skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
    """Clips at ``path`` as (N, 1, length) float32 samples (module doc)."""
    path, limits = Path(path), current_limits(limits)
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --samples path")
    if path.suffix == ".npz":
        data = _load_npz(path, length, skip_bad, limits, labelled)
    elif path.is_dir():
        data = _load_folder(path, sample_rate, length, skip_bad, limits, labelled)
    elif path.suffix.lower() == ".wav" and not labelled:
        clip = fit_length(read_wav(path, sample_rate, limits), length)
        data = LabeledImages(clip[None, None], np.zeros(1, np.int64), list(UNLABELLED), str(path))
    else:
        raise DataFormatError(f"cannot read labelled clips from {path}", hint=FORMATS_HINT)
    if labelled and label_names is not None:
        data = relabel(data, label_names)
    return data


def _load_folder(root: Path, sample_rate: int, length: int, skip_bad: bool, limits: Limits,
                 labelled: bool) -> LabeledImages:
    files, names, notes = labelled_files(root, {".wav"}, labelled, limits, ".wav clips")
    clips, labels, left_out = read_each(files, root, lambda file: fit_length(read_wav(file, sample_rate, limits),
                                                                            length),
                                        skip_bad, ".wav clips", FORMATS_HINT)
    return LabeledImages(clips[:, None, :], labels, names, str(root), notes=notes + left_out)


def _load_npz(path: Path, length: int, skip_bad: bool, limits: Limits, labelled: bool) -> LabeledImages:
    def check_x(header) -> int:
        if len(header.shape) not in (2, 3) or header.shape[-1] != length or header.dtype.kind not in "fi" or (
                len(header.shape) == 3 and header.shape[1] != 1):
            raise SampleError(f"{path}: x must be (N, {length}) mono clips of float in [-1, 1] or int16, got "
                              f"{header.dtype} {header.shape}",
                              hint=f"cut or pad each clip to {length} samples, one channel")
        limits.check("max_samples", header.shape[0], f"{path}: the number of clips")
        return header.shape[0]

    with NpzArchive(path, limits) as npz:
        x, y, names = read_labelled_npz(npz, path, labelled, "clip", check_x, limits)
    x = x.reshape(len(x), length).astype(np.float32) / (32768.0 if x.dtype.kind == "i" else 1.0)
    clips, kept, notes = [], [], []
    for i, clip in enumerate(x):
        try:
            clips.append(check_clip(clip, f"{path} clip {i}"))
            kept.append(i)
        except SampleError as exc:
            if not skip_bad:
                raise
            notes.append(f"left out clip {i}: {exc.message}")
    if not clips:
        raise DataFormatError(f"{path} holds no usable clips")
    return LabeledImages(np.stack(clips)[:, None, :], y[kept], names, str(path), notes=notes)


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 20.0,
                   f_max: float | None = None) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters over the rfft bins.

    Written out (the standard formula, a dozen lines) because the device side
    has neither torchaudio nor librosa; ``tests/toolkit/test_audio.py`` checks
    its shape against the definition."""
    f_max = f_max or sample_rate / 2
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
