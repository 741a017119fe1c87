"""The two small models the device trains (torch definitions).

Export turns them into each training runtime's form (ONNX Runtime training
artifacts, an ExecuTorch joint forward-backward program, a torch.export
program), all from the same initial weights, so every backend starts a
personalization from the same point. The device never imports this module:
it trains what export wrote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualHead(nn.Module):
    """The Local Expert: ``logits = base_logits + U @ (V @ features) + b``.

    U and b start at zero, so an untrained LE answers exactly like GE; V is a
    random projection that training refines (as in LoRA). The rank keeps LE
    at ~2 % of GE even on GE's 400 conv features, which correct a user's hand
    better than the later, more class-specific fc features (docs/DESIGN.md).
    ``rank = 0`` is a plain full-rank ``W @ features``."""

    def __init__(self, feature_dim: int, num_classes: int, rank: int = 0):
        super().__init__()
        self.down = nn.Linear(feature_dim, rank, bias=False) if rank else nn.Identity()
        self.up = nn.Linear(rank or feature_dim, num_classes)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, features: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        return base_logits + self.up(self.down(features))


class ChannelMixHead(nn.Module):
    """The Local Expert on a spatial feature: ``logits = base_logits + U @ softplus(mix(features)) + b``.

    The feature is ``channels`` maps of ``positions`` values each (LeNet's
    pooled conv2: 16 x 5x5; a ViT's patch tokens: 64 x 49), channel-major.
    ``mix`` is one ``width x channels`` matrix shared by every position (a
    1x1 convolution), so the correction keeps where on the glyph a stroke is
    and spends its parameters on U. On real writers this beat a rank-3
    ``ResidualHead`` on the same feature by 1.3 points at fewer parameters
    (docs/DESIGN.md "Local expert"). U and b start at zero, so an untrained
    LE answers exactly like GE.

    Softplus, not ReLU: as accurate here (0.954 against 0.953 on real
    writers), and smooth, so every runtime's step program follows torch's
    to 1e-5 over 100 steps. With ReLU, a pre-activation within rounding of 0
    flips a unit in one runtime and not in another, and the runs drift apart.

    Written as one strided slice and one 2-D matmul per position rather than
    a conv2d or a reshape: the step programs are traced graphs, a reshape
    would bake the tracing batch into an ONNX forward that must take any
    batch, and a convolution's backward is not an op TFLite's builtins have.
    The slices read the input, which needs no gradient."""

    def __init__(self, feature_dim: int, num_classes: int, channels: int, width: int):
        super().__init__()
        if channels < 1 or feature_dim % channels:
            raise ValueError(f"a {feature_dim}-value feature is not {channels} channels of equal size")
        self.channels, self.positions = channels, feature_dim // channels
        self.mix = nn.Linear(channels, width)
        self.up = nn.Linear(width * self.positions, num_classes)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, features: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        # features[:, p::positions] is position p of every channel (channel-major layout).
        mixed = [F.softplus(self.mix(features[:, p::self.positions])) for p in range(self.positions)]
        return base_logits + self.up(torch.cat(mixed, dim=1))                    # position-major (p, width)


# LE designs by the manifest's ``kind``: how each is built from the bundle's numbers.
LOCAL_EXPERTS = {
    "residual_lowrank": lambda dim, classes, rank, channels, width: ResidualHead(dim, classes, rank),
    "residual_channel_mix": lambda dim, classes, rank, channels, width: ChannelMixHead(dim, classes, channels, width),
}
# ExpertConfig.le_design -> manifest kind
LE_DESIGNS = {"lowrank": "residual_lowrank", "channel_mix": "residual_channel_mix"}


def local_expert(kind: str, feature_dim: int, num_classes: int, rank: int = 0, channels: int = 0,
                 width: int = 0) -> nn.Module:
    """The LE module a manifest's ``local_expert.kind`` names (fresh weights from torch's seed)."""
    if kind not in LOCAL_EXPERTS:
        raise ValueError(f"unknown local-expert kind {kind!r}; known: {', '.join(LOCAL_EXPERTS)}")
    return LOCAL_EXPERTS[kind](feature_dim, num_classes, rank, channels, width)


class LogisticGate(nn.Module):
    """The Gating Network: one score s, "this input looks like the user's writing".

    It returns two-class logits ``[0, s]`` (so P(LE) = sigmoid(s)) to train with
    ONNX Runtime's SoftmaxCrossEntropy: its BCEWithLogits block computes
    log(sigmoid) in two steps and returns NaN once the gate grows confident."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.score = nn.Linear(feature_dim, 1)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        score = self.score(features)
        return torch.cat([torch.zeros_like(score), score], dim=1)
