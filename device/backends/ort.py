"""ONNX Runtime backend: GE with an InferenceSession, LE and GN trained by
their step programs, which are ordinary ONNX inference graphs. So it needs
only the maintained ``onnxruntime`` package, the one with wheels for every
platform and Python (onnxruntime-training, deprecated, also works: it
provides the same ``onnxruntime`` module)."""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from edgetailor.device.backends.steps import StepProgramBackend
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.manifest import TrainablePartSpec


def import_onnxruntime():
    """``import onnxruntime`` without pulling in torch.

    onnxruntime-training's ``import onnxruntime`` probes
    ``onnxruntime.training.ortmodule``, which imports torch when it is
    installed: ~200 MB of RSS the device never uses. So torch is hidden
    while onnxruntime validates itself (it takes the ImportError as "no
    ORTModule"). The maintained package does not probe; hiding costs nothing."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import onnxruntime
    finally:
        if hide_torch:
            del sys.modules["torch"]
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


ort = import_onnxruntime()


def session_options(threads: int = 2):
    """GE: two threads, all a phone core cluster gives an app. Step and
    forward programs: one, since their ops are too small to share."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(threads, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # No arena: it keeps its peak for the life of the session (a few MB per
    # program here), and these tensors are small enough for plain malloc.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False  # a planned block per input shape, kept; GE sees two (the batch, the rest)
    # An int8 GE: on x86 without VNNI, ONNX Runtime's fast U8S8 kernels saturate
    # pairs of products to 16 bits, and a `server compress` int8 LeNet's logits
    # moved by up to 27 grid units (GE's accuracy on a user fell 4 points).
    # This makes it use exact U8U8 arithmetic there, as the firmware's kernels
    # and every other CPU compute; elsewhere it changes nothing.
    options.add_session_config_entry("session.x64quantprecision", "1")
    return options


def open_session(source: str | bytes, what: str, threads: int = 2):
    try:
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes, e.g. for an opset it does not know
        message = str(exc)
        hint = "re-export or re-download the bundle"
        if "opset" in message.lower() or "ir_version" in message.lower() or "ir version" in message.lower():
            hint = (f"onnxruntime {ort.__version__} is too old for this bundle: pip install -U 'onnxruntime>=1.17', "
                    "or re-export the bundle with an older opset")
        first_line = (message.splitlines() or ["(no message)"])[0][:300]
        raise BackendError(f"onnxruntime could not load {what}: {first_line}", hint=hint) from None


class OrtGlobalExpert:
    def __init__(self, bundle: Bundle):
        spec = bundle.manifest.global_expert
        self.session = open_session(str(bundle.path(spec.files["onnx"])), spec.files["onnx"])
        self.input_name = spec.input_name
        self.logits_name = spec.outputs["logits"]
        self.feature_names = spec.output_order[1:]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outputs = self.session.run([self.logits_name, *self.feature_names], {self.input_name: x})
        return outputs[0], dict(zip(self.feature_names, outputs[1:]))


class OrtProgram:
    def __init__(self, path: str, what: str):
        self.session = open_session(path, what, threads=1)
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        rows = inputs[0].shape[0]
        self.batch = rows if isinstance(rows, int) else None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.names, inputs)))


class OrtBackend(StepProgramBackend):
    name = "ort"
    format = "onnx"

    def load_global_expert(self, bundle: Bundle) -> OrtGlobalExpert:
        return OrtGlobalExpert(bundle)

    def load_program(self, bundle: Bundle, file: str, spec: TrainablePartSpec) -> OrtProgram:
        return OrtProgram(str(bundle.path(file)), file)
