"""Weight quantization in torch: round-to-nearest, FlexRound, and the fake
quantization QAT trains through.

All three put each layer's weights on a symmetric per-output-channel grid
``scale * q`` with integer ``q`` in [-(2^(b-1) - 1), 2^(b-1) - 1] (the range
onnxruntime's symmetric int8 uses), and return the scales, so the exporters
can store exactly these integers. Activations are quantized by the exporters
from calibration data (8-bit, per tensor), as each runtime expects.

Written here rather than taken from a library: torchao's and ORT's quantizers
have round-to-nearest and QAT but no FlexRound, and the comparison needs all
three on the same grid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from edgetailor.server_side.compress.training import weight_layers


@dataclass
class QuantSpec:
    """What a quantizing compression stage decided, for the exporters."""

    weight_bits: int
    # layer name (as in model.named_modules()) -> per-output-channel scale of the grid its weights lie on
    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    activation_bits: int = 8


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through)."""
    return (x.round() - x).detach() + x


def _per_channel(w: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (w.dim() - 1)


def channel_scales(w: torch.Tensor, bits: int, granularity: str = "channel") -> torch.Tensor:
    """max|w| / qmax per output channel (or one for the whole tensor, repeated
    per channel): the statistics-based scale."""
    peak = w.detach().reshape(w.shape[0], -1).abs().amax(1)
    if granularity == "tensor":
        peak = peak.max().expand(w.shape[0]).clone()
    return (peak / qmax(bits)).clamp_min(1e-12)


def round_to_nearest(w: torch.Tensor, bits: int, granularity: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    scales = channel_scales(w, bits, granularity)
    s = scales.reshape(_per_channel(w))
    return torch.clamp(torch.round(w / s), -qmax(bits), qmax(bits)) * s, scales


def quantize_nearest(model: nn.Module, bits: int, granularity: str = "channel") -> dict[str, np.ndarray]:
    """Round every conv/linear weight to its nearest grid point, in place."""
    scales = {}
    with torch.no_grad():
        for name, layer in weight_layers(model):
            rounded, scale = round_to_nearest(layer.weight, bits, granularity)
            layer.weight.copy_(rounded)
            scales[name] = scale.numpy()
    return scales


def _layer_io(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of ``layer`` when ``model`` runs on ``x``."""
    seen = {}

    def hook(_module, inputs, output):
        seen["in"], seen["out"] = inputs[0].detach(), output.detach()

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["in"], seen["out"]


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


def flexround(model: nn.Module, calibration: torch.Tensor, bits: int, iterations: int, learning_rate: float,
              granularity: str = "channel", batch_size: int = 64, seed: int = 0,
              progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """FlexRound (Lee et al., ICML 2023): learned rounding by element-wise division,

        W_hat = s1 * clamp(round(W / (s1 * S2 * s3)), -qmax, qmax),

    with s1 the grid (one per tensor as in the paper's main setting, or one per
    output channel; started at round-to-nearest's scale, so the comparison is
    on the same kind of grid), S2 a scale per weight and s3 one per output
    channel, all learned to reconstruct each
    layer's output on calibration data. Layers are done in order; each sees the
    inputs the already-quantized layers before it produce, and matches the
    fp32 model's output. Division lets a weight's own magnitude steer its
    update (the gradient w.r.t. S2 scales with W), which is the paper's point
    against AdaRound's additive rounding. Written after the paper's equations
    and DeepWok/mase's FlexRound layers (Ŵ = s1 * floor(W / (s1*S2*s3) + 0.5)).
    Modifies ``model`` in place; returns the grid scales s1."""
    fp32 = copy.deepcopy(model).eval()
    fp_layers = dict(weight_layers(fp32))
    generator = torch.Generator().manual_seed(seed)
    scales: dict[str, np.ndarray] = {}
    layers = weight_layers(model)
    for index, (name, layer) in enumerate(layers):
        x_quantized, _ = _layer_io(model, layer, calibration)
        _, target = _layer_io(fp32, fp_layers[name], calibration)
        w = layer.weight.detach().clone()
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        initial = channel_scales(w, bits, granularity)
        s1 = nn.Parameter(initial[:1].clone() if granularity == "tensor" else initial.reshape(shape).clone())
        s2 = nn.Parameter(torch.ones_like(w))
        s3 = nn.Parameter(torch.ones(shape))
        optimizer = torch.optim.Adam([s1, s2, s3], lr=learning_rate)

        for _ in range(iterations):
            batch = torch.randint(0, len(x_quantized), (min(batch_size, len(x_quantized)),), generator=generator)
            loss = F.mse_loss(_apply(layer, x_quantized[batch], _flexround_weight(w, s1, s2, s3, bits)),
                              target[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                s1.clamp_(min=1e-8)
        with torch.no_grad():
            layer.weight.copy_(_flexround_weight(w, s1, s2, s3, bits))
        scales[name] = s1.detach().flatten().expand(w.shape[0]).numpy().copy()
        if progress:
            progress(index + 1, len(layers))
    return scales


def _flexround_weight(w: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor,
                      bits: int) -> torch.Tensor:
    return s1 * torch.clamp(round_ste(w / (s1 * s2 * s3)), -qmax(bits), qmax(bits))


class FakeQuantWeight(nn.Module):
    """QAT's weight quantizer: statistics-based per-channel scale (not a learned
    one, which the oscillation paper finds unstable at low bits), STE rounding."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = channel_scales(w, self.bits).reshape(_per_channel(w))
        return torch.clamp(round_ste(w / s), -qmax(self.bits), qmax(self.bits)) * s


class FakeQuantActivation:
    """8-bit asymmetric per-tensor fake quantization of a layer's input, with a
    running min/max (momentum 0.9) as the runtimes' calibration would see."""

    def __init__(self, bits: int = 8, momentum: float = 0.9):
        self.levels = 2 ** bits - 1
        self.momentum = momentum
        self.low: float | None = None
        self.high: float | None = None

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        x = inputs[0]
        if _module.training or self.low is None:
            low, high = float(x.detach().min()), float(x.detach().max())
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low = self.momentum * self.low + (1 - self.momentum) * low
                self.high = self.momentum * self.high + (1 - self.momentum) * high
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = max(high - low, 1e-8) / self.levels
        zero = round(-low / scale)
        q = torch.clamp(round_ste(x / scale) + zero, 0, self.levels)
        return ((q - zero) * scale,)


def prepare_qat(model: nn.Module, bits: int, calibration: torch.Tensor) -> nn.Module:
    """Fake-quantize every conv/linear weight and input; calibrate the input ranges."""
    hooks = []
    for _, layer in weight_layers(model):
        parametrize.register_parametrization(layer, "weight", FakeQuantWeight(bits))
        hooks.append(layer.register_forward_pre_hook(FakeQuantActivation()))
    model._edgetailor_hooks = hooks
    model.eval()
    with torch.no_grad():
        model(calibration)
    return model


def grid_scales(model: nn.Module, bits: int) -> dict[str, np.ndarray]:
    """Scales of weights already on a max-abs grid (after QAT or round-to-nearest)."""
    return {name: channel_scales(layer.weight, bits).numpy() for name, layer in weight_layers(model)}
