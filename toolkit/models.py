"""Model definitions (torch): the Global Expert architectures, registered by name.

Every GE returns its logits and the intermediate features that the Local
Expert and Gating Network read on the device (``forward_with_features``), so
that LE and GN cost a few hundred multiply-adds instead of a second network.
Server and export side only: the device never imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class FeatureTap:
    """A named intermediate activation that GE exposes to LE and GN."""

    name: str
    dim: int


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 greyscale input (padding 2 on the first conv, as the
    classic 32x32 version sees it), ReLU and max-pooling as in modern reimplementations."""

    arch = "lenet5"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.num_classes = num_classes

    # Taps in the order forward_with_features returns them. "conv" is the
    # pooled conv2 output, flattened: the last spatial features.
    feature_taps = (FeatureTap("conv", 16 * 5 * 5), FeatureTap("fc1", 120), FeatureTap("fc2", 84))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        conv = torch.flatten(x, 1)
        h1 = F.relu(self.fc1(conv))
        h2 = F.relu(self.fc2(h1))
        return self.fc3(h2), {"conv": conv, "fc1": h1, "fc2": h2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def head(self) -> nn.Linear:
        """The last layer, which the last-layer fine-tuning baseline retrains."""
        return self.fc3


ARCHITECTURES: dict[str, type[nn.Module]] = {LeNet5.arch: LeNet5}


def build_model(arch: str, num_classes: int) -> nn.Module:
    try:
        return ARCHITECTURES[arch](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


class WithFeatures(nn.Module):
    """Wraps a GE so that a plain forward returns (logits, features...) for ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits, feats = self.model.forward_with_features(x)
        return (logits, *(feats[t.name] for t in self.model.feature_taps))
