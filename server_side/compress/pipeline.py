"""``compress``: run a recipe's stages on a GE checkpoint and write the
compressed GE as a new checkpoint (which ``edgetailor export bundle`` turns
into a device bundle), its exports, and the report against the fp32 GE.

Everything a recipe could get wrong is checked before any training starts,
and the output directory is published only when the whole run succeeded.
"""

from __future__ import annotations

import copy
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import toolkit
from toolkit import atomic
from toolkit.data import LabeledImages
from toolkit.errors import ConfigError, EdgetailorError
from toolkit.users import simulate_users
from export.formats import get_format
from server_side.checkpoint import GECheckpoint
from server_side.compress import pruning, report as reporting
from server_side.compress.recipe import CompressRecipe, PruneStructured
from server_side.compress.stages import CompressionState, run_stage
from server_side import training
from server_side.training import GenericData

ProgressFn = Callable[[str, int, int], None]
EchoFn = Callable[[str], None]


def preflight(recipe: CompressRecipe, ckpt: GECheckpoint) -> None:
    """Refuse, before any work, what cannot succeed: a format that cannot carry
    the recipe's stages, or pruning beyond what the model's layers allow."""
    quantized = recipe.quantized is not None
    for name in recipe.export.formats:
        reason = get_format(name).cannot_carry(quantized)
        if reason:
            raise ConfigError(f"export format {name!r} cannot carry this recipe: {reason}",
                              hint=f"remove {name!r} from [export] formats")
    model = copy.deepcopy(ckpt.model)
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, PruneStructured):
            if not getattr(model, "structured_pruning", False):
                raise ConfigError(
                    f"stage[{i}] (prune_structured) does not support {ckpt.meta['arch']}: its checkpoint rebuilds "
                    "blocks of one width, and removing attention heads unevenly would break that",
                    hint="use prune_magnitude, prune_nm or quantize; for a smaller transformer, expand the "
                         "learngene to a lower depth (`edgetailor server learngene expand --depth N`)")
            try:
                plan = pruning.check_structured(model, stage.ratio)
            except ConfigError as exc:
                raise ConfigError(f"stage[{i}] (prune_structured): {exc}", hint=exc.hint) from None
            # later structured stages see the widths this one leaves
            widths = [keep for (_, keep) in plan.values()]
            model = type(model)(num_classes=model.num_classes, widths=widths) if hasattr(model, "widths") else model


def load_generic(ckpt: GECheckpoint, data: LabeledImages | None) -> tuple[GenericData, Any]:
    """The generic data split with the GE's own seed and normalised as GE expects."""
    from toolkit.config import PretrainConfig

    pretrain_cfg = PretrainConfig(**ckpt.meta.get("recipe", {}).get("pretrain", {}))
    return training.load_generic(ckpt.meta["input"], ckpt.meta.get("seed", 0), pretrain_cfg, data)


