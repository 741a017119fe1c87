"""Audio front-ends as torch modules, to put at the start of a keyword GE.

``LogMel`` turns mono clips (N, 1, samples) into log-mel features (N, 1,
n_mels, frames). It is written from ops every bundle format carries: a
strided 1-D convolution whose kernels are the Hann-windowed DFT basis (the
STFT), a square, a matrix product with the mel filterbank
(``toolkit.audio.mel_filterbank``) and a log. So when it is the first module
of a GE, every exported program, ONNX, ExecuTorch or LiteRT, computes the
features itself, from the clip the device recorded, exactly as training did
(export compares each program with torch). ONNX's STFT and MelWeightMatrix
ops would do the same in ONNX alone; the other runtimes lack them.

Its weights are buffers, not parameters: nothing trains them, and
fine-tuning baselines leave them alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetailor.toolkit.audio import mel_filterbank


class LogMel(nn.Module):
    name = "log-mel-v1"

    def __init__(self, sample_rate: int = 16000, window: int = 400, hop: int = 160, n_mels: int = 40,
                 f_min: float = 20.0, f_max: float | None = None, floor: float = 1e-6):
        super().__init__()
        self.sample_rate, self.window, self.hop, self.n_mels = sample_rate, window, hop, n_mels
        self.f_min, self.f_max, self.floor = f_min, f_max or sample_rate / 2, floor
        bins = window // 2 + 1
        t = np.arange(window)
        hann = 0.5 - 0.5 * np.cos(2 * math.pi * t / window)                    # periodic, as torch.hann_window
        angle = 2 * math.pi * np.outer(np.arange(bins), t) / window
        basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * hann          # (2 * bins, window)
        self.register_buffer("dft", torch.from_numpy(basis.astype(np.float32))[:, None, :])
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(sample_rate, window, n_mels, f_min, self.f_max)))
        self.bins = bins

    def frames(self, samples: int) -> int:
        return (samples - self.window) // self.hop + 1

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        spectrum = nn.functional.conv1d(clips, self.dft, stride=self.hop)          # (N, 2 * bins, frames)
        power = spectrum[:, :self.bins] ** 2 + spectrum[:, self.bins:] ** 2
        return torch.log(torch.matmul(self.mel, power) + self.floor).unsqueeze(1)   # (N, 1, n_mels, frames)

    def matmul_macs(self, output: torch.Tensor) -> int:
        """Multiply-adds per clip that ``cost.count_macs`` cannot see in functional calls: the STFT's
        convolution and the mel product."""
        frames = output.shape[-1]
        return frames * (2 * self.bins * self.window + self.n_mels * self.bins)

    def describe(self) -> dict[str, Any]:
        """What the bundle's input spec records about the front-end its GE begins with."""
        return {"name": self.name, "sample_rate": self.sample_rate, "window": self.window, "hop": self.hop,
                "n_mels": self.n_mels, "f_min": self.f_min, "f_max": self.f_max, "floor": self.floor,
                "window_function": "hann", "mel_scale": "htk", "in": "global_expert"}


def find_frontend(model: nn.Module) -> LogMel | None:
    """The model's LogMel, when it has one."""
    return next((m for m in model.modules() if isinstance(m, LogMel)), None)
