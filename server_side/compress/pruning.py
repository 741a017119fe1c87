"""Pruning: structured (channels, with Torch-Pruning), unstructured magnitude,
N:M semi-structured, and the lottery-ticket procedure.

Structured pruning changes the architecture (smaller tensors, real savings on
every runtime). The other three leave zeros in dense tensors: they shrink a
compressed file and suit sparse kernels, but the ONNX Runtime, XNNPACK and
LiteRT CPU kernels used here run them at dense speed, which the report says.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from edgetailor.toolkit.errors import ConfigError
from edgetailor.server_side.cost import count_macs
from edgetailor.server_side.compress.training import apply_masks, bake, weight_layers
from edgetailor.server_side.training import GenericData, fit, test_accuracy


def output_layer(model: nn.Module) -> nn.Module:
    return model.head()


def check_structured(model: nn.Module, ratio: float) -> dict[str, tuple[int, int]]:
    """Channels before and after for each prunable layer; refuses a ratio that
    would leave a layer without channels. Torch-Pruning rounds the kept count
    the same way (``int(n * (1 - ratio))``), so this is what it will do."""
    plan = {}
    head = output_layer(model)
    for name, layer in weight_layers(model):
        if layer is head:
            continue
        width = _width(layer)
        keep = int(width * (1 - ratio))
        if keep < 1:
            raise ConfigError(f"pruning ratio {ratio} leaves layer {name} ({width} channels) with none",
                              hint=f"the largest ratio this model allows is {1 - 1 / width:.3f} "
                                   f"(layer {name} has {width} channels)")
        plan[name] = (width, keep)
    return plan


def prune_structured(model: nn.Module, example: torch.Tensor, ratio: float, importance: str) -> dict:
    """Remove ``ratio`` of the channels of every layer but the output layer,
    by group norm of all weights coupled to each channel (Torch-Pruning's
    dependency graph finds the couplings: conv2 -> flatten -> fc1, ...)."""
    import torch_pruning as tp

    plan = check_structured(model, ratio)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=ratio, ignored_layers=[output_layer(model)])
    pruner.step()
    layers = dict(weight_layers(model))
    return {name: {"before": before, "after": _width(layers[name])} for name, (before, _) in plan.items()}


def _width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def magnitude_masks(model: nn.Module, sparsity: float, scope: str,
                    current: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks that zero ``sparsity`` of all conv/linear weights by |w|.

    ``global`` ranks all weights together (small layers keep what they need);
    ``layer`` takes the same share from each. Already-pruned weights (``current``)
    stay pruned and count towards the sparsity."""
    layers = weight_layers(model)
    current = current or {}
    scores = {name: layer.weight.detach().abs() * current.get(name, torch.ones_like(layer.weight))
              for name, layer in layers}
    if scope == "global":
        everything = torch.cat([s.flatten() for s in scores.values()])
        k = int(sparsity * everything.numel())
        threshold = everything.kthvalue(k).values if k > 0 else everything.min() - 1
        return {name: s > threshold for name, s in scores.items()}
    masks = {}
    for name, s in scores.items():
        k = int(sparsity * s.numel())
        threshold = s.flatten().kthvalue(k).values if k > 0 else s.min() - 1
        masks[name] = s > threshold
    return masks


def nm_masks(model: nn.Module, n: int, m: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M keep-masks along each layer's input (reduction) dimension, the layout
    that sparse tensor cores and 2:4 kernels accelerate. Layers whose input
    size is not a multiple of M stay dense and are returned as skipped."""
    masks, skipped = {}, []
    for name, layer in weight_layers(model):
        w = layer.weight.detach()
        rows = w.reshape(w.shape[0], -1)
        if rows.shape[1] % m:
            skipped.append(name)
            continue
        groups = rows.abs().reshape(rows.shape[0], -1, m)
        keep = groups.topk(n, dim=2).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
        masks[name] = mask.reshape(w.shape)
    return masks, skipped


def sparsity_of(model: nn.Module) -> float:
    """Share of exactly-zero weights over all conv/linear weights."""
    zeros = total = 0
    for _, layer in weight_layers(model):
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    return zeros / total


def lottery_ticket(build: Callable[[], nn.Module], data: GenericData, sparsity: float, rounds: int,
                   rewind_epochs: int, epochs: int, learning_rate: float, batch_size: int, scope: str,
                   teacher: nn.Module | None, seed: int,
                   progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; the
    rewinding to iteration k of Frankle et al., "Stabilizing the Lottery Ticket
    Hypothesis"). Each round prunes ``1 - (1 - sparsity)^(1/rounds)`` of the
    surviving weights, so ``rounds`` rounds reach ``sparsity`` exactly.

    The network is re-trained from the GE's own initialization (same
    architecture and seed), as the procedure needs its early weights."""
    torch.manual_seed(seed)
    model = build()
    fit(model, data, rewind_epochs, learning_rate, batch_size, teacher, seed=seed)
    rewind_state = copy.deepcopy(model.state_dict())
    remaining_epochs = epochs - rewind_epochs
    fit(model, data, remaining_epochs, learning_rate, batch_size, teacher, seed=seed + 1)
    history = []
    masks: dict[str, torch.Tensor] = {}
    per_round = 1 - (1 - sparsity) ** (1 / rounds)
    for r in range(1, rounds + 1):
        target = 1 - (1 - per_round) ** r if r < rounds else sparsity
        masks = magnitude_masks(model, target, scope, masks)
        model = build()
        model.load_state_dict(rewind_state)       # rewind the survivors ...
        apply_masks(model, masks)                 # ... and keep the pruned ones at zero
        fit(model, data, remaining_epochs, learning_rate, batch_size, teacher, seed=seed + 1 + r)
        bake(model)
        history.append({"round": r, "sparsity": round(_mask_sparsity(masks), 4),
                        "accuracy": test_accuracy(model, data)})
        if progress:
            progress(r, rounds)
    return model, history


def _mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return 1 - kept / total if total else 0.0


def flops(model: nn.Module, example: torch.Tensor, sparse: bool = False) -> int:
    """FLOPs (2 x multiply-adds) of conv/linear layers for one sample; with
    ``sparse`` only multiply-adds by non-zero weights count."""
    if not sparse:
        return 2 * count_macs(model, (example[:1],))
    total = 0

    def hook(layer, _inputs, output):
        nonlocal total
        positions = output[0].numel() // _width(layer)
        total += 2 * int((layer.weight != 0).sum()) * positions

    handles = [layer.register_forward_hook(hook) for _, layer in weight_layers(model)]
    with torch.no_grad():
        model(example[:1])
    for h in handles:
        h.remove()
    return int(total)

