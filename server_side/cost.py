"""What a model costs: parameters, multiply-accumulates per sample, and the
FLOPs of training it. The manifest records GE's, LE's and GN's; compression,
the learngene and its device profiles compare models by them."""

from __future__ import annotations

import math

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of Conv1d, Conv2d and Linear layers for one sample (batch 1),
    plus the parameter-free matmuls that a module declares with
    ``matmul_macs(output)`` (a transformer block's attention).

    Written here rather than pulled from a FLOP-counting package because the
    models are plain conv/linear/attention stacks and the count must be exact
    and dependency-free for the manifest."""
    total = 0

    def conv_hook(module: nn.Conv1d | nn.Conv2d, _inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output[0].numel() * module.in_features

    def matmul_hook(module: nn.Module, _inputs, output):
        nonlocal total
        total += module.matmul_macs(output[:1])

    handles = []
    for m in model.modules():
        if hasattr(m, "matmul_macs"):
            handles.append(m.register_forward_hook(matmul_hook))
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(*example)
    for h in handles:
        h.remove()
    return int(total)


def training_flops(macs_per_sample: int, samples: int, epochs: int) -> int:
    """Forward + backward ≈ 3 forward passes, 2 FLOPs per multiply-add."""
    return 3 * 2 * macs_per_sample * samples * epochs
