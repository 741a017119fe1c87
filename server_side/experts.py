"""The two small models the device trains (torch definitions).

Export turns them into each training runtime's form (ONNX Runtime training
artifacts, an ExecuTorch joint forward-backward program, a torch.export
program), all from the same initial weights, so every backend starts a
personalization from the same point. The device never imports this module:
it trains what export wrote.
"""

from __future__ import annotations

import torch
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
