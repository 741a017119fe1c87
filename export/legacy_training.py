"""LE and GN for the runtimes' own training packages, and for the torch
reference: kept for parity checks and for devices that still run them.

- ``onnx`` / ``ort-training``: onnxruntime-training's on-device training
  artifacts (training, eval and optimizer models and a checkpoint; AdamW in
  the optimizer graph). onnxruntime-training is deprecated since ONNX Runtime
  1.20 and has wheels only for CPython <= 3.11 on Linux x86_64; exporting
  these needs it installed, in a venv without ``onnxruntime``.
- ``executorch`` / ``executorch-training``: one joint forward-backward program
  for ``executorch.extension.training`` with a dynamic batch. ExecuTorch
  1.5.1 has two defects that make training return wrong gradients or NaN,
  both handled here or in the device backend; see
  ``docs/upstream/executorch-training.md``.
- ``torch`` / ``autograd``: a ``torch.export`` program; the reference backend
  trains it with autograd.

Every runtime an app embeds trains with step programs instead
(``export.step_programs``). Every program here is run against its torch
source before a bundle is published.
"""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import ExportError
from edgetailor.toolkit.native_output import quiet_native_output
from edgetailor.export.onnx_export import cap_ir_version, onnx_export
from edgetailor.export.parts import TrainablePart

CHECK_TOLERANCE = 1e-4


class _WithLoss(nn.Module):
    """The part plus its loss: (loss, logits), the form training runtimes take."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, *inputs_and_target: torch.Tensor):
        *inputs, target = inputs_and_target
        logits = self.part(*inputs)
        return F.cross_entropy(logits, target), logits.detach()


class OrtTrainingExporter:
    format, kind = "onnx", "ort-training"

    def export(self, part: TrainablePart, out_dir: Path) -> dict[str, str]:
        import onnx
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        try:
            from onnxruntime.training import artifacts
        except ImportError:
            raise ExportError("writing ort-training artifacts needs onnxruntime-training, which is not installed",
                              hint="in a venv without onnxruntime: pip install 'onnxruntime-training>=1.19,<1.20'; "
                                   "or leave ort-training out of --extra-training") from None

        out_dir.mkdir(parents=True, exist_ok=True)
        inputs, _ = part.example(2)
        with tempfile.TemporaryDirectory() as tmp:
            forward = Path(tmp) / "forward.onnx"
            onnx_export(part.module, tuple(inputs), forward, part.input_names, [part.output], training=True)
            graph = onnx.load(str(forward))
            trainable = [init.name for init in graph.graph.initializer]
            if sorted(trainable) != sorted(part.parameters()):
                raise ExportError(f"{part.key}: the ONNX export renamed parameters ({trainable} vs "
                                  f"{list(part.parameters())}); trained weights would not map back")
            # generate_artifacts' C++ graph passes log every transformer to fd 2,
            # ignoring the logger severity: shown only if the export fails
            with quiet_native_output(replay_on_error=True):
                artifacts.generate_artifacts(
                    graph, requires_grad=trainable, frozen_params=[], loss=artifacts.LossType.CrossEntropyLoss,
                    optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out_dir))
        files = {"training_model": "training_model.onnx", "eval_model": "eval_model.onnx",
                 "optimizer_model": "optimizer_model.onnx", "checkpoint": "checkpoint"}
        for name in ("training_model", "eval_model", "optimizer_model"):
            cap_ir_version(out_dir / files[name])
        return {k: f"{out_dir.name}/{v}" for k, v in files.items()}


def max_pool2d_backward_by_scatter(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """max_pool2d's gradient as scatter_add into zeros.

    ExecuTorch 1.5.1's portable ``max_pool2d_with_indices_backward`` adds into
    its output without zeroing it first, so whatever the memory planner left
    in that buffer leaks into the conv gradients (wrong from the first step,
    NaN within ten). ``indices`` are flat positions within each (H, W) plane,
    which is exactly what scatter_add along the flattened plane needs."""
    n, c = input.shape[0], input.shape[1]
    flat = torch.zeros_like(input).reshape(n, c, -1)
    flat = flat.scatter_add(2, indices.reshape(n, c, -1), grad_output.reshape(n, c, -1))
    return flat.reshape(input.shape)


def export_forward_backward(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``torch.export.experimental._export_forward_backward`` with the
    max-pool gradient replaced (see above). The joint graph is traced with a
    decomposition table, so the replacement has to go into that table: a
    later pass would see the op already in the graph."""
    from torch._decomp import core_aten_decompositions
    from torch.export.experimental import (_copy_graph_module_and_signature, _decompose_exported_program,
                                           _remove_detach_pass)

    table = core_aten_decompositions()
    table[torch.ops.aten.max_pool2d_with_indices_backward.default] = max_pool2d_backward_by_scatter
    program = _decompose_exported_program(program, cia_to_decomp={}, python_decomp_table=table,
                                          joint_loss_index=0, decompose_custom_triton_ops=False)
    module, signature = _copy_graph_module_and_signature(program)
    _remove_detach_pass(module, signature)
    return program._update(module, signature)


