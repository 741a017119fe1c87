"""Audio clips: WAV files read with their bad inputs named (wrong rate,
stereo, empty, silent, clipped), clips fitted to the model's length, the mel
filterbank, and the audio modality's seeded augmentation."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from edgetailor.toolkit.audio import fit_length, load_clips, mel_filterbank, read_wav
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.modalities import AudioModality, augment_params

RATE = 16000
SPEC = InputSpec.for_audio(RATE, 1.0)


def tone(seconds: float = 0.5, level: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (level * np.sin(2 * np.pi * freq * t) * np.hanning(len(t))).astype(np.float32)


def write_wav(path, samples: np.ndarray, rate: int = RATE, channels: int = 1, width: int = 2) -> None:
    scale = {1: 127, 2: 32767, 3: (1 << 23) - 1}[width]
    ints = np.round(np.clip(samples, -1, 1) * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 2:
        raw = ints.astype("<i2").tobytes()
    else:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_pcm_wavs_read_as_float(tmp_path, width):
    clip = tone()
    write_wav(tmp_path / "a.wav", clip, width=width)
    got = read_wav(tmp_path / "a.wav", RATE)
    assert got.dtype == np.float32 and len(got) == len(clip)
    assert np.abs(got - clip).max() < {1: 2e-2, 2: 1e-4, 3: 1e-6}[width]


def test_wavs_that_would_change_what_the_model_hears_are_refused(tmp_path):
    write_wav(tmp_path / "rate.wav", tone(), rate=22050)
    with pytest.raises(SampleError, match=r"rate.wav is sampled at 22050 Hz; the bundle's model hears 16000 Hz"):
        read_wav(tmp_path / "rate.wav", RATE)
    write_wav(tmp_path / "stereo.wav", np.repeat(tone(), 2), channels=2)
    with pytest.raises(SampleError, match="stereo.wav has 2 channels"):
        read_wav(tmp_path / "stereo.wav", RATE)
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(SampleError, match="empty.wav is empty"):
        read_wav(tmp_path / "empty.wav", RATE)
    write_wav(tmp_path / "silent.wav", np.zeros(800, np.float32))
    with pytest.raises(SampleError, match="silent.wav is silent"):
        read_wav(tmp_path / "silent.wav", RATE)
    write_wav(tmp_path / "clipped.wav", np.clip(tone(level=4.0), -1, 1))
    with pytest.raises(SampleError, match=r"clipped.wav is clipped: \d+\.\d% of its samples are at full scale"):
        read_wav(tmp_path / "clipped.wav", RATE)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(DataFormatError, match="not a readable PCM WAV"):
        read_wav(tmp_path / "text.wav", RATE)


def test_clips_are_centred_or_cut_to_their_loudest_second():
    short = tone(0.25)
    fitted = fit_length(short, RATE)
    start = (RATE - len(short)) // 2
    assert np.array_equal(fitted[start:start + len(short)], short) and not fitted[:start].any()
    long = np.concatenate([np.zeros(RATE), tone(0.5), np.zeros(RATE)]).astype(np.float32)
    cut = fit_length(long, RATE)
    assert len(cut) == RATE and np.isclose(np.sum(cut ** 2), np.sum(long ** 2), rtol=1e-4)


def test_a_folder_of_wavs_loads_by_label_and_bad_clips_are_named_or_left_out(tmp_path):
    for label, freq in (("yes", 300.0), ("no", 600.0)):
        (tmp_path / "clips" / label).mkdir(parents=True)
        for i in range(3):
            write_wav(tmp_path / "clips" / label / f"{i}.wav", tone(0.4 + 0.1 * i, freq=freq))
    data = load_clips(tmp_path / "clips", RATE, RATE, ["yes", "no"])
    assert data.images.shape == (6, 1, RATE) and sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    write_wav(tmp_path / "clips" / "no" / "loud.wav", np.clip(tone(level=3.0), -1, 1))
    with pytest.raises(SampleError, match="loud.wav is clipped"):
        load_clips(tmp_path / "clips", RATE, RATE)
    kept = load_clips(tmp_path / "clips", RATE, RATE, skip_bad=True)
    assert len(kept) == 6 and any("loud.wav" in note for note in kept.notes)
    np.savez(tmp_path / "c.npz", x=(np.stack([fit_length(tone(), RATE)] * 2) * 32767).astype(np.int16),
             y=np.array([1, 0]))
    assert load_clips(tmp_path / "c.npz", RATE, RATE).images.dtype == np.float32
    np.savez(tmp_path / "short.npz", x=np.zeros((2, 800), np.float32), y=np.array([1, 0]))
    with pytest.raises(SampleError, match=r"x must be \(N, 16000\) mono clips"):
        load_clips(tmp_path / "short.npz", RATE, RATE)


def test_the_mel_filterbank_is_triangles_rising_in_frequency():
    bank = mel_filterbank(RATE, 400, 40)
    assert bank.shape == (40, 201) and (bank >= 0).all() and bank.max() <= 1.0
    peaks = bank.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[0] < 5 and peaks[-1] > 180
    assert (bank.sum(axis=1) > 0).all()


def test_audio_prepare_takes_clips_as_apps_have_them():
    modality = AudioModality()
    clips = modality.prepare([tone(0.3), (tone(1.4) * 32767).astype(np.int16)], SPEC)
    assert clips.shape == (2, 1, RATE) and clips.dtype == np.float32 and np.abs(clips).max() <= 0.5 + 1e-6
    with pytest.raises(SampleError, match="goes to 3.00"):
        modality.prepare([tone(level=3.0)], SPEC)
    with pytest.raises(SampleError, match="NaN"):
        modality.prepare([np.full(100, np.nan, np.float32)], SPEC)
    with pytest.raises(SampleError, match="mono"):
        modality.prepare([np.zeros((2, 100))], SPEC)


def test_audio_augmentation_is_seeded_and_keeps_the_clip_audible():
    modality = AudioModality()
    rng = np.random.default_rng(0)      # broadband bursts: a frequency mask may remove a pure tone whole
    clips = modality.prepare([(0.3 * rng.standard_normal(8000) * np.hanning(8000)).astype(np.float32)
                              for _ in range(2)], SPEC)
    params = augment_params(SPEC)
    out = modality.augment(clips, 3, np.random.default_rng(1), params)
    assert np.array_equal(out, modality.augment(clips, 3, np.random.default_rng(1), params))
    assert out.shape == (8, 1, RATE) and np.array_equal(out[:2], clips)
    copies = out[2:]
    assert np.isfinite(copies).all() and np.abs(copies).max() <= 1.0
    energy = np.sqrt(np.mean(copies ** 2, axis=(1, 2))) / np.sqrt(np.mean(np.tile(clips, (3, 1, 1)) ** 2, axis=(1, 2)))
    assert (energy > 0.3).all() and (energy < 3.0).all()          # gain within +-6 dB, masks take a little
    assert not np.allclose(copies[0], clips[0], atol=1e-3)
