"""The compression stages, registered by kind in ``STAGES``.

A stage takes the ``CompressionState`` (the model so far, the dense fp32
teacher, the generic data) and changes the model; it returns what it did for
the run's metadata. Every stage ends with plain weights (no parametrizations
left), so stages compose in any order a recipe gives, and a later stage keeps
what an earlier one decided: zeros stay zero (``state.sparse``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from edgetailor.server_side.compress import pruning, quantization
from edgetailor.server_side.compress.quantization import QuantSpec
from edgetailor.server_side.compress.recipe import (QAT, Distill, LotteryTicket, PruneMagnitude, PruneNM,
                                                    PruneStructured, Quantize, Recovery)
from edgetailor.server_side.compress.training import apply_masks, bake, weight_layers, zero_masks
from edgetailor.server_side.training import GenericData, fit, test_accuracy
from edgetailor.server_side.models import build_model, model_depth

ProgressFn = Callable[[str, int, int], None]


@dataclass
class CompressionState:
    model: nn.Module
    teacher: nn.Module
    data: GenericData
    arch: str
    seed: int
    sparse: bool = False
    quant: QuantSpec | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def example(self) -> torch.Tensor:
        return self.data.example


def _recover(state: CompressionState, recovery: Recovery, label: str, progress: ProgressFn) -> None:
    """Fine-tune after a stage, keeping zeros at zero, distilled if asked."""
    if recovery.epochs == 0:
        return
    if state.sparse:
        apply_masks(state.model, zero_masks(state.model))
    fit(state.model, state.data, recovery.epochs, recovery.learning_rate, recovery.batch_size,
        teacher=state.teacher if recovery.distill else None, temperature=recovery.temperature,
        alpha=recovery.alpha, seed=state.seed, progress=lambda e, n: progress(label, e, n))
    bake(state.model)


def prune_structured(cfg: PruneStructured, state: CompressionState, progress: ProgressFn) -> dict:
    channels = pruning.prune_structured(state.model, state.example, cfg.ratio, cfg.importance)
    accuracy_before_recovery = test_accuracy(state.model, state.data)
    _recover(state, cfg.recovery, "recover (prune)", progress)
    return {"channels": channels, "accuracy_before_recovery": accuracy_before_recovery}


def prune_magnitude(cfg: PruneMagnitude, state: CompressionState, progress: ProgressFn) -> dict:
    masks = pruning.magnitude_masks(state.model, cfg.sparsity, cfg.scope, zero_masks(state.model))
    with torch.no_grad():
        for name, layer in _layers(state.model).items():
            layer.weight.mul_(masks[name])
    state.sparse = True
    accuracy_before_recovery = test_accuracy(state.model, state.data)
    _recover(state, cfg.recovery, "recover (prune)", progress)
    return {"accuracy_before_recovery": accuracy_before_recovery}


def lottery_ticket(cfg: LotteryTicket, state: CompressionState, progress: ProgressFn) -> dict:
    widths = state.model.widths() if hasattr(state.model, "widths") else None
    depth = model_depth(state.model)
    num_classes = state.model.num_classes

    def build() -> nn.Module:
        return build_model(state.arch, num_classes, widths, depth)

    model, history = pruning.lottery_ticket(
        build, state.data, cfg.sparsity, cfg.rounds, cfg.rewind_epochs, cfg.epochs, cfg.learning_rate,
        cfg.batch_size, cfg.scope, state.teacher if cfg.distill else None, state.seed,
        progress=lambda r, n: progress("ticket rounds", r, n))
    state.model = model.eval()
    state.sparse = True
    return {"rounds": history}


def prune_nm(cfg: PruneNM, state: CompressionState, progress: ProgressFn) -> dict:
    masks, skipped = pruning.nm_masks(state.model, cfg.n, cfg.m)
    with torch.no_grad():
        for name, layer in _layers(state.model).items():
            if name in masks:
                layer.weight.mul_(masks[name])
    state.sparse = True
    accuracy_before_recovery = test_accuracy(state.model, state.data)
    _recover(state, cfg.recovery, "recover (n:m)", progress)
    return {"dense_layers": skipped, "accuracy_before_recovery": accuracy_before_recovery,
            "note": f"layers whose input size is not a multiple of {cfg.m} stay dense" if skipped else ""}


def distill(cfg: Distill, state: CompressionState, progress: ProgressFn) -> dict:
    _recover(state, cfg.recovery, "distill", progress)
    return {}


def quantize(cfg: Quantize, state: CompressionState, progress: ProgressFn) -> dict:
    calibration = torch.as_tensor(state.data.calibration(cfg.calibration_samples, state.seed))
    if cfg.rounding == "flexround":
        scales = quantization.flexround(state.model, calibration, cfg.weight_bits, cfg.flexround_iterations,
                                        cfg.flexround_learning_rate, cfg.granularity, seed=state.seed,
                                        progress=lambda i, n: progress("flexround layers", i, n))
    else:
        scales = quantization.quantize_nearest(state.model, cfg.weight_bits, cfg.granularity)
    state.quant = QuantSpec(cfg.weight_bits, scales)
    return {}


def qat(cfg: QAT, state: CompressionState, progress: ProgressFn) -> dict:
    calibration = torch.as_tensor(state.data.calibration(cfg.calibration_samples, state.seed))
    if state.sparse:
        apply_masks(state.model, zero_masks(state.model))
    quantization.prepare_qat(state.model, cfg.weight_bits, calibration)
    rec = cfg.recovery
    # fp32: under autocast a conv would cast the fake-quantized weights to 16 bits and leave their grid
    fit(state.model, state.data, rec.epochs, rec.learning_rate, rec.batch_size,
        teacher=state.teacher if rec.distill else None, temperature=rec.temperature, alpha=rec.alpha,
        seed=state.seed, progress=lambda e, n: progress("qat", e, n), precision="fp32")
    bake(state.model)
    state.quant = QuantSpec(cfg.weight_bits, quantization.grid_scales(state.model, cfg.weight_bits))
    return {}


STAGES: dict[str, Callable[[Any, CompressionState, ProgressFn], dict]] = {
    PruneStructured.kind: prune_structured, PruneMagnitude.kind: prune_magnitude,
    LotteryTicket.kind: lottery_ticket, PruneNM.kind: prune_nm, Distill.kind: distill,
    Quantize.kind: quantize, QAT.kind: qat,
}


def run_stage(cfg: Any, state: CompressionState, progress: ProgressFn) -> dict:
    started = time.perf_counter()
    details = STAGES[cfg.kind](cfg, state, progress)
    state.model.eval()
    record = {"kind": cfg.kind, "config": asdict(cfg), "seconds": round(time.perf_counter() - started, 2),
              "generic_accuracy_torch": test_accuracy(state.model, state.data),
              "params": sum(p.numel() for p in state.model.parameters()),
              "weight_sparsity": round(pruning.sparsity_of(state.model), 4), **details}
    state.records.append(record)
    return record


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return dict(weight_layers(model))
