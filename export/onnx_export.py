"""Writing ONNX files that every ONNX Runtime the bundles meet can read: one
exporter call for GE, LE and GN, and the IR-version cap.

ONNX Runtime 1.19 (the last onnxruntime-training, and older mobile builds)
reads ONNX IR version 10 at most, and current onnx writes newer versions, so
every ONNX file a bundle carries is capped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from edgetailor.toolkit import atomic

MAX_IR_VERSION = 10
OPSET = 17


def onnx_export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], training: bool, dynamic: list[str] | None = None) -> None:
    """``module`` as ONNX with a dynamic batch (on the ``dynamic`` inputs and
    outputs; by default all); ``training`` keeps it trainable (no constant
    folding, parameters as named initializers)."""
    batched = [*input_names, *output_names] if dynamic is None else dynamic
    dynamic_axes = {name: {0: "batch"} for name in batched}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript and
        # keeps parameters as named initializers, which training artifacts need.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                          do_constant_folding=not training,
                          training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL)


def cap_ir_version(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        atomic.write_bytes(path, model.SerializeToString())
