"""ONNX Runtime backend: GE inference with an InferenceSession, LE and GN
training with onnxruntime-training's on-device training API."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from edgetailor.device.backends.base import is_weights_blob, unpack_weights
from edgetailor.toolkit.bundle import Bundle


def _import_onnxruntime():
    """Import onnxruntime and its training API without pulling in torch.

    ``import onnxruntime`` probes ``onnxruntime.training.ortmodule`` (which
    imports torch when it is installed), and ``onnxruntime.training``'s
    ``__init__`` imports torch-based optimisers. Neither is needed on the
    device, and torch alone would cost ~200 MB of RSS. So torch is hidden while
    onnxruntime validates itself (it treats the ImportError as "no ORTModule"),
    and the ``api`` sub-package, which needs only numpy and the C extension,
    is loaded without running its parent's ``__init__``.
    """
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import onnxruntime
    finally:
        if hide_torch:
            del sys.modules["torch"]
    if "onnxruntime.training.api" in sys.modules:
        return onnxruntime, sys.modules["onnxruntime.training.api"]
    placeholder = "onnxruntime.training" not in sys.modules
    if placeholder:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
        sys.modules["onnxruntime.training"] = package
    try:
        api = importlib.import_module("onnxruntime.training.api")
    finally:
        if placeholder:
            del sys.modules["onnxruntime.training"]
    return onnxruntime, api


ort, ort_api = _import_onnxruntime()
ort.set_default_logger_severity(3)


def _session_options():
    options = ort.SessionOptions()
    # Batches here are small: two threads is all a phone core cluster gives an app.
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    return options


class OrtGlobalExpert:
    def __init__(self, bundle: Bundle):
        spec = bundle.manifest.global_expert
        self.session = ort.InferenceSession(str(bundle.path(spec.files["onnx"])), _session_options(),
                                            providers=["CPUExecutionProvider"])
        self.input_name = spec.input_name
        self.logits_name = spec.outputs["logits"]
        self.feature_names = spec.output_order[1:]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outputs = self.session.run([self.logits_name, *self.feature_names], {self.input_name: x})
        return outputs[0], dict(zip(self.feature_names, outputs[1:]))


class OrtTrainer:
    """A Module + Optimizer over a part's training artifacts (AdamW in the optimizer graph)."""

    def __init__(self, bundle: Bundle, part: str, weights: dict[str, np.ndarray] | None = None):
        files = {k: str(bundle.path(v)) for k, v in bundle.manifest.part(part).training["onnx"].items()}
        self.state = ort_api.CheckpointState.load_checkpoint(files["checkpoint"])
        self.module = ort_api.Module(files["training_model"], self.state, files["eval_model"])
        for name, value in (weights or {}).items():  # only once a Module holds the state can it take values
            self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)
        self.optimizer = ort_api.Optimizer(files["optimizer_model"], self.module)
        self.output_name = bundle.manifest.part(part).output
        # Version-1 manifests do not list the parameters; the checkpoint has them.
        self.parameter_names = list(bundle.manifest.part(part).parameters or (n for n, _ in self.state.parameters))
        self.module.train()

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def step(self, *inputs: np.ndarray) -> float:
        loss = self.module(*inputs)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data) for name in self.parameter_names}

    def inference_model(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trained.onnx"
            self.module.export_model_for_inferencing(str(path), [self.output_name])
            return path.read_bytes()


class OrtTrainedPart:
    def __init__(self, model: bytes, input_names: list[str]):
        self.session = ort.InferenceSession(model, _session_options(), providers=["CPUExecutionProvider"])
        self.input_names = input_names

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.input_names, inputs)))[0]


class OrtBackend:
    name = "ort"

    def load_global_expert(self, bundle: Bundle) -> OrtGlobalExpert:
        return OrtGlobalExpert(bundle)

    def trainer(self, bundle: Bundle, part: str) -> OrtTrainer:
        return OrtTrainer(bundle, part)

    def load_trained(self, bundle: Bundle, part: str, blob: bytes) -> OrtTrainedPart:
        inputs = bundle.manifest.part(part).inputs
        if not is_weights_blob(blob):  # stored by edgetailor 0.1: the ONNX inference model itself
            return OrtTrainedPart(blob, inputs)
        weights = unpack_weights(blob, bundle, part, self.name)
        # The part's inference graph with these weights, as training exported it.
        return OrtTrainedPart(OrtTrainer(bundle, part, weights).inference_model(), inputs)
