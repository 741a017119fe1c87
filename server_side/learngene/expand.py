"""``expand``: make the GE of one depth from a learngene.

The learngene initialises a ViT of that depth, a short fine-tune on the
generic data settles it, and the result is written as an ordinary GE
checkpoint (``server compress`` and ``export bundle`` take it like any
other), its metadata saying where it came from. Picking the depth that fits a
device profile measures exported files, so it lives a layer up, in
``edgetailor.app.learngene``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable


from edgetailor.toolkit import __version__
from edgetailor.toolkit.config import ExpertConfig, PersonalizeConfig, Recipe, load_recipe
from edgetailor.toolkit.data import LabeledImages, provenance
from edgetailor.toolkit.errors import ConfigError, EdgetailorError
from edgetailor.server_side.models import ViT
from edgetailor.server_side.checkpoint import CheckpointMeta, GECheckpoint, replay_subset
from edgetailor.server_side.learngene import gene
from edgetailor.server_side.learngene.recipe import DeviceProfile, TrainSchedule
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.samples import as_store
from edgetailor.server_side.training import fit, test_accuracy

ProgressFn = Callable[[int, int], None]


def expand_learngene(learngene_dir: str | Path, out: str | Path, depth: int,
                     schedule: TrainSchedule | None = None, data: LabeledImages | None = None,
                     progress: ProgressFn | None = None, overwrite: bool = False, epochs: int | None = None,
                     profile: DeviceProfile | None = None, estimate: dict[str, Any] | None = None,
                     env: TrainingEnv = CPU) -> GECheckpoint:
    """Expand the learngene in ``learngene_dir`` to ``depth``, fine-tune for
    ``schedule`` (default: the learngene recipe's [expand], ``epochs``
    overriding its length) and save the GE to ``out``. ``profile`` and its
    ``estimate`` (what the model costs on that device) are recorded in the
    checkpoint when the depth was picked for a device."""
    out = Path(out)
    if out.exists() and not overwrite and not (env.checkpoints and env.checkpoints.resume):
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    learngene, lg_meta = gene.load(learngene_dir)
    max_depth = learngene.cfg.max_depth
    schedule = schedule or TrainSchedule(**lg_meta.recipe.get("expand", {}))
    if epochs is not None:
        schedule.epochs = epochs
    schedule.validate("expand")
    if not 1 <= depth <= max_depth:
        raise ConfigError(f"depth {depth} is outside what this learngene makes",
                          hint=f"choose a depth in 1..{max_depth} (the learngene's max_depth)")

    data = as_store(data)
    if data.fingerprint() != lg_meta.data.get("sha256"):
        # other data is allowed (fine-tuning to a new domain), but the labels must agree
        if list(data.label_names) != list(lg_meta.labels):
            raise ConfigError(f"the data's labels {list(data.label_names)} differ from the learngene's "
                              f"{lg_meta.labels}", hint="expand on data with the learngene's labels")
    seed = lg_meta.seed
    env.begin_run({"command": "learngene expand", "learngene": lg_meta.weights_sha256, "depth": depth,
                  "schedule": asdict(schedule), "data": data.fingerprint(),
                  "toolkit_version": __version__, "processes": env.world_size})
    generic, split = gene.generic_data(lg_meta, data, env)
    model = learngene.expand(depth)
    accuracy_at_init = test_accuracy(model, generic)
    started = time.perf_counter()
    fit(model, generic, schedule.epochs, schedule.learning_rate, schedule.batch_size, seed=schedule.seed,
        progress=progress)
    seconds = time.perf_counter() - started

    cfg = learngene.cfg
    experts = ExpertConfig(**{**lg_meta.experts, "le_feature_tap": "", "gn_feature_tap": ""})
    # [pretrain] says how to train this model from scratch (the shipped vit
    # recipe at this size); how it was actually made is under meta.learngene
    pretrain_cfg = load_recipe("vit").pretrain
    pretrain_cfg.widths, pretrain_cfg.depth, pretrain_cfg.seed = list(cfg.widths), depth, seed
    recipe = Recipe(pretrain=pretrain_cfg,
                    experts=experts.resolve_taps(model),
                    personalize=PersonalizeConfig(**lg_meta.personalize)).validate()
    meta = CheckpointMeta(
        arch=ViT.arch, labels=list(lg_meta.labels), input=lg_meta.input, widths=model.widths(), depth=depth,
        seed=seed, data=provenance(data, split), recipe=recipe.to_dict(), train_seconds=round(seconds, 2),
        generic_accuracy=test_accuracy(model, generic),
        learngene={
            "path": str(learngene_dir), "method": lg_meta.method, "weights_sha256": lg_meta.weights_sha256,
            "toolkit_version": lg_meta.toolkit_version, "teacher": lg_meta.teacher,
            "generic_accuracy_at_init": accuracy_at_init, "finetune": asdict(schedule),
            "device_profile": None if profile is None else {**asdict(profile), "estimate": estimate},
        })
    replay = replay_subset(split.train, recipe.experts.replay_size, seed)
    ckpt = GECheckpoint(model, meta, replay)
    env.write_once(out, ckpt.save, overwrite=True)     # OUT exists only when --overwrite (checked above)
    return ckpt

