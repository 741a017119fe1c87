"""Train the Global Expert on generic data and save it as a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from edgetailor.toolkit import atomic
from edgetailor.toolkit.config import Recipe
from edgetailor.toolkit.data import LabeledImages, load_generic_digits, provenance, split_generic
from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.server_side.checkpoint import CheckpointMeta, GECheckpoint, replay_subset
from edgetailor.server_side.models import build_model, model_depth
from edgetailor.server_side.training import fit, load_generic, test_accuracy

ProgressFn = Callable[[int, int], None]


def pretrain(out_dir: str | Path, recipe: Recipe | None = None, data: LabeledImages | None = None,
             progress: ProgressFn | None = None, overwrite: bool = False) -> GECheckpoint:
    """Train GE on ``data`` (default: the built-in digits) and write a checkpoint to ``out_dir``.

    The split is stratified and seeded; the test part gives the accuracy
    recorded in the checkpoint, and a few training glyphs become the replay set.
    ``progress(epoch, epochs)`` is called after every epoch.
    """
    recipe = (recipe or Recipe()).validate()
    cfg = recipe.pretrain
    data = data if data is not None else load_generic_digits()
    try:
        shape = build_model(cfg.arch, len(data.label_names), cfg.widths or None, cfg.depth or None)
    except ConfigError as exc:
        raise ConfigError(f"[pretrain]: {exc.message}", hint=exc.hint) from None
    recipe.experts.resolve_taps(shape)
    split = split_generic(data, seed=cfg.seed)
    spec = InputSpec.fit(split.train.images)
    generic, _ = load_generic(spec, cfg.seed, cfg, data)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, len(data.label_names), cfg.widths or None, cfg.depth or None)
    fit(model, generic, cfg.epochs, cfg.learning_rate, cfg.batch_size, seed=cfg.seed, progress=progress)
    meta = CheckpointMeta(arch=cfg.arch, labels=list(data.label_names), input=spec, widths=model.widths(),
                          depth=model_depth(model), seed=cfg.seed, data=provenance(data, split),
                          recipe=recipe.to_dict(), train_seconds=round(time.perf_counter() - started, 2),
                          generic_accuracy=test_accuracy(model, generic))
    ckpt = GECheckpoint(model, meta, replay_subset(split.train, recipe.experts.replay_size, cfg.seed))
    with atomic.staged_dir(out_dir, overwrite=overwrite) as staging:
        ckpt.save(staging)
    return ckpt