def compress(model_dir: str | Path, recipe: CompressRecipe, out: str | Path, data: LabeledImages | None = None,
             n_users: int = 3, overwrite: bool = False, progress: ProgressFn | None = None,
             echo: EchoFn | None = None) -> dict[str, Any]:
    """Compress the GE in ``model_dir`` with ``recipe`` into the checkpoint ``out``; returns the report."""
    say = echo or (lambda _m: None)
    tick = progress or (lambda *_a: None)
    out = Path(out)
    recipe.validate()
    ckpt = GECheckpoint.load(model_dir)
    if out.exists() and not overwrite:
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    if Path(model_dir).resolve() == out.resolve():
        raise EdgetailorError("--out must differ from --model: the fp32 GE is the reference of the report")
    preflight(recipe, ckpt)
    started = time.perf_counter()
    torch.manual_seed(ckpt.meta.get("seed", 0))
    generic, split = load_generic(ckpt, data)
    state = CompressionState(model=copy.deepcopy(ckpt.model), teacher=ckpt.model.eval(), data=generic,
                             arch=ckpt.meta["arch"], seed=ckpt.meta.get("seed", 0))
    for i, stage in enumerate(recipe.stages):
        say(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind}")
        record = run_stage(stage, state, tick)
        say(f"  generic accuracy (torch) {record['generic_accuracy_torch']:.4f}, "
            f"weight sparsity {record['weight_sparsity']:.2f}, {record['seconds']:.1f}s")

    test_x, test_y = generic.test_x.numpy(), generic.test_y.numpy()
    calibration = generic.calibration(recipe.quantized.calibration_samples if recipe.quantized else 64,
                                      state.seed)
    users = simulate_users(split.user_pool, n_users, seed=state.seed) if n_users else []
    rows: list[dict[str, Any]] = []
    with atomic.staged_dir(out, overwrite=overwrite) as staging, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in recipe.export.formats:
            fmt = get_format(name)
            say(f"exporting to {name} ({fmt.runtime})")
            ref_path = Path(tmp) / f"fp32{fmt.suffix}"
            fmt.export(ckpt.model, ref_path, calibration, None)
            files[name] = f"ge{fmt.suffix}"
            fmt.export(state.model, staging / files[name], calibration, state.quant)
            for variant, model, path in (("fp32 GE", ckpt.model, ref_path),
                                         ("compressed", state.model, staging / files[name])):
                rows.append({"variant": variant, "format": name, "runtime": fmt.runtime,
                             "params": sum(p.numel() for p in model.parameters()),
                             "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters()),
                             "flops": pruning.flops(model, generic.test_x),
                             "flops_nonzero": pruning.flops(model, generic.test_x, sparse=True),
                             **reporting.measure_file(fmt, path, test_x, test_y)})
        deployed = next(r for r in rows if r["variant"] == "compressed" and r["format"] == "onnx")
        compressed = GECheckpoint(state.model, _compressed_meta(ckpt, recipe, state, files, deployed,
                                                                str(model_dir)), ckpt.replay)
        compressed.save(staging)
        if users:
            say(f"personalizing LE+GN on {len(users)} simulated users, fp32 GE and compressed GE")
            for variant, directory in (("fp32 GE", Path(model_dir)), ("compressed", staging)):
                result = reporting.personalization_accuracy(directory, users, split.test)
                row = next(r for r in rows if r["variant"] == variant and r["format"] == "onnx")
                row["personalized_user_accuracy"] = result["user_accuracy"]
                row["personalized_generic_accuracy"] = result["generic_accuracy"]
                row["ge_only_user_accuracy"] = result["user_accuracy_ge_only"]
        reporting.relate(rows)
        report = {
            "recipe": recipe.to_dict(), "model": str(model_dir), "out": str(out),
            "stages": state.records, "rows": rows, "users": len(users),
            "not_exported": _not_exported(recipe),
            "notes": _notes(recipe, state),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        table = reporting.write(report, staging, f"{recipe.name or 'compression'}: {ckpt.meta['arch']}")
    report["table"] = table
    return report


def _compressed_meta(ckpt: GECheckpoint, recipe: CompressRecipe, state: CompressionState, files: dict[str, str],
                     deployed: dict[str, Any], source: str) -> dict[str, Any]:
    meta = copy.deepcopy(ckpt.meta)
    meta.update({
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": toolkit.__version__,
        "widths": state.model.widths() if hasattr(state.model, "widths") else None,
        # what the device will run: measured on the exported ONNX model, not in torch
        "generic_accuracy": deployed["generic_accuracy"],
        "compression": {
            "recipe": recipe.to_dict(),
            "source": {"model": source, "generic_accuracy": ckpt.meta.get("generic_accuracy"),
                       "created": ckpt.meta.get("created")},
            "stages": state.records,
            "sparse": state.sparse,
            "quantization": None if state.quant is None else {
                "weight_bits": state.quant.weight_bits, "weight_storage": "int8",
                "weight_granularity": "per output channel, symmetric",
                "activation_bits": state.quant.activation_bits, "activation_granularity": "per tensor"},
            "files": files,
        },
    })
    return meta


def _not_exported(recipe: CompressRecipe) -> dict[str, str]:
    from export.formats import FORMATS

    quantized = recipe.quantized is not None
    return {name: (fmt.cannot_carry(quantized) or "not asked for in [export] formats")
            for name, fmt in FORMATS.items() if name not in recipe.export.formats}


def _notes(recipe: CompressRecipe, state: CompressionState) -> list[str]:
    notes = []
    if state.sparse:
        notes.append("unstructured and N:M zeros are stored densely by ONNX, ExecuTorch and TFLite and run "
                     "at dense speed on their CPU kernels; 'zip KB' (deflate) shows what the zeros save "
                     "in transfer, 'FLOPs x' counts dense FLOPs (the report's flops_nonzero counts the rest)")
    if state.quant is not None and state.quant.weight_bits < 8:
        notes.append(f"{state.quant.weight_bits}-bit weights are stored in int8 (no 4-bit CPU kernels in "
                     "onnxruntime or XNNPACK for these layers), so the file is int8-sized")
    return notes

