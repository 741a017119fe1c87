"""ExecuTorch backend: GE as the bundle's XNNPACK-lowered ``ge.pte`` (batch
1, as an app calls it), LE and GN trained by their step programs, plain
forward programs of portable ops (no training extension).

Imports torch: ExecuTorch's Python bindings load libtorch and take torch
tensors (an app's C++ runtime does not).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from edgetailor.device.backends.base import split_outputs
from edgetailor.device.backends.steps import StepProgramBackend
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.manifest import TrainablePartSpec
from edgetailor.toolkit.native_output import quiet_native_output

with quiet_native_output():
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

THREADS = min(2, os.cpu_count() or 1)


class ExecuTorchGlobalExpert:
    def __init__(self, bundle: Bundle):
        self.spec = bundle.manifest.global_expert
        with quiet_native_output():
            portable_lib._unsafe_reset_threadpool(THREADS)
            self.method = Runtime.get().load_program(bundle.path(self.spec.files["executorch"])).load_method("forward")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        # The program has a static batch of 1 (what an app runs); a batch runs image by image.
        rows = [self.method.execute([torch.from_numpy(np.ascontiguousarray(x[i:i + 1]))]) for i in range(len(x))]
        outputs = [np.concatenate([row[k].numpy() for row in rows]) for k in range(len(rows[0]))]
        return split_outputs(outputs, self.spec)


class ExecuTorchProgram:
    """Step and forward programs take the manifest's ``max_batch`` rows."""

    def __init__(self, path, batch: int):
        try:
            with quiet_native_output():
                self.method = Runtime.get().load_program(path).load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"ExecuTorch could not load {path}: {str(exc)[:300]}",
                               hint="upgrade executorch, or re-export or re-download the bundle") from None
        self.batch = batch

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        outputs = self.method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.numpy().copy() for o in outputs]


class ExecuTorchBackend(StepProgramBackend):
    name = "executorch"
    format = "executorch"

    def load_global_expert(self, bundle: Bundle) -> ExecuTorchGlobalExpert:
        return ExecuTorchGlobalExpert(bundle)

    def load_program(self, bundle: Bundle, file: str, spec: TrainablePartSpec) -> ExecuTorchProgram:
        return ExecuTorchProgram(bundle.path(file), int(spec.max_batch))
