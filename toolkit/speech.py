"""Spoken digits, synthesized offline: the keyword example's generic data and
its accent users.

Nothing is downloaded. Speech comes from the synthesizers Debian ships
(``apt-get install espeak-ng flite``):
- espeak-ng, with its English dialects and its voice variants (male,
  female, whisper, croak, ...), at several speaking rates and pitches;
- flite's voices.

Every clip then goes through a room: a synthetic reverberation tail, a
random level, a random place in the one-second clip, and noise at a random
SNR.

**Generic speakers** are English dialects of espeak-ng (``GENERIC_VOICES``
x ``GENERIC_VARIANTS`` x rates x pitches). **Accent users** are voices the
generic set never has:
- espeak-ng's other languages reading the same English words, with their own
  phonology (a German, French, Hindi, ... speaker);
- flite's voices, another engine altogether.

The targets are measured on such users. An independent check uses other
voices again, so nothing here is tuned to one engine or one voice.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgetailor.toolkit.audio import fit_length
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import EdgetailorError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_RATE = 16000
GENERIC_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
GENERIC_VARIANTS = ["m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4"]
GENERIC_RATES = [135, 175]
GENERIC_PITCHES = [35, 65]
# Languages whose espeak-ng voice reads the English words with its own sounds.
ACCENT_LANGUAGES = ["de", "fr", "es", "it", "pl", "hi", "vi", "tr", "pt", "nl", "sv", "ro"]
FLITE_VOICES = ["kal", "awb", "rms", "slt"]


class SynthesizerMissing(EdgetailorError):
    default_hint = "install the offline synthesizers: apt-get install espeak-ng flite"


class SynthesisFailed(EdgetailorError):
    default_hint = "check that the voice exists (espeak-ng --voices, flite -lv)"


def synthesizers_missing() -> str | None:
    """Why the keyword data cannot be made here, or None."""
    missing = [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: apt-get install espeak-ng flite"
    return None


@dataclass(frozen=True)
class Speaker:
    engine: str          # "espeak-ng" or "flite"
    voice: str           # espeak-ng: language[+variant]; flite: voice name
    rate: float          # espeak-ng: words per minute; flite: 1.0 = its own pace
    pitch: float         # espeak-ng: 0-99; flite: mean F0 in Hz (0 = its own)

    def describe(self) -> str:
        return f"{self.engine} {self.voice} rate {self.rate:g} pitch {self.pitch:g}"


def _decode(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data), "rb") as reader:
        rate, width = reader.getframerate(), reader.getsampwidth()
        samples = np.frombuffer(reader.readframes(reader.getnframes()), f"<i{width}").astype(np.float32)
    samples /= float(1 << (8 * width - 1))
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly   # a scikit-learn dependency, present wherever data is made

        divisor = np.gcd(SAMPLE_RATE, rate)
        samples = resample_poly(samples, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)
    return samples


@lru_cache(maxsize=4096)
def synthesize(speaker: Speaker, text: str) -> np.ndarray:
    """``text`` spoken by ``speaker``: float32 mono at 16 kHz, as the engine makes it (no room)."""
    if shutil.which(speaker.engine) is None:
        raise SynthesizerMissing(f"{speaker.engine} is not installed")
    try:
        if speaker.engine == "espeak-ng":
            command = ["espeak-ng", "-v", speaker.voice, "-s", str(int(speaker.rate)), "-p",
                       str(int(speaker.pitch)), "--stdout", text]
            result = subprocess.run(command, capture_output=True, timeout=60)
            data = result.stdout
        elif speaker.engine == "flite":
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "clip.wav"
                command = ["flite", "-voice", speaker.voice, "--setf", f"duration_stretch={1.0 / speaker.rate:.3f}"]
                if speaker.pitch:
                    command += ["--setf", f"int_f0_target_mean={speaker.pitch:g}"]
                result = subprocess.run([*command, "-t", text, "-o", str(out)], capture_output=True, timeout=60)
                data = out.read_bytes() if out.exists() else b""
        else:
            raise ValueError(f"unknown synthesizer {speaker.engine!r}")
    except subprocess.TimeoutExpired:
        raise SynthesisFailed(f"{speaker.engine} took over a minute to say {text!r} with {speaker.voice!r}") from None
    if result.returncode != 0 or not data:
        raise SynthesisFailed(f"{speaker.engine} could not say {text!r} with voice {speaker.voice!r}: "
                              f"{result.stderr.decode(errors='replace').strip()[:200]}")
    return _decode(data)


def in_a_room(clip: np.ndarray, rng: np.random.Generator, length: int = SAMPLE_RATE) -> np.ndarray:
    """The clip as a microphone in a room hears it: reverberation (an
    exponentially decaying noise tail, RT60 0.05-0.4 s), a level, a place in
    the one-second window, and background noise at 10-35 dB SNR."""
    rt60 = rng.uniform(0.05, 0.4)
    taps = int(rt60 * SAMPLE_RATE)
    tail = rng.standard_normal(taps) * np.exp(-6.9 * np.arange(taps) / max(taps, 1))
    response = np.concatenate([[1.0], 0.3 * tail / np.sqrt(np.sum(tail ** 2) + 1e-9)])
    wet = np.convolve(clip, response)[:len(clip) + taps // 2]
    wet = wet / (np.abs(wet).max() + 1e-9) * rng.uniform(0.15, 0.8)
    if len(wet) > length:
        wet = fit_length(wet.astype(np.float32), length)
    out = np.zeros(length)
    start = int(rng.integers(0, length - len(wet) + 1))
    out[start:start + len(wet)] = wet
    signal = np.sqrt(np.mean(wet ** 2)) + 1e-9
    noise = rng.standard_normal(length)
    noise = np.cumsum(noise) * 0.02 + noise                 # a little low-frequency weight: room hum, not hiss
    noise *= signal / (np.sqrt(np.mean(noise ** 2)) * 10 ** (rng.uniform(10, 35) / 20))
    return np.clip(out + noise, -0.99, 0.99).astype(np.float32)


def generic_speakers() -> list[Speaker]:
    """The generic set's speakers: every English dialect x variant x rate x pitch."""
    return [Speaker("espeak-ng", f"{voice}+{variant}", rate, pitch) for voice in GENERIC_VOICES
            for variant in GENERIC_VARIANTS for rate in GENERIC_RATES for pitch in GENERIC_PITCHES]


