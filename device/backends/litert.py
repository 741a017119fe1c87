"""LiteRT backend: GE with the bundle's ``ge.tflite`` and LE and GN trained
by their TFLite step programs (builtin ops only, no Flex delegate), through
``ai_edge_litert`` (LiteRT, the maintained successor of tflite-runtime, which
fails with numpy 2), falling back to ``tflite_runtime``."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from edgetailor.device.backends.base import split_outputs
from edgetailor.device.backends.steps import StepProgramBackend
from edgetailor.toolkit.bundle import Bundle, tflite_output_position
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.manifest import TrainablePartSpec
from edgetailor.toolkit.native_output import quiet_native_output

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter

THREADS = min(2, os.cpu_count() or 1)


def _interpreter(path: str, threads: int):
    try:
        with quiet_native_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            interpreter = Interpreter(model_path=path, num_threads=threads)
            interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        raise BackendError(f"LiteRT could not load {path}: {str(exc)[:300]}",
                           hint="upgrade ai-edge-litert, or re-export or re-download the bundle") from None
    return interpreter


class LiteRTGlobalExpert:
    def __init__(self, bundle: Bundle):
        self.spec = bundle.manifest.global_expert
        self.interpreter = _interpreter(str(bundle.path(self.spec.files["tflite"])), THREADS)
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


class LiteRTProgram:
    """A step or forward program through its default signature: inputs
    ``args_0..``, outputs ``output_0..`` in the program's order."""

    def __init__(self, path: str):
        # One thread: a step is a few hundred thousand multiply-adds, less than a thread handoff costs.
        self.interpreter = _interpreter(path, 1)
        self.runner = self.interpreter.get_signature_runner()
        signature = self.interpreter.get_signature_list()["serving_default"]
        self.outputs = signature["outputs"]
        self.batch = int(self.runner.get_input_details()["args_0"]["shape"][0])

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = self.runner(**{f"args_{i}": x for i, x in enumerate(inputs)})
        return [result[name] for name in self.outputs]


class LiteRTBackend(StepProgramBackend):
    name = "litert"
    format = "tflite"

    def load_global_expert(self, bundle: Bundle) -> LiteRTGlobalExpert:
        return LiteRTGlobalExpert(bundle)

    def load_program(self, bundle: Bundle, file: str, spec: TrainablePartSpec) -> LiteRTProgram:
        return LiteRTProgram(str(bundle.path(file)))
