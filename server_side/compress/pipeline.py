"""The compression pipeline's server-side half: check a recipe against a GE
before any work, run its stages, and describe the result as a checkpoint.

``edgetailor.app.compress`` puts this together with export (every format's
file, measured in its runtime) and the device runtime (personalization on
simulated users) into ``server compress``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.formats import get_format
from edgetailor.server_side import training
from edgetailor.server_side.checkpoint import CheckpointMeta, GECheckpoint
from edgetailor.server_side.compress import pruning
from edgetailor.server_side.compress.recipe import CompressRecipe, PruneStructured
from edgetailor.server_side.compress.stages import CompressionState, run_stage
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.samples import SampleStore
from edgetailor.server_side.training import GenericData

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
                    f"stage[{i}] (prune_structured) does not support {ckpt.meta.arch}: its checkpoint rebuilds "
                    "blocks of one width, and removing attention heads unevenly would break that",
                    hint="use prune_magnitude, prune_nm or quantize; for a smaller transformer, expand the "
                         "learngene to a lower depth (`edgetailor server learngene expand --depth N`)")
            try:
                plan = pruning.check_structured(model, stage.ratio)
            except ConfigError as exc:
                raise ConfigError(f"stage[{i}] (prune_structured): {exc.message}", hint=exc.hint) from None
            # later structured stages see the widths this one leaves
            widths = [keep for (_, keep) in plan.values()]
            model = type(model)(num_classes=model.num_classes, widths=widths) if hasattr(model, "widths") else model


def load_generic(ckpt: GECheckpoint, data: LabeledImages | SampleStore | None,
                 env: TrainingEnv = CPU) -> tuple[GenericData, Any]:
    """The generic data split with the GE's own seed and normalised as GE expects."""
    return training.load_generic(ckpt.meta.input, ckpt.meta.seed, ckpt.meta.pretrain_config, data, env)


def run_stages(recipe: CompressRecipe, ckpt: GECheckpoint, generic: GenericData, progress: ProgressFn,
               echo: EchoFn) -> CompressionState:
    """The recipe's stages, in order, on a copy of GE (which stays the teacher)."""
    torch.manual_seed(ckpt.meta.seed)
    state = CompressionState(model=copy.deepcopy(ckpt.model), teacher=ckpt.model.eval(), data=generic,
                             arch=ckpt.meta.arch, seed=ckpt.meta.seed)
    for i, stage in enumerate(recipe.stages):
        echo(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind}")
        record = run_stage(stage, state, progress)
        echo(f"  generic accuracy (torch) {record['generic_accuracy_torch']:.4f}, "
             f"weight sparsity {record['weight_sparsity']:.2f}, {record['seconds']:.1f}s")
    return state


def compressed_meta(ckpt: GECheckpoint, recipe: CompressRecipe, state: CompressionState, files: dict[str, str],
                    deployed_accuracy: float, source: str) -> CheckpointMeta:
    """The compressed GE's metadata: the source GE's, plus how it was compressed.
    ``deployed_accuracy`` is measured on the exported ONNX model, what the device runs."""
    meta = ckpt.meta
    return meta.renewed(
        widths=state.model.widths() if hasattr(state.model, "widths") else None,
        generic_accuracy=deployed_accuracy,
        compression={
            "recipe": recipe.to_dict(),
            "source": {"model": source, "generic_accuracy": meta.generic_accuracy, "created": meta.created},
            "stages": state.records,
            "sparse": state.sparse,
            "quantization": None if state.quant is None else {
                "weight_bits": state.quant.weight_bits, "weight_storage": "int8",
                "weight_granularity": "per output channel, symmetric",
                "activation_bits": state.quant.activation_bits, "activation_granularity": "per tensor"},
            "files": files,
        })


def notes(recipe: CompressRecipe, state: CompressionState) -> list[str]:
    notes = []
    if state.sparse:
        notes.append("unstructured and N:M zeros are stored densely by ONNX, ExecuTorch and TFLite and run "
                     "at dense speed on their CPU kernels; 'zip KB' (deflate) shows what the zeros save "
                     "in transfer, 'FLOPs x' counts dense FLOPs (the report's flops_nonzero counts the rest)")
    if state.quant is not None and state.quant.weight_bits < 8:
        notes.append(f"{state.quant.weight_bits}-bit weights are stored in int8 (no 4-bit CPU kernels in "
                     "onnxruntime or XNNPACK for these layers), so the file is int8-sized")
    return notes

