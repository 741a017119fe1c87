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
    classic 32x32 version sees it), ReLU and max-pooling as in modern reimplementations.

    ``widths`` (conv1, conv2, fc1, fc2) default to the classic 6/16/120/84;
    structured pruning makes them smaller, and a checkpoint records them so
    that the pruned model can be rebuilt."""

    arch = "lenet5"
    default_widths = (6, 16, 120, 84)

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] | None = None):
        super().__init__()
        if widths is not None and len(widths) != 4:
            raise ValueError(f"lenet5 takes 4 widths (conv1, conv2, fc1, fc2), got {list(widths)}")
        c1, c2, f1, f2 = widths or self.default_widths
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        self.num_classes = num_classes

    def widths(self) -> list[int]:
        """The current widths, read off the layers (pruning changes them in place)."""
        return [self.conv1.out_channels, self.conv2.out_channels, self.fc1.out_features, self.fc2.out_features]

    @property
    def feature_taps(self) -> tuple[FeatureTap, ...]:
        """Taps in the order forward_with_features returns them. "conv" is the
        pooled conv2 output, flattened: the last spatial features."""
        return (FeatureTap("conv", self.fc1.in_features), FeatureTap("fc1", self.fc1.out_features),
                FeatureTap("fc2", self.fc2.out_features))

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


def build_model(arch: str, num_classes: int, widths: list[int] | None = None) -> nn.Module:
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(num_classes=num_classes, widths=tuple(widths) if widths else None)


class WithFeatures(nn.Module):
    """Wraps a GE so that a plain forward returns (logits, features...) for ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits, feats = self.model.forward_with_features(x)
        return (logits, *(feats[t.name] for t in self.model.feature_taps))
