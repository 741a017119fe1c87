"""Constraints that recovery training keeps (``server_side.training.fit``
fine-tunes a compressed GE on the generic data, optionally distilled from the
dense fp32 GE): zeros stay zero and quantized weights stay on their grid.

Both constraints are torch parametrizations on the layer weights, so the
optimizer trains an unconstrained tensor and the forward pass always sees the
constrained one; ``bake`` writes the constrained weights back as plain tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers that pruning and quantization act on."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class Masked(nn.Module):
    """weight = raw * mask: pruned weights stay exactly zero during training."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of the weights that are exactly zero now, for layers that have any."""
    masks = {}
    for name, layer in weight_layers(model):
        mask = layer.weight.detach() != 0
        if not bool(mask.all()):
            masks[name] = mask
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    layers = dict(weight_layers(model))
    for name, mask in masks.items():
        parametrize.register_parametrization(layers[name], "weight", Masked(mask))


def bake(model: nn.Module) -> nn.Module:
    """Replace every parametrized weight by its current constrained value."""
    for _, layer in weight_layers(model):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    for hook in getattr(model, "_edgetailor_hooks", []):
        hook.remove()
    model._edgetailor_hooks = []
    return model
