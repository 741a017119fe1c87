"""LiteRT backend: GE inference with the bundle's ``ge.tflite`` through
``ai_edge_litert`` (LiteRT, the maintained successor of tflite-runtime, which
fails with numpy 2), falling back to ``tflite_runtime``. LiteRT has no
on-device training here, so LE and GN train on another backend
(``device.backends.choose_backends`` pairs them)."""

from __future__ import annotations

import os

import numpy as np

from edgetailor.device.backends.base import split_outputs
from edgetailor.toolkit.bundle import Bundle, tflite_output_position
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.native_output import quiet_native_output

GE_ONLY_HINT = "LE and GN train on another backend; DeviceRuntime.open pairs LiteRT with the best installed one"

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter

THREADS = min(2, os.cpu_count() or 1)


class LiteRTGlobalExpert:
    def __init__(self, bundle: Bundle):
        self.spec = bundle.manifest.global_expert
        with quiet_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            self.interpreter = Interpreter(model_path=str(bundle.path(self.spec.files["tflite"])),
                                           num_threads=THREADS)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.outputs = [d["index"] for d in sorted(self.interpreter.get_output_details(), key=tflite_output_position)]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # The model has a static batch of 1 (what an app runs); a batch runs image by image.
        rows = []
        for i in range(len(x)):
            self.interpreter.set_tensor(self.input, np.ascontiguousarray(x[i:i + 1], dtype=np.float32))
            self.interpreter.invoke()
            rows.append([self.interpreter.get_tensor(k).copy() for k in self.outputs])
        return split_outputs([np.concatenate(column) for column in zip(*rows)], self.spec)


class LiteRTBackend:
    name = "litert"

    def load_global_expert(self, bundle: Bundle) -> LiteRTGlobalExpert:
        return LiteRTGlobalExpert(bundle)

    def trainer(self, bundle: Bundle, part: str):
        raise BackendError("LiteRT runs GE only", hint=GE_ONLY_HINT)

    def load_trained(self, bundle: Bundle, part: str, blob: bytes):
        raise BackendError("LiteRT runs GE only", hint=GE_ONLY_HINT)
