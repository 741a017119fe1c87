"""Train the Global Expert on generic data."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import toolkit
from toolkit import atomic
from toolkit.config import PretrainConfig, Recipe
from toolkit.data import LabeledImages, load_generic_digits, provenance, split_generic
from toolkit.errors import ConfigError
from toolkit.models import build_model, model_depth
from server_side.checkpoint import FORMAT, GECheckpoint

ProgressFn = Callable[[int, int, dict], None]


def random_affine(x: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Mild rotation/scale/shift augmentation on a normalised batch (background = its minimum)."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle = u(n) * np.deg2rad(cfg.augment_rotation_deg)
    scale = 1 + u(n) * cfg.augment_scale
    shift = u(n, 2) * cfg.augment_shift * 2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()
    return F.grid_sample(x - background, grid, align_corners=False) + background


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_ge(train: LabeledImages, cfg: PretrainConfig, progress: ProgressFn | None = None):
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = train.images.astype(np.float32) / 255.0
    mean, std = float(images.mean()), float(images.std())
    x = ((torch.as_tensor(images) - mean) / std).unsqueeze(1)
    y = torch.as_tensor(train.labels)
    model = build_model(cfg.arch, len(train.label_names), cfg.widths or None, cfg.depth or None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(model(random_affine(x[batch], cfg, generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        if progress:
            progress(epoch + 1, cfg.epochs, {"loss": total / len(x)})
    model.eval()
    return model, {"scale": 1.0 / 255.0, "mean": mean, "std": std}


def pretrain(out_dir: str | Path, recipe: Recipe | None = None, data: LabeledImages | None = None,
             progress: ProgressFn | None = None, overwrite: bool = False) -> GECheckpoint:
    """Train GE on ``data`` (default: the built-in digits) and write a checkpoint to ``out_dir``.

    The split is stratified and seeded; the test part gives the accuracy
    recorded in the checkpoint, and a few training glyphs become the replay set.
    """
    recipe = (recipe or Recipe()).validate()
    cfg = recipe.pretrain
    data = data if data is not None else load_generic_digits()
    try:
        shape = build_model(cfg.arch, len(data.label_names), cfg.widths or None, cfg.depth or None)
    except ValueError as exc:
        raise ConfigError(f"[pretrain]: {exc}") from None
    recipe.experts.resolve_taps(shape)
    split = split_generic(data, seed=cfg.seed)
    started = time.perf_counter()
    model, norm = train_ge(split.train, cfg, progress)
    seconds = time.perf_counter() - started
    meta = {
        "format": FORMAT,
        "toolkit_version": toolkit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arch": cfg.arch,
        "widths": model.widths(),
        "depth": model_depth(model),
        "labels": list(data.label_names),
        "input": {"shape": [1, *data.images.shape[1:]], "dtype": "uint8", **norm, "ink": "white-on-black",
                  "preprocess": "mnist-style 20x20 box, centred by mass on 28x28"},
        "data": provenance(data, split),
        "seed": cfg.seed,
        "recipe": recipe.to_dict(),
        "train_seconds": round(seconds, 2),
    }
    ckpt = GECheckpoint(model, meta, _replay_subset(split.train, recipe.experts.replay_size, cfg.seed))
    test_x, test_y = ckpt.normalize(split.test.images), torch.as_tensor(split.test.labels)
    meta["generic_accuracy"] = accuracy(model, test_x, test_y)
    with atomic.staged_dir(out_dir, overwrite=overwrite) as staging:
        ckpt.save(staging)
    return ckpt


def _replay_subset(train: LabeledImages, size: int, seed: int) -> LabeledImages:
    """A class-balanced handful of generic training glyphs for the device's replay."""
    rng = np.random.default_rng(seed + 1)
    per_class = max(1, size // len(train.label_names))
    index = np.concatenate([rng.permutation(np.flatnonzero(train.labels == c))[:per_class]
                            for c in range(len(train.label_names))])
    return train.subset(np.sort(index))
