"""GE exporters: one ``GEExporter`` per bundle format (``toolkit.formats``), registered in ``EXPORTERS``.

Each format writes a GE (fp32, sparse, pruned or quantized) to a file that
returns the same outputs as ``WithFeatures`` (logits, then every feature tap),
and loads it back in its own runtime for accuracy and latency checks:

- ``onnx``: ONNX, run by onnxruntime. Quantized GEs become QDQ models
  (int8 per-channel weights, uint8 activations) made by
  ``onnxruntime.quantization``, with the weight scales pinned to the grid the
  compression stage chose (so FlexRound's learned rounding survives export).
- ``executorch``: a ``.pte`` lowered to XNNPACK; quantized GEs go through the
  PT2E flow with the XNNPACK quantizer.
- ``tflite``: LiteRT flatbuffer converted by litert-torch; fp32 only here.
- ``torch``: a ``torch.export`` program (``.pt2``), what the device's torch
  reference backend runs; fp32 only.

``load(path, threads, all_outputs=True)`` returns every output (logits, then
the feature taps in the model's order), which the bundle's parity checks and
the device backends need; otherwise just the logits.

4-bit weights are carried in int8 storage by both ONNX and ExecuTorch (neither
runtime has CPU kernels for 4-bit convolutions), so their files are int8-sized.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from edgetailor.toolkit import atomic
from edgetailor.toolkit.bundle import tflite_output_position
from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.formats import FORMATS
from edgetailor.toolkit.native_output import quiet_native_output
from edgetailor.export.onnx_export import cap_ir_version, onnx_export
from edgetailor.server_side.compress.quantization import QuantSpec
from edgetailor.server_side.models import WithFeatures

Runner = Callable[[np.ndarray], np.ndarray | list[np.ndarray]]
"""float32 (N, 1, H, W) normalised images -> logits (N, classes), or every output."""


class GEExporter(Protocol):
    name: str   # the format's name in the registry (toolkit.formats.FORMATS)

    def export(self, model: nn.Module, path: Path, calibration: np.ndarray, quant: QuantSpec | None) -> None: ...

    def load(self, path: Path, threads: int = 1, all_outputs: bool = False) -> Runner: ...


def _per_sample(run_one: Callable[[np.ndarray], list[np.ndarray]], all_outputs: bool) -> Runner:
    """Runtimes whose programs have a static batch of 1 run a batch one by one."""

    def run(x: np.ndarray):
        rows = [run_one(x[i:i + 1]) for i in range(len(x))]
        outputs = [np.concatenate(column) for column in zip(*rows)]
        return outputs if all_outputs else outputs[0]

    return run


class OnnxExporter:
    name = "onnx"

    def export(self, model: nn.Module, path: Path, calibration: np.ndarray, quant: QuantSpec | None) -> None:
        wrapped = WithFeatures(model).eval()
        outputs = ["logits", *(t.name for t in model.feature_taps)]
        example = (torch.as_tensor(calibration[:2]),)
        if quant is None:
            onnx_export(wrapped, example, path, ["image"], outputs, training=False)
            cap_ir_version(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
            onnx_export(wrapped, example, fp32, ["image"], outputs, training=False)
            _quantize_qdq(fp32, prepared, path, calibration, quant)
        cap_ir_version(path)

    def load(self, path: Path, threads: int = 1, all_outputs: bool = False) -> Runner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # exact int8 arithmetic on x86 without VNNI, as the device runs it (device/backends/ort.py)
        options.add_session_config_entry("session.x64quantprecision", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if all_outputs:
            return lambda x: session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return lambda x: session.run(["logits"], {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


def _quantize_qdq(fp32: Path, prepared: Path, out: Path, calibration: np.ndarray, quant: QuantSpec) -> None:
    """Static QDQ quantization with onnxruntime.quantization (per-channel
    symmetric weights, min-max calibrated uint8 activations). The exported
    weights are already on the stage's grid; pinning the scales keeps them
    there exactly (ORT would otherwise re-derive max|w|/127 per channel)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    overrides = {}
    for layer, scales in quant.weight_scales.items():
        scales = np.asarray(scales, dtype=np.float32)
        overrides[f"model.{layer}.weight"] = [{"axis": 0, "scale": float(scales[0]), "zero_point": 0},
                                              *({"scale": float(s), "zero_point": 0} for s in scales[1:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": overrides})


class ExecuTorchExporter:
    """Lowered to XNNPACK; a quantized GE goes through PT2E with the XNNPACK quantizer."""

    name = "executorch"

    def export(self, model: nn.Module, path: Path, calibration: np.ndarray, quant: QuantSpec | None) -> None:
        with quiet_native_output():  # torchao and XNNPACK announce missing GPU kernels and CPU probing
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

        wrapped = WithFeatures(copy.deepcopy(model)).eval()
        example = (torch.as_tensor(calibration[:1]),)
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapped, example)
            if quant is not None:
                from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                    XNNPACKQuantizer, get_symmetric_quantization_config)
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
                prepared = prepare_pt2e(program.module(), quantizer)
                for i in range(len(calibration)):  # the exported program has a static batch of 1
                    prepared(torch.as_tensor(calibration[i:i + 1]))
                program = torch.export.export(convert_pt2e(prepared), example)
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        atomic.write_bytes(path, lowered.buffer)

    def load(self, path: Path, threads: int = 1, all_outputs: bool = False) -> Runner:
        with quiet_native_output():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

        with quiet_native_output():
            portable_lib._unsafe_reset_threadpool(threads)
            method = Runtime.get().load_program(Path(path)).load_method("forward")
        return _per_sample(lambda x: [o.numpy() for o in method.execute([torch.as_tensor(x)])], all_outputs)


class TFLiteExporter:
    name = "tflite"

    def export(self, model: nn.Module, path: Path, calibration: np.ndarray, quant: QuantSpec | None) -> None:
        if quant is not None:
            raise ConfigError(FORMATS[self.name].cannot_carry(True))
        import litert_torch

        wrapped = WithFeatures(copy.deepcopy(model)).eval()
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            edge = litert_torch.convert(wrapped, (torch.as_tensor(calibration[:1]),))
            with tempfile.TemporaryDirectory() as tmp:
                edge.export(str(Path(tmp) / "model.tflite"))
                data = (Path(tmp) / "model.tflite").read_bytes()
        atomic.write_bytes(path, data)

    def load(self, path: Path, threads: int = 1, all_outputs: bool = False) -> Runner:
        interpreter_cls = _litert_interpreter()
        with quiet_native_output():
            interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]["index"]
        outputs = [o["index"] for o in sorted(interpreter.get_output_details(), key=tflite_output_position)]

        def run_one(x: np.ndarray) -> list[np.ndarray]:
            interpreter.set_tensor(source, np.ascontiguousarray(x, dtype=np.float32))
            interpreter.invoke()
            return [interpreter.get_tensor(i).copy() for i in outputs]

        return _per_sample(run_one, all_outputs)


