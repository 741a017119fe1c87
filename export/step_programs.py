"""LE's and GN's training step as a plain inference program, in every format.

The runtimes' own training packages are deprecated (onnxruntime-training,
last released in 1.19.2 for CPython <= 3.11 on Linux x86_64), experimental
(ExecuTorch's training extension, SGD only) or need Flex ops (TFLite). LE and
GN are small enough that their whole training step, forward, gradients and
AdamW update, is an ordinary inference graph that any runtime's inference
build executes: ONNX Runtime everywhere (Python, Mobile, Web, Node), LiteRT's
builtin ops, ExecuTorch's portable ops, and later a microcontroller.

Each part gets two programs:

- ``step``: (part inputs..., labels int32 [B], weights float32 [B],
  step float32 [1], learning_rate float32 [1], params [P], adam_m [P],
  adam_v [P]) -> (loss, new_params, new_adam_m, new_adam_v). The batch B is
  static (the manifest's ``max_batch``): a short batch is padded with rows of
  weight 0, which is what lets static-shape runtimes train. The loss is the
  weighted mean softmax cross-entropy.
- ``forward``: (part inputs..., params [P]) -> logits. ONNX takes any batch;
  ExecuTorch and TFLite take B rows.

Parameters travel as one flat float32 vector in sorted-name order (the
manifest's ``parameters``), so a client holds three buffers (weights, AdamW's
two moments) whatever the part's design.

The step is generated, not written by hand: ``torch.func.grad_and_value`` of
the part's loss, traced by ``make_fx`` into core-ATen ops, so any LE or GN
design exports the same way. Only the AdamW update is spelled out below, and
every program is run in its own runtime against ``torch.optim.AdamW`` over
100 steps before a bundle is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import ExportError
from edgetailor.toolkit.formats import STEPS
from edgetailor.toolkit.native_output import quiet_native_output
from edgetailor.export.onnx_export import OPSET, cap_ir_version, onnx_export
from edgetailor.export.parts import TrainablePart

STEP_INPUTS = ("labels", "weights", "step", "learning_rate", "params", "adam_m", "adam_v")
STEP_OUTPUTS = ("loss", "new_params", "new_adam_m", "new_adam_v")
CHECK_STEPS = 100
# Largest parameter difference from torch.optim.AdamW after CHECK_STEPS steps.
# float32 kernels that sum in another order drift a little with each step:
# the ViT's 49-position channel-mix LE in TFLite ends 2.7e-5 away, LeNet's
# parts under 1e-5. A kernel that computes something else ends far away
# (a ReLU flipped by rounding: 0.06), so 1e-4 still tells the two apart.
STEP_TOLERANCE = 1e-4

Program = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""A loaded program: positional inputs -> positional outputs."""


