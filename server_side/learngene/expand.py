"""``expand``: make the GE for one device class from a learngene.

The depth is given, or picked from a device profile as the deepest that fits
its flash, RAM and latency budgets. The learngene initialises a ViT of that
depth, a short fine-tune on the generic data settles it, and the result is
written as an ordinary GE checkpoint (``server compress`` and ``export
bundle`` take it like any other), its metadata saying where it came from.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import toolkit
from toolkit import atomic
from toolkit.config import ExpertConfig, PersonalizeConfig, Recipe, load_recipe
from toolkit.data import LabeledImages, load_generic_digits, provenance
from toolkit.errors import ConfigError, EdgetailorError
from toolkit.models import ViT
from export.bundle import count_macs
from export.formats import get_format
from server_side.checkpoint import FORMAT as CHECKPOINT_FORMAT, GECheckpoint
from server_side.learngene import gene
from server_side.learngene.recipe import DeviceProfile, TrainSchedule
from server_side.pretrain import _replay_subset
from server_side.training import fit, test_accuracy

ProgressFn = Callable[[int, int], None]


def footprint(learngene: gene.Learngene, depth: int) -> dict[str, Any]:
    """What a ViT of ``depth`` costs on a device: parameters, MACs, the GE file
    (exported, measured), and RAM (fp32 weights + peak activations at batch 1)."""
    model = learngene.expand(depth)
    example = torch.zeros(1, 1, ViT.image_size, ViT.image_size)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ge.onnx"
        get_format("onnx").export(model, path, example.numpy(), None)
        flash = path.stat().st_size
    tokens, (dim, mlp) = model.tokens + 1, model.widths()
    # live at once inside a block: the residual stream, its normed copy, and
    # either q/k/v with the scores and their softmax, or the MLP's hidden layer and its GELU
    attention = 2 * tokens * dim + 3 * tokens * dim + 2 * ViT.heads * tokens * tokens
    mlp_phase = 2 * tokens * dim + 2 * tokens * mlp
    ram = 4 * (params + max(attention, mlp_phase) + example.numel())
    return {"depth": depth, "params": params, "macs": count_macs(model, (example,)),
            "flash_kb": round(flash / 1024, 1), "ram_kb": round(ram / 1024, 1)}


def check_profile(row: dict[str, Any], profile: DeviceProfile) -> list[str]:
    """The budgets ``row`` exceeds, in words (empty: it fits)."""
    over = []
    if profile.flash_kb and row["flash_kb"] > profile.flash_kb:
        over.append(f"flash {row['flash_kb']:.0f} kB > {profile.flash_kb:g} kB")
    if profile.ram_kb and row["ram_kb"] > profile.ram_kb:
        over.append(f"RAM {row['ram_kb']:.0f} kB > {profile.ram_kb:g} kB")
    if profile.latency_ms:
        row["latency_ms"] = round(row["macs"] / profile.macs_per_ms, 3)
        if row["latency_ms"] > profile.latency_ms:
            over.append(f"latency {row['latency_ms']:.2f} ms > {profile.latency_ms:g} ms")
    return over


def pick_depth(learngene: gene.Learngene, profile: DeviceProfile) -> tuple[int, dict[str, Any]]:
    """The deepest model (up to the learngene's max_depth) that fits ``profile``.

    Cost grows with depth, so the search walks down from max_depth and stops
    at the first fit; when even depth 1 does not fit, the error gives its cost."""
    for depth in range(learngene.cfg.max_depth, 0, -1):
        row = footprint(learngene, depth)
        if not check_profile(row, profile):
            return depth, row
    over = "; ".join(check_profile(row, profile))
    raise ConfigError(f"no depth of this learngene fits device profile {profile.name!r}: even depth 1 needs "
                      f"{row['flash_kb']:.0f} kB flash, {row['ram_kb']:.0f} kB RAM, {row['macs']:,} MACs ({over})",
                      hint="raise the profile's budgets, or train a narrower learngene ([learngene] widths)")


def expand_learngene(learngene_dir: str | Path, out: str | Path, depth: int | None = None,
                     profile: DeviceProfile | None = None, schedule: TrainSchedule | None = None,
                     data: LabeledImages | None = None, progress: ProgressFn | None = None,
                     overwrite: bool = False, epochs: int | None = None) -> GECheckpoint:
    """Expand the learngene in ``learngene_dir`` to ``depth`` (or the deepest
    that fits ``profile``), fine-tune for ``schedule`` (default: the learngene
    recipe's [expand], ``epochs`` overriding its length) and save the GE to ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    learngene, lg_meta = gene.load(learngene_dir)
    max_depth = learngene.cfg.max_depth
    schedule = schedule or TrainSchedule(**lg_meta.get("recipe", {}).get("expand", {}))
    if epochs is not None:
        schedule.epochs = epochs
    schedule.validate("expand")
    if depth is None and profile is None:
        raise ConfigError("give a depth or a device profile", hint=f"--depth N (1..{max_depth}) or --device-profile")
    fitted = None
    if profile is not None:
        profile.validate()
        deepest, fitted = pick_depth(learngene, profile)
        if depth is not None and depth > deepest:
            over = "; ".join(check_profile(footprint(learngene, depth), profile))
            raise ConfigError(f"depth {depth} exceeds device profile {profile.name!r} ({over})",
                              hint=f"the deepest model that fits is depth {deepest}")
        if depth is not None and depth != deepest and 1 <= depth:
            fitted = footprint(learngene, depth)
            check_profile(fitted, profile)
        depth = depth or deepest
    if not 1 <= depth <= max_depth:
        raise ConfigError(f"depth {depth} is outside what this learngene makes",
                          hint=f"choose a depth in 1..{max_depth} (the learngene's max_depth)")

    data = data if data is not None else load_generic_digits()
    if data.fingerprint() != lg_meta["data"]["sha256"]:
        # other data is allowed (fine-tuning to a new domain), but the labels must agree
        if list(data.label_names) != list(lg_meta["labels"]):
            raise ConfigError(f"the data's labels {list(data.label_names)} differ from the learngene's "
                              f"{lg_meta['labels']}", hint="expand on data with the learngene's labels")
    seed = lg_meta.get("seed", 0)
    generic, split = gene.generic_data(lg_meta, data)
    model = learngene.expand(depth)
    accuracy_at_init = test_accuracy(model, generic)
    started = time.perf_counter()
    fit(model, generic, schedule.epochs, schedule.learning_rate, schedule.batch_size, seed=schedule.seed,
        progress=progress)
    seconds = time.perf_counter() - started

    cfg = learngene.cfg
    experts = ExpertConfig(**{**lg_meta.get("experts", {}), "le_feature_tap": "", "gn_feature_tap": ""})
    # [pretrain] says how to train this model from scratch (the shipped vit
    # recipe at this size); how it was actually made is under meta["learngene"]
    pretrain_cfg = load_recipe("vit").pretrain
    pretrain_cfg.widths, pretrain_cfg.depth, pretrain_cfg.seed = list(cfg.widths), depth, seed
    recipe = Recipe(pretrain=pretrain_cfg,
                    experts=experts.resolve_taps(model),
                    personalize=PersonalizeConfig(**lg_meta.get("personalize", {}))).validate()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "toolkit_version": toolkit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arch": ViT.arch,
        "widths": model.widths(),
        "depth": depth,
        "labels": list(lg_meta["labels"]),
        "input": lg_meta["input"],
        "data": provenance(data, split),
        "seed": seed,
        "recipe": recipe.to_dict(),
        "train_seconds": round(seconds, 2),
        "generic_accuracy": test_accuracy(model, generic),
        "learngene": {
            "path": str(learngene_dir), "method": lg_meta["method"], "weights_sha256": lg_meta["weights_sha256"],
            "toolkit_version": lg_meta["toolkit_version"], "teacher": lg_meta.get("teacher"),
            "generic_accuracy_at_init": accuracy_at_init, "finetune": asdict(schedule),
            "device_profile": None if profile is None else {**asdict(profile), "estimate": fitted},
        },
    }
    replay = _replay_subset(split.train, recipe.experts.replay_size, seed)
    ckpt = GECheckpoint(model, meta, replay)
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        ckpt.save(staging)
    return ckpt

