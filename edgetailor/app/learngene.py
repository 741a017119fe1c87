"""Expanding a learngene for a device class: the deepest model that fits a
device profile's flash, RAM and latency budgets.

This combines the server side (the learngene and its expansion) with export
(the flash a model takes is the size of its exported GE file, measured, not
guessed), so it sits in the top layer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from edgetailor.toolkit.errors import ConfigError, EdgetailorError
from edgetailor.export.formats import get_exporter
from edgetailor.server_side.checkpoint import GECheckpoint
from edgetailor.server_side.cost import count_macs, count_params
from edgetailor.server_side.learngene import gene
from edgetailor.server_side.learngene.expand import expand_learngene
from edgetailor.server_side.learngene.recipe import DeviceProfile
from edgetailor.server_side.models import ViT


def footprint(learngene: gene.Learngene, depth: int) -> dict[str, Any]:
    """What a ViT of ``depth`` costs on a device: parameters, MACs, the GE file
    (exported, measured), and RAM (fp32 weights + peak activations at batch 1)."""
    model = learngene.expand(depth)
    example = torch.zeros(1, 1, ViT.image_size, ViT.image_size)
    params = count_params(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ge.onnx"
        get_exporter("onnx").export(model, path, example.numpy(), None)
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


def expand_for_device(learngene_dir: str | Path, out: str | Path, depth: int | None = None,
                      profile: DeviceProfile | None = None, **expand_options: Any) -> GECheckpoint:
    """``expand_learngene`` at ``depth``, or at the deepest depth that fits
    ``profile`` (both: the depth is checked against the profile). The other
    options go to ``expand_learngene`` (schedule, data, progress, overwrite, epochs)."""
    if depth is None and profile is None:
        raise ConfigError("give a depth or a device profile", hint="--depth N or --device-profile PROFILE")
    if Path(out).exists() and not expand_options.get("overwrite"):
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    estimate = None
    if profile is not None:
        profile.validate()
        learngene, _ = gene.load(learngene_dir)
        deepest, estimate = pick_depth(learngene, profile)
        if depth is not None and depth > deepest:
            over = "; ".join(check_profile(footprint(learngene, depth), profile))
            raise ConfigError(f"depth {depth} exceeds device profile {profile.name!r} ({over})",
                              hint=f"the deepest model that fits is depth {deepest}")
        if depth is not None and depth != deepest and 1 <= depth:
            estimate = footprint(learngene, depth)
            check_profile(estimate, profile)
        depth = depth or deepest
    return expand_learngene(learngene_dir, out, depth, profile=profile, estimate=estimate, **expand_options)
