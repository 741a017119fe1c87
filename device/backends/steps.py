"""Training with a bundle's step programs: what the ``ort``, ``litert`` and
``executorch`` backends share.

A step program is an ordinary inference program (``export.step_programs``):
it takes a batch, the flat parameters and AdamW's two moments, and returns
the loss and their new values. So the runtime needs no training package:
this module keeps the three vectors in numpy, pads short batches with rows of
weight 0 (the programs have a static batch), and feeds them back in. Each
backend supplies only ``load_program``: how its runtime loads and runs a file.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from edgetailor.device.backends.base import unpack_weights
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError, PersonalizationError
from edgetailor.toolkit.formats import STEPS
from edgetailor.toolkit.manifest import TrainablePartSpec


class Program(Protocol):
    batch: int | None    # the rows it takes, or None for any number

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Positional inputs, in the order ``export.step_programs`` documents -> positional outputs."""


def step_files(bundle: Bundle, part: str, fmt: str) -> dict[str, str]:
    files = bundle.manifest.part(part).training_files(fmt, STEPS)
    if files is None:
        raise BackendError(f"{bundle.source} has no {fmt} step programs for {part.replace('_', ' ')}",
                           hint="re-export the bundle with this edgetailor (`edgetailor export bundle`)")
    return files


def flatten(weights: dict[str, np.ndarray], spec: TrainablePartSpec) -> np.ndarray:
    return np.concatenate([np.asarray(weights[n], np.float32).reshape(-1) for n in spec.parameter_order])


def unflatten(flat: np.ndarray, spec: TrainablePartSpec) -> dict[str, np.ndarray]:
    weights, at = {}, 0
    for name in spec.parameter_order:
        shape = spec.parameters[name]
        size = int(np.prod(shape))
        weights[name] = flat[at:at + size].reshape(shape).copy()
        at += size
    return weights


class StepTrainer:
    """Trains one part by running its step program (the ``PartTrainer`` protocol)."""

    def __init__(self, program: Program, bundle: Bundle, part: str):
        self.program = program
        self.spec = bundle.manifest.part(part)
        self.part = part
        self.params = np.load(bundle.path(self.spec.initial_parameters)).astype(np.float32).reshape(-1)
        expected = sum(int(np.prod(s)) for s in self.spec.parameters.values())
        if self.params.size != expected:
            raise BackendError(f"{self.spec.initial_parameters} holds {self.params.size} values, {part} has "
                               f"{expected} parameters", hint="the bundle is damaged; re-export it")
        self.m = np.zeros_like(self.params)
        self.v = np.zeros_like(self.params)
        self.batch = int(self.spec.max_batch)
        self.t = 0
        self.lr = np.array([1e-3], np.float32)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = np.array([lr], np.float32)

    def step(self, *inputs: np.ndarray) -> float:
        *features, labels = inputs
        rows = len(labels)
        if rows > self.batch:
            raise PersonalizationError(f"a training batch of {rows} rows is more than this bundle's "
                                       f"{self.part.replace('_', ' ')} step program takes ({self.batch})",
                                       hint="lower personalize.batch_size to the bundle's default or below")
        weights = np.ones(self.batch, np.float32)
        if rows < self.batch:
            features = [_pad(x, self.batch) for x in features]
            labels = _pad(labels, self.batch)
            weights[rows:] = 0.0
        self.t += 1
        loss, self.params, self.m, self.v = self.program.run([
            *(np.ascontiguousarray(x, np.float32) for x in features), np.ascontiguousarray(labels, np.int32),
            weights, np.array([self.t], np.float32), self.lr, self.params, self.m, self.v])
        return float(np.asarray(loss).reshape(-1)[0])

    def weights(self) -> dict[str, np.ndarray]:
        return unflatten(np.asarray(self.params), self.spec)


class ForwardPart:
    """A trained part run by its forward program (the ``TrainedPart`` protocol)."""

    def __init__(self, program: Program, params: np.ndarray):
        self.program = program
        self.params = np.ascontiguousarray(params, np.float32)

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        n = len(inputs[0])
        step = self.program.batch
        if step is None:
            return self.program.run([*(np.ascontiguousarray(x, np.float32) for x in inputs), self.params])[0]
        chunks = []
        for start in range(0, n, step):
            part = [_pad(np.ascontiguousarray(x[start:start + step], np.float32), step) for x in inputs]
            chunks.append(self.program.run([*part, self.params])[0][:min(step, n - start)])
        return np.concatenate(chunks)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), dtype=x.dtype)
    out[:len(x)] = x
    return out


class StepProgramBackend:
    """A backend that trains with its format's step programs; subclasses set
    ``name`` and ``format`` and load programs in their runtime."""

    name: str
    format: str

    def load_program(self, bundle: Bundle, file: str, spec: TrainablePartSpec) -> Program:
        raise NotImplementedError

    def trainer(self, bundle: Bundle, part: str) -> StepTrainer:
        spec = bundle.manifest.part(part)
        return StepTrainer(self.load_program(bundle, step_files(bundle, part, self.format)["step"], spec),
                           bundle, part)

    def load_trained(self, bundle: Bundle, part: str, blob: bytes) -> ForwardPart:
        spec = bundle.manifest.part(part)
        weights = unpack_weights(blob, bundle, part, self.name)
        program = self.load_program(bundle, step_files(bundle, part, self.format)["forward"], spec)
        return ForwardPart(program, flatten(weights, spec))
