"""The log-mel front-end a keyword GE begins with: a strided convolution
with the windowed DFT basis computes what numpy's FFT computes."""

from __future__ import annotations

import numpy as np
import torch

from edgetailor.server_side.frontends import LogMel, find_frontend
from edgetailor.toolkit.audio import mel_filterbank


def numpy_log_mel(clip: np.ndarray, window: int = 400, hop: int = 160, n_mels: int = 40) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(clip, window)[::hop]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2                      # (frames, bins)
    return np.log(mel_filterbank(16000, window, n_mels).astype(np.float64) @ power.T + 1e-6)


def test_log_mel_is_the_stft_power_through_the_mel_filterbank():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    frontend = LogMel()
    got = frontend(torch.from_numpy(clip)[None, None]).numpy()
    assert got.shape == (1, 1, 40, frontend.frames(16000)) == (1, 1, 40, 98)
    want = numpy_log_mel(clip.astype(np.float64))
    np.testing.assert_allclose(got[0, 0], want, atol=2e-3, rtol=1e-3)
    assert not list(frontend.parameters())            # buffers only: nothing trains the front-end
    assert find_frontend(torch.nn.Sequential(frontend, torch.nn.Flatten())) is frontend
    assert frontend.describe()["in"] == "global_expert"
