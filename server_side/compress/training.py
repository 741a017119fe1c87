"""Recovery training shared by every stage: fine-tune a compressed GE on the
generic data, optionally distilled from the dense fp32 GE, while keeping what
earlier stages decided (zeros stay zero; quantized weights stay on their grid).

Both constraints are torch parametrizations on the layer weights, so the
optimizer trains an unconstrained tensor and the forward pass always sees the
constrained one; ``bake`` writes the constrained weights back as plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from toolkit.config import PretrainConfig
from server_side.pretrain import accuracy, random_affine

ProgressFn = Callable[[int, int], None]


@dataclass
class GenericData:
    """The generic data as normalised tensors, split as pretraining split it."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: PretrainConfig

    def calibration(self, n: int, seed: int = 0) -> np.ndarray:
        """A seeded, class-mixed subset of the training images for calibration."""
        index = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(seed))[:n]
        return self.train_x[index].numpy()


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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss mixed with the hard-label loss; the T^2
    factor keeps the soft gradients' scale independent of the temperature."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def fit(model: nn.Module, data: GenericData, epochs: int, learning_rate: float, batch_size: int,
        teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7, seed: int = 0,
        progress: ProgressFn | None = None) -> nn.Module:
    """Adam with cosine decay and the pretraining augmentation; ``teacher``
    switches on distillation. Parametrizations already on the model (masks,
    fake quantization) are trained through, not removed."""
    if epochs <= 0:
        return model
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if teacher is not None:
        teacher.eval()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x = random_affine(data.train_x[batch], data.augment, generator)
            y = data.train_y[batch]
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                loss = distillation_loss(logits, target, y, temperature, alpha)
            else:
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        if progress:
            progress(epoch + 1, epochs)
    model.eval()
    return model


def test_accuracy(model: nn.Module, data: GenericData) -> float:
    return accuracy(model, data.test_x, data.test_y)