def accent_speakers(seed: int = 0) -> list[Speaker]:
    """One speaker per accent: each other language with a variant, rate and
    pitch of its own, then each flite voice."""
    rng = np.random.default_rng(seed)
    speakers = [Speaker("espeak-ng", f"{language}+{rng.choice(GENERIC_VARIANTS)}", float(rng.integers(130, 180)),
                        float(rng.integers(30, 70))) for language in ACCENT_LANGUAGES]
    return speakers + [Speaker("flite", voice, float(rng.uniform(0.85, 1.15)), 0.0) for voice in FLITE_VOICES]


def spoken_digits(speakers: list[Speaker], repeats: int = 1, seed: int = 0, source: str = "") -> LabeledImages:
    """Every word by every speaker, ``repeats`` times, each in a room of its own:
    (N, 1, 16000) float32 clips, labelled by ``WORDS``."""
    why = synthesizers_missing()
    if why:
        raise SynthesizerMissing(f"the keyword data cannot be made: {why}")
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for speaker in speakers:
        for label, word in enumerate(WORDS):
            dry = synthesize(speaker, word)
            for _ in range(repeats):
                clips.append(in_a_room(dry, rng))
                labels.append(label)
    return LabeledImages(np.stack(clips)[:, None, :], np.array(labels, np.int64), list(WORDS),
                         source or f"spoken digits ({len(speakers)} synthesized speakers)")


@dataclass(frozen=True)
class AccentUser:
    speaker: Speaker
    train: LabeledImages
    test: LabeledImages


def accent_user(speaker: Speaker, train_per_word: int = 10, test_per_word: int = 10, seed: int = 0) -> AccentUser:
    """One accent's samples: the speaker's words in rooms of their own, at
    rates and pitches around the speaker's (a person never says a word the
    same way twice)."""
    rng = np.random.default_rng([seed, zlib.crc32(speaker.describe().encode())])
    parts = []
    for count in (train_per_word, test_per_word):
        clips, labels = [], []
        for label, word in enumerate(WORDS):
            for _ in range(count):
                if speaker.engine == "espeak-ng":
                    take = Speaker(speaker.engine, speaker.voice, float(speaker.rate + rng.integers(-15, 16)),
                                   float(np.clip(speaker.pitch + rng.integers(-8, 9), 0, 99)))
                else:
                    take = Speaker(speaker.engine, speaker.voice, float(speaker.rate * rng.uniform(0.92, 1.08)), 0.0)
                clips.append(in_a_room(synthesize(take, word), rng))
                labels.append(label)
        parts.append(LabeledImages(np.stack(clips)[:, None, :], np.array(labels, np.int64), list(WORDS),
                                   f"accent user ({speaker.describe()})"))
    return AccentUser(speaker, *parts)