def executorch_training_program(module: nn.Module, inputs: list[torch.Tensor], target: torch.Tensor,
                                max_batch: int) -> bytes:
    """A joint forward-backward ExecuTorch program of ``module`` + cross-entropy.

    Returns (loss, logits, gradients..., parameters...) in one call; the
    batch is dynamic up to ``max_batch``. Not lowered to XNNPACK: its
    partitioner takes no backward ops, so training runs on the portable
    kernels (fine for LE and GN, a few thousand multiply-adds)."""
    with quiet_native_output():
        from executorch.exir import to_edge

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    args = (*inputs, target)
    with warnings.catch_warnings(), quiet_native_output():
        warnings.simplefilter("ignore")
        program = torch.export.export(_WithLoss(copy.deepcopy(module)), args,
                                      dynamic_shapes=(tuple({0: batch} for _ in args),), strict=True)
        program = export_forward_backward(program)
        return to_edge(program).to_executorch().buffer


class ExecuTorchTrainingExporter:
    format, kind = "executorch", "executorch-training"

    def export(self, part: TrainablePart, out_dir: Path) -> dict[str, str]:
        inputs, target = part.example(3)
        buffer = executorch_training_program(part.module, inputs, target, part.max_batch)
        check_executorch_program(buffer, part)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(out_dir / "training.pte", buffer)
        return {"program": f"{out_dir.name}/training.pte"}


def check_executorch_program(buffer: bytes, part: TrainablePart) -> None:
    """Loss, logits and every gradient of the program against torch autograd,
    on a batch of another size than the one it was traced with."""
    with quiet_native_output():
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
        program = _load_for_executorch_from_buffer(buffer)  # `buffer` stays referenced: the runtime does not copy it
    gradients_at = program.run_method("__et_training_gradients_index_forward", ())[0]
    parameters_at = program.run_method("__et_training_parameters_index_forward", ())[0]
    names = program.run_method("__et_training_fqn_forward", ())
    inputs, target = part.example(min(37, part.max_batch), seed=1)
    outputs = program.run_method("forward", (*inputs, target))
    reference = copy.deepcopy(part.module)
    logits = reference(*inputs)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    want = {"loss": loss.detach(), "logits": logits.detach(),
            **{f"part.{n}": p.grad for n, p in reference.named_parameters()}}
    got = {"loss": outputs[0], "logits": outputs[1], **dict(zip(names, outputs[gradients_at:parameters_at]))}
    for name, value in want.items():
        if name not in got:
            raise ExportError(f"{part.key}: the ExecuTorch program returns no gradient for {name}")
        error = float((got[name] - value).abs().max())
        if not error <= CHECK_TOLERANCE * max(1.0, float(value.abs().max())):
            raise ExportError(f"{part.key}: the ExecuTorch training program's {name} differs from torch by "
                              f"{error:.3g}",
                              hint="a runtime kernel is wrong; see docs/upstream/executorch-training.md")


class TorchTrainingExporter:
    format, kind = "torch", "autograd"

    def export(self, part: TrainablePart, out_dir: Path) -> dict[str, str]:
        inputs, _ = part.example(3)
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(copy.deepcopy(part.module), tuple(inputs),
                                          dynamic_shapes=tuple({0: batch} for _ in inputs))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
        check, _ = part.example(5, seed=1)
        with torch.no_grad():
            error = float((loaded(*check) - part.module(*check)).abs().max())
        if not error <= CHECK_TOLERANCE:
            raise ExportError(f"{part.key}: the torch.export program differs from its source by {error:.3g}")
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(out_dir / f"{out_dir.name}.pt2", buffer.getvalue())
        return {"program": f"{out_dir.name}/{out_dir.name}.pt2"}


LEGACY_EXPORTERS = (OrtTrainingExporter(), ExecuTorchTrainingExporter(), TorchTrainingExporter())
