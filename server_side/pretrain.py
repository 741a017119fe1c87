"""Train the Global Expert on generic data and save it as a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from edgetailor.toolkit import __version__
from edgetailor.toolkit.config import Recipe
from edgetailor.toolkit.data import LabeledImages, provenance, split_generic
from edgetailor.toolkit.errors import ConfigError
from edgetailor.server_side.checkpoint import CheckpointMeta, GECheckpoint, replay_subset
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.models import build_model, model_depth
from edgetailor.server_side.samples import SampleStore, as_store, input_spec_of
from edgetailor.server_side.training import FitReport, GenericData, fit, test_accuracy

ProgressFn = Callable[[int, int], None]


def pretrain(out_dir: str | Path, recipe: Recipe | None = None, data: LabeledImages | SampleStore | None = None,
             progress: ProgressFn | None = None, overwrite: bool = False, env: TrainingEnv = CPU,
             evaluate_every: int = 0) -> GECheckpoint:
    """Train GE on ``data`` (default: the built-in digits) and write a checkpoint to ``out_dir``.

    The split is stratified and seeded; the test part gives the accuracy
    recorded in the checkpoint, and a few training glyphs become the replay set.
    ``progress(images, total)`` follows the training. ``env`` says where to
    train (device, processes, resumable state); under torchrun only rank 0
    writes ``out_dir``. ``evaluate_every`` epochs the test accuracy is
    recorded in the checkpoint's ``training.history``.
    """
    recipe = (recipe or Recipe()).validate()
    cfg = recipe.pretrain
    store = as_store(data)
    try:
        shape = build_model(cfg.arch, len(store.label_names), cfg.widths or None, cfg.depth or None)
    except ConfigError as exc:
        raise ConfigError(f"[pretrain]: {exc.message}", hint=exc.hint) from None
    recipe.experts.resolve_taps(shape)
    split = split_generic(store, seed=cfg.seed)
    env.begin_run({"command": "pretrain", "recipe": recipe.to_dict(), "data": store.fingerprint(),
                  "toolkit_version": __version__, "processes": env.world_size})
    spec = input_spec_of(split.train)
    generic = GenericData(split.train, split.test, spec, cfg, env)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, len(store.label_names), cfg.widths or None, cfg.depth or None)
    report = FitReport()
    started = time.perf_counter()
    fit(model, generic, cfg.epochs, cfg.learning_rate, cfg.batch_size, seed=cfg.seed, progress=progress,
        evaluate_every=evaluate_every, report=report)
    meta = CheckpointMeta(arch=cfg.arch, labels=list(store.label_names), input=spec, widths=model.widths(),
                          depth=model_depth(model), seed=cfg.seed, data=provenance(store, split),
                          recipe=recipe.to_dict(), train_seconds=round(time.perf_counter() - started, 2),
                          generic_accuracy=test_accuracy(model, generic),
                          training={**env.describe(), **report.to_dict()})
    ckpt = GECheckpoint(model, meta, replay_subset(split.train, recipe.experts.replay_size, cfg.seed))
    env.write_once(Path(out_dir), ckpt.save, overwrite)
    return ckpt