class StepFunctions:
    """The part's loss, step and forward as functions of a flat parameter vector."""

    def __init__(self, part: TrainablePart):
        self.part = part
        self.module = copy.deepcopy(part.module)
        named = dict(self.module.named_parameters())
        self.names = part.parameter_order
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(flat, self.sizes), self.shapes)}

    def logits(self, flat: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(flat), tuple(inputs))

    def loss(self, flat: torch.Tensor, inputs: Sequence[torch.Tensor], labels: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean cross-entropy. The one-hot comes from a comparison
        rather than F.cross_entropy, so that the gradient is elementwise
        (softmax minus one-hot) with no gather or scatter, which static-shape
        runtimes and microcontroller kernels handle poorly; reductions name
        their dims because the ONNX exporter needs them explicit."""
        log_p = F.log_softmax(self.logits(flat, inputs), dim=1)
        classes = torch.arange(self.part.num_classes, dtype=labels.dtype)
        one_hot = torch.where(labels.unsqueeze(1) == classes.unsqueeze(0), 1.0, 0.0)
        per_row = -(one_hot * log_p).sum(dim=1)
        return (per_row * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)

    def step(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One AdamW step, as torch.optim.AdamW computes it (single-tensor path)."""
        n = len(self.part.input_names)
        inputs = args[:n]
        labels, weights, t, lr, params, m, v = args[n:]
        gradient, loss = grad_and_value(lambda flat: self.loss(flat, inputs, labels, weights))(params)
        opt = self.part.optimizer
        beta1, beta2 = opt.betas
        if opt.weight_decay:
            params = params * (1.0 - lr * opt.weight_decay)
        m = beta1 * m + (1.0 - beta1) * gradient
        v = beta2 * v + (1.0 - beta2) * gradient * gradient
        denominator = torch.sqrt(v) / torch.sqrt(1.0 - beta2 ** t) + opt.eps
        params = params - (lr / (1.0 - beta1 ** t)) * m / denominator
        return loss, params, m, v

    def step_example(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        inputs, labels = self.part.example(self.part.max_batch, seed)
        params = self.part.flat_parameters()
        return (*inputs, labels.to(torch.int32), torch.ones(self.part.max_batch), torch.ones(1),
                torch.full((1,), self.part.learning_rate), params, torch.zeros_like(params), torch.zeros_like(params))

    def traced_step(self) -> torch.fx.GraphModule:
        from torch._decomp import core_aten_decompositions
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(self.step, decomposition_table=core_aten_decompositions())(*self.step_example())

    def forward_module(self) -> nn.Module:
        """The forward as a plain graph of ATen ops (the ONNX exporter cannot
        trace ``functional_call``); nothing in it depends on the batch size."""
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(_Forward(self))(*self.forward_example(2))

    def forward_example(self, batch: int) -> tuple[torch.Tensor, ...]:
        inputs, _ = self.part.example(batch)
        return (*inputs, self.part.flat_parameters())

    @property
    def step_input_names(self) -> list[str]:
        return [*self.part.input_names, *STEP_INPUTS]

    @property
    def forward_input_names(self) -> list[str]:
        return [*self.part.input_names, "params"]


class _Forward(nn.Module):
    """(part inputs..., flat params) -> logits."""

    def __init__(self, functions: StepFunctions):
        super().__init__()
        self.functions = functions

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.functions.logits(args[-1], args[:-1])


# ---------------------------------------------------------------------------
# one writer per format: (functions, path) -> file, and a loader to check it

class OnnxSteps:
    format = "onnx"
    suffix = ".onnx"

    def write_step(self, functions: StepFunctions, path: Path) -> None:
        names = functions.step_input_names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(functions.traced_step(), functions.step_example(), str(path), dynamo=False,
                              input_names=names, output_names=list(STEP_OUTPUTS), opset_version=OPSET)
        self._check_graph(path, names)

    def write_forward(self, functions: StepFunctions, path: Path) -> None:
        names = functions.forward_input_names
        onnx_export(functions.forward_module(), functions.forward_example(2), path, names,
                    [functions.part.output], training=False, dynamic=[*functions.part.input_names,
                                                                      functions.part.output])
        self._check_graph(path, names)

    @staticmethod
    def _check_graph(path: Path, names: list[str]) -> None:
        import onnx

        cap_ir_version(path)
        graph = onnx.load(str(path)).graph
        got = [i.name for i in graph.input]
        if got != names:
            raise ExportError(f"{path.name}: the ONNX exporter gave inputs {got}, expected {names}")
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise ExportError(f"{path.name} uses operators outside the standard ai.onnx domain: {', '.join(foreign)}",
                              hint="ONNX Runtime Mobile and Web run standard operators only")

    def load(self, path: Path) -> Program:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda args: session.run(None, dict(zip(names, args)))


class StaticBatchSteps:
    """Writers whose programs take a static batch of ``max_batch`` rows (the
    forward too); subclasses convert a module with ``_write``."""

    def write_step(self, functions: StepFunctions, path: Path) -> None:
        self._write(functions.traced_step(), functions.step_example(), path)

    def write_forward(self, functions: StepFunctions, path: Path) -> None:
        self._write(functions.forward_module(), functions.forward_example(functions.part.max_batch), path)

    @staticmethod
    def _write(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
        raise NotImplementedError


class ExecuTorchSteps(StaticBatchSteps):
    format = "executorch"
    suffix = ".pte"

    @staticmethod
    def _write(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
        """Portable kernels. XNNPACK lowering tripled the export time (15 s
        for LE's step) and ran a step no faster (274 µs against 283, measured
        interleaved): at this size the kernels are not what costs."""
        with quiet_native_output():
            from executorch.exir import to_edge
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, example, strict=False)
            atomic.write_bytes(path, to_edge(program).to_executorch().buffer)

    def load(self, path: Path) -> Program:
        with quiet_native_output():
            from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
        buffer = path.read_bytes()
        with quiet_native_output():
            program = _load_for_executorch_from_buffer(buffer)

        def run(args: Sequence[np.ndarray]) -> list[np.ndarray]:
            _ = buffer  # the runtime reads the program from this buffer for as long as it runs
            outputs = program.run_method("forward", [torch.from_numpy(np.ascontiguousarray(a)) for a in args])
            return [o.numpy().copy() for o in outputs]

        return run


class TFLiteSteps(StaticBatchSteps):
    format = "tflite"
    suffix = ".tflite"

    @staticmethod
    def _write(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
        import litert_torch

        with warnings.catch_warnings(), quiet_native_output(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            edge = litert_torch.convert(module, example)
            with tempfile.TemporaryDirectory() as tmp:
                edge.export(str(Path(tmp) / "program.tflite"))
                data = (Path(tmp) / "program.tflite").read_bytes()
        atomic.write_bytes(path, data)

    def load(self, path: Path) -> Program:
        """Through the default signature. An interpreter without the Flex
        delegate refuses select-TF ops at allocation, so loading it here is
        also the builtin-ops-only check."""
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
        try:
            with quiet_native_output():
                interpreter = Interpreter(model_path=str(path), num_threads=1)
                interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"{path.name} does not load in LiteRT without the Flex delegate: {exc}",
                              hint="the program needs ops outside TFLite's builtins") from None
        runner = interpreter.get_signature_runner()
        outputs = interpreter.get_signature_list()["serving_default"]["outputs"]

        def run(args: Sequence[np.ndarray]) -> list[np.ndarray]:
            result = runner(**{f"args_{i}": np.ascontiguousarray(a) for i, a in enumerate(args)})
            return [np.asarray(result[name]).copy() for name in outputs]

        return run


class StepProgramExporter:
    """The ``steps`` training kind of one format: step and forward programs,
    each checked in its runtime against torch before it is kept."""

    kind = STEPS

    def __init__(self, writer):
        self.writer = writer
        self.format = writer.format

    def export(self, part: TrainablePart, out_dir: Path) -> dict[str, str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        functions = StepFunctions(part)
        files = {role: out_dir / f"{role}{self.writer.suffix}" for role in ("step", "forward")}
        try:
            self.writer.write_step(functions, files["step"])
            self.writer.write_forward(functions, files["forward"])
            check_step_program(self.writer.load(files["step"]), part, self.format)
            check_forward_program(self.writer.load(files["forward"]), part, self.format,
                                  batch=part.max_batch if self.format != "onnx" else 37)
        except ExportError:
            raise
        except Exception as exc:  # a converter's own failure, with its op named in the message
            raise ExportError(f"{part.key}: the {self.format} step programs could not be written: "
                              f"{type(exc).__name__}: {str(exc)[:600]}") from exc
        return {role: f"{out_dir.name}/{path.name}" for role, path in files.items()}


def check_step_program(run_step: Program, part: TrainablePart, fmt: str, steps: int = CHECK_STEPS) -> float:
    """``steps`` program steps against torch autograd plus torch.optim.AdamW on
    the same random batches (a quarter of each batch padding); returns the
    largest parameter difference and raises past ``STEP_TOLERANCE``."""
    reference = copy.deepcopy(part.module)
    opt = part.optimizer
    optimizer = torch.optim.AdamW(reference.parameters(), lr=part.learning_rate, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    params = part.flat_parameters().numpy()
    m, v = np.zeros_like(params), np.zeros_like(params)
    generator = torch.Generator().manual_seed(1)
    worst_loss = 0.0
    for t in range(1, steps + 1):
        inputs, labels = part.example(part.max_batch, seed=1000 + t)
        weights = (torch.rand(part.max_batch, generator=generator) > 0.25).float()
        weights[0] = 1.0
        per_row = F.cross_entropy(reference(*inputs), labels, reduction="none")
        loss = (per_row * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        got = run_step([*(x.numpy() for x in inputs), labels.numpy().astype(np.int32), weights.numpy(),
                        np.array([t], np.float32), np.array([part.learning_rate], np.float32), params, m, v])
        loss_got, params, m, v = (np.asarray(g, np.float32).reshape(s) for g, s in
                                  zip(got, ((), params.shape, m.shape, v.shape)))
        worst_loss = max(worst_loss, abs(float(loss_got) - loss.item()))
    named = dict(reference.named_parameters())
    want = torch.cat([named[n].detach().reshape(-1) for n in part.parameter_order]).numpy()
    error = float(np.abs(params - want).max())
    if not error <= STEP_TOLERANCE:
        raise ExportError(f"{part.key}: the {fmt} step program's parameters differ from torch.optim.AdamW by "
                          f"{error:.3g} after {steps} steps (tolerance {STEP_TOLERANCE:g}; largest loss "
                          f"difference {worst_loss:.3g})",
                          hint=f"a {fmt} kernel computes the step differently; export without {fmt} "
                               "(--formats) and report it")
    return error


def check_forward_program(run_forward: Program, part: TrainablePart, fmt: str, batch: int) -> float:
    inputs, _ = part.example(batch, seed=7)
    params = part.flat_parameters() + 0.1 * torch.randn(part.flat_parameters().shape,
                                                        generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = StepFunctions(part).logits(params, inputs).numpy()
    got = np.asarray(run_forward([*(x.numpy() for x in inputs), params.numpy()])[0])
    error = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not error <= 1e-4 * max(1.0, float(np.abs(want).max())):
        raise ExportError(f"{part.key}: the {fmt} forward program differs from torch by {error:.3g} "
                          f"(shape {got.shape}, expected {want.shape})")
    return error


STEP_EXPORTERS = {e.format: e for e in (StepProgramExporter(OnnxSteps()), StepProgramExporter(ExecuTorchSteps()),
                                        StepProgramExporter(TFLiteSteps()))}