class TorchExporter:
    name = "torch"

    def export(self, model: nn.Module, path: Path, calibration: np.ndarray, quant: QuantSpec | None) -> None:
        import io

        if quant is not None:
            raise ConfigError(FORMATS[self.name].cannot_carry(True))
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(WithFeatures(copy.deepcopy(model)).eval(),
                                          (torch.as_tensor(calibration[:2]),), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        atomic.write_bytes(path, buffer.getvalue())

    def load(self, path: Path, threads: int = 1, all_outputs: bool = False) -> Runner:
        torch.set_num_threads(threads)
        module = torch.export.load(str(path)).module()

        def run(x: np.ndarray):
            with torch.no_grad():
                outputs = [o.numpy() for o in module(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)))]
            return outputs if all_outputs else outputs[0]

        return run


def _litert_interpreter():
    """LiteRT's Interpreter: ai_edge_litert first, then its predecessor tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


EXPORTERS: dict[str, GEExporter] = {e.name: e for e in (OnnxExporter(), ExecuTorchExporter(), TFLiteExporter(),
                                                          TorchExporter())}


def get_exporter(name: str) -> GEExporter:
    """The exporter of a registered format (``toolkit.formats.FORMATS``)."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ConfigError(f"unknown export format {name!r}", hint=f"formats: {', '.join(EXPORTERS)}") from None
