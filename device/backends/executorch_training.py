"""The executorch-training backend: LE and GN trained with joint
forward-backward programs in ``executorch.extension.training``'s layout (GE
runs as in the ``executorch`` backend). Kept for parity checks: the
extension is experimental and ships only SGD, and the ``executorch`` backend
trains with plain step programs instead.

Two things here are workarounds, written up in
docs/upstream/executorch-training.md:
- ``_load_for_executorch_from_buffer`` does not keep the Python buffer alive,
  and the runtime reads the program from it for as long as it runs, so the
  buffer is held on the object that runs the program. Dropping it gave the
  random NaN losses, "InvalidProgram" errors and crashes seen in a first trial.
- The training extension ships only SGD. Every other backend personalizes
  with AdamW (ORT's optimizer graph, torch), so ``AdamW`` below does the same
  update in numpy, directly on the program's parameter memory.

Imports torch: ExecuTorch's Python bindings load libtorch (an app's C++
runtime does not).
"""

from __future__ import annotations

import numpy as np

from edgetailor.device.backends.base import unpack_weights
from edgetailor.device.backends.executorch import ExecuTorchGlobalExpert
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.native_output import quiet_native_output as _quiet_fds


with _quiet_fds():
    import torch
    from executorch.extension.pybindings import portable_lib


class AdamW:
    """ONNX Runtime's AdamWOptimizer op (adam_mode 1, the one training
    artifacts build: eps added to sqrt(v), bias correction folded into the step
    size; betas 0.9/0.999, eps 1e-6, no weight decay), updating arrays in place."""

    def __init__(self, parameters: list[np.ndarray], betas=(0.9, 0.999), eps: float = 1e-6):
        self.parameters = parameters
        self.m = [np.zeros_like(p) for p in parameters]
        self.v = [np.zeros_like(p) for p in parameters]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.lr = 1e-3
        self.t = 0

    def step(self, gradients: list[np.ndarray]) -> None:
        self.t += 1
        step_size = self.lr * np.sqrt(1.0 - self.beta2 ** self.t) / (1.0 - self.beta1 ** self.t)
        for p, g, m, v in zip(self.parameters, gradients, self.m, self.v):
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            p -= (step_size * m / (np.sqrt(v) + self.eps)).astype(p.dtype)


class TrainingProgram:
    """One joint forward-backward program: (inputs..., targets) -> loss,
    logits, gradients, parameters. The parameter outputs alias the program's
    own weights, so updating them in place trains the program."""

    def __init__(self, bundle: Bundle, part: str):
        spec = bundle.manifest.part(part)
        self.part = part
        self.max_batch = int(spec.max_batch)
        files = spec.training_files("executorch", "executorch-training")
        if files is None:
            raise BackendError(f"{bundle.source} has no ExecuTorch training-extension program for "
                               f"{part.replace('_', ' ')}",
                               hint="use --backend executorch (step programs), or re-export with "
                                    "--extra-training executorch-training")
        self.buffer = bundle.path(files["program"]).read_bytes()  # must outlive the program
        with _quiet_fds():
            self.program = portable_lib._load_for_executorch_from_buffer(self.buffer)
        self.gradients_at = self.program.run_method("__et_training_gradients_index_forward", ())[0]
        self.parameters_at = self.program.run_method("__et_training_parameters_index_forward", ())[0]
        self.names = [n.removeprefix("part.") for n in self.program.run_method("__et_training_fqn_forward", ())]
        if sorted(self.names) != sorted(spec.parameters):
            raise BackendError(f"the ExecuTorch program of {part} trains {self.names}, the manifest lists "
                               f"{list(spec.parameters)}", hint="re-export the bundle")
        dims = [spec.feature_dim, *([len(bundle.labels)] if len(spec.inputs) == 2 else [])]
        outputs = self._run([np.zeros((1, d), np.float32) for d in dims], np.zeros(1, np.int64))
        # numpy views of the program's weights; writing to them changes the program
        self.parameters = [p.numpy() for p in outputs[self.parameters_at:]]

    def _run(self, inputs: list[np.ndarray], target: np.ndarray):
        if len(target) > self.max_batch:
            raise BackendError(f"a batch of {len(target)} rows is more than this bundle's ExecuTorch "
                               f"{self.part.replace('_', ' ')} program takes ({self.max_batch})",
                               hint="lower personalize.batch_size, or use --backend executorch")
        args = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in inputs]
        args.append(torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64)))
        return self.program.run_method("forward", args, clone_outputs=False)

    def forward_backward(self, inputs: list[np.ndarray],
                         target: np.ndarray) -> tuple[float, np.ndarray, list[np.ndarray]]:
        outputs = self._run(inputs, target)
        return (float(outputs[0]), outputs[1].numpy().copy(),
                [g.numpy() for g in outputs[self.gradients_at:self.parameters_at]])

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for name, parameter in zip(self.names, self.parameters):
            parameter[...] = weights[name]

    def weights(self) -> dict[str, np.ndarray]:
        return {name: parameter.copy() for name, parameter in zip(self.names, self.parameters)}


class ExecuTorchTrainer:
    def __init__(self, bundle: Bundle, part: str):
        self.program = TrainingProgram(bundle, part)
        self.optimizer = AdamW(self.program.parameters)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr = lr

    def step(self, *inputs: np.ndarray) -> float:
        loss, _, gradients = self.program.forward_backward(list(inputs[:-1]), inputs[-1])
        self.optimizer.step(gradients)
        return loss

    def weights(self) -> dict[str, np.ndarray]:
        return self.program.weights()


class ExecuTorchTrainedPart:
    """Inference through the training program (its logits output): an
    ExecuTorch program's weights are fixed at export, and this one's are the
    ones that can be set. The gradients it also computes cost a few hundred
    multiply-adds per row."""

    def __init__(self, bundle: Bundle, part: str, weights: dict[str, np.ndarray]):
        self.program = TrainingProgram(bundle, part)
        self.program.set_weights(weights)

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        n, step = len(inputs[0]), self.program.max_batch
        chunks = [self.program.forward_backward([x[i:i + step] for x in inputs],
                                                np.zeros(min(step, n - i), np.int64))[1]
                  for i in range(0, n, step)]
        return np.concatenate(chunks)


class ExecuTorchTrainingBackend:
    name = "executorch-training"

    def load_global_expert(self, bundle: Bundle) -> ExecuTorchGlobalExpert:
        return ExecuTorchGlobalExpert(bundle)

    def trainer(self, bundle: Bundle, part: str) -> ExecuTorchTrainer:
        return ExecuTorchTrainer(bundle, part)

    def load_trained(self, bundle: Bundle, part: str, blob: bytes) -> ExecuTorchTrainedPart:
        return ExecuTorchTrainedPart(bundle, part, unpack_weights(blob, bundle, part, self.name))
