"""The baselines the mixture of experts is measured against: fine-tune all of
GE, or only its last layer, on the user's samples (on a copy; GE is untouched).
Both forget generic data, which is the point of keeping GE frozen on the device."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from edgetailor.toolkit.errors import ConfigError

FINETUNE_MODES = ("all", "last")


def finetune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "all",
             epochs: int | None = None, learning_rate: float | None = None, seed: int = 0) -> torch.nn.Module:
    """Full-batch Adam on the user's samples; returns the tuned copy. Defaults:
    60 epochs at 1e-3 for all layers, 100 at 1e-2 for the last (tuned on the demo's users)."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"mode must be one of {FINETUNE_MODES}, got {mode!r}")
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    params = tuned.parameters() if mode == "all" else tuned.head().parameters()
    lr = learning_rate if learning_rate is not None else (1e-3 if mode == "all" else 1e-2)
    optimizer = torch.optim.Adam(params, lr=lr)
    tuned.train()
    epochs = epochs if epochs is not None else (60 if mode == "all" else 100)
    for _ in range(epochs):
        loss = F.cross_entropy(tuned(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tuned.eval()
    return tuned
