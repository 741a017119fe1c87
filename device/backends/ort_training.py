"""The ort-training backend: LE and GN trained with onnxruntime-training's
on-device training API and the bundle's training artifacts (GE runs as in
the ``ort`` backend).

Kept for parity checks and for bundles exported before step programs:
onnxruntime-training is deprecated since ONNX Runtime 1.20, has wheels only
for CPython <= 3.11 on Linux x86_64, and cannot share a venv with the
maintained ``onnxruntime`` (both install the ``onnxruntime`` module)."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from edgetailor.device.backends.base import is_weights_blob, unpack_weights
from edgetailor.device.backends.ort import OrtGlobalExpert, ort, session_options
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError


def _import_training_api():
    """onnxruntime-training's ``training.api``, loaded without running
    ``onnxruntime.training``'s ``__init__``, which imports torch-based
    optimisers the device never uses; the api needs only numpy and the C
    extension."""
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    placeholder = "onnxruntime.training" not in sys.modules
    if placeholder:
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = [os.path.join(os.path.dirname(ort.__file__), "training")]
        sys.modules["onnxruntime.training"] = package
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError:
        raise BackendError("the ort-training backend needs onnxruntime-training, and this onnxruntime "
                           f"({ort.__version__}) is the inference build",
                           hint="use --backend ort (step programs), or install onnxruntime-training in a venv "
                                "without onnxruntime") from None
    finally:
        if placeholder:
            del sys.modules["onnxruntime.training"]


ort_api = _import_training_api()


class OrtTrainer:
    """A Module + Optimizer over a part's training artifacts (AdamW in the optimizer graph)."""

    def __init__(self, bundle: Bundle, part: str, weights: dict[str, np.ndarray] | None = None):
        files = bundle.manifest.part(part).training_files("onnx", "ort-training")
        if files is None:
            raise BackendError(f"{bundle.source} has no onnxruntime-training artifacts for {part.replace('_', ' ')}",
                               hint="use --backend ort (step programs), or re-export with "
                                    "--extra-training ort-training")
        files = {k: str(bundle.path(v)) for k, v in files.items()}
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
        self.session = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
        self.input_names = input_names

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.input_names, inputs)))[0]


class OrtTrainingBackend:
    name = "ort-training"

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
