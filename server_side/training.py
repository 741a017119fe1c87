"""Training on the generic data, the one loop every server-side workflow
shares: the data as normalised tensors split the way pretraining split it,
and ``fit`` (Adam, cosine decay, the pretraining augmentation, optional
distillation from a teacher). Pretraining trains GE with it, compression
recovers with it, the learngene distils its auxiliary model and fine-tunes
expanded models with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetailor.toolkit.config import PretrainConfig
from edgetailor.toolkit.data import LabeledImages, load_generic_digits, split_generic
from edgetailor.toolkit.input_spec import InputSpec

ProgressFn = Callable[[int, int], None]


def handwriting_augment(x: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Another writer's hand on a normalised batch (background = its minimum):
    rotation, slant, size, aspect, a smooth elastic wobble and pen width.

    One grid_sample applies the affine part and the elastic field together, so
    a glyph is resampled once; the pen width is a 3x3 grey dilation or erosion
    afterwards, as a thicker or thinner pen would draw the same path.
    """
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle = u(n) * np.deg2rad(cfg.augment_rotation_deg)
    scale_x = 1 + u(n) * cfg.augment_scale
    scale_y = scale_x * (1 + u(n) * cfg.augment_aspect)
    shear = u(n) * cfg.augment_shear
    shift = u(n, 2) * cfg.augment_shift * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation @ shear @ diag(scale): the grid maps output to input coordinates.
    linear = torch.stack([torch.stack([cos * scale_x, (cos * shear - sin) * scale_y], 1),
                          torch.stack([sin * scale_x, (sin * shear + cos) * scale_y], 1)], 1)
    theta = torch.cat([linear, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if cfg.augment_elastic > 0:
        field = torch.randn(n, 2, 7, 7, generator=generator) * cfg.augment_elastic
        grid = grid + F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    background = x.amin()
    ink = F.grid_sample(x - background, grid, align_corners=False)
    if cfg.augment_thickness > 0:
        draw = torch.rand(n, generator=generator)[:, None, None, None]
        thicker = F.max_pool2d(ink, 3, 1, 1)
        thinner = -F.max_pool2d(-ink, 3, 1, 1)
        ink = torch.where(draw < cfg.augment_thickness / 2, thicker,
                          torch.where(draw > 1 - cfg.augment_thickness / 2, thinner, ink))
    return ink + background


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


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


def tensors(spec: InputSpec, data: LabeledImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images and labels as torch tensors."""
    return torch.from_numpy(spec.normalize(data.images)), torch.as_tensor(data.labels)


def load_generic(input_spec: InputSpec, seed: int, augment: PretrainConfig,
                 data: LabeledImages | None = None) -> tuple[GenericData, Any]:
    """The generic data (default: the built-in digits) split with ``seed`` and
    normalised with a checkpoint's ``input`` spec, so that the test part is the
    one that model's accuracy was measured on."""
    data = data if data is not None else load_generic_digits()
    split = split_generic(data, seed=seed)
    generic = GenericData(*tensors(input_spec, split.train), *tensors(input_spec, split.test), augment)
    return generic, split


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
    train_x, train_y = data.train_x, data.train_y
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if teacher is not None:
        teacher.eval()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x = handwriting_augment(train_x[batch], data.augment, generator)
            y = train_y[batch]
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
