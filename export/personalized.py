"""The personalized model as one inference program, for apps that only predict.

An app that runs GE, then LE and GN, then routes, needs the toolkit's logic
in its own language. Instead the bundle carries, per format, a template: GE +
LE + GN + routing as one program, image in; ``logits``, ``probabilities``,
``gate`` (P(LE answers)) and ``expert`` (1 where LE answered) out. LE's and
GN's weights and the gate threshold in it are placeholder values; export
records where their bytes lie (``toolkit.patching``), and the device writes
the trained values over them (``DeviceRuntime.export_personalized``), with
no converter on the device.

- ONNX: the bundle's own ``ge.onnx`` (fp32 or quantized) merged with the
  routing head, so the program's GE is the one the device runs.
- TFLite and ExecuTorch: converted from torch at batch 1 like their GE
  files; fp32 GEs only (a quantized GE's integers are decided by
  ``server compress`` and converting again would change them).

Each template is patched with random weights and checked against torch
(the head run on the format's own GE outputs) before it goes in a bundle.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import ExportError
from edgetailor.toolkit.native_output import quiet_native_output
from edgetailor.toolkit.patching import PatchTable, apply_patches, find_offsets
from edgetailor.export.formats import get_exporter
from edgetailor.export.onnx_export import OPSET, cap_ir_version
from edgetailor.export.parts import TrainablePart

OUTPUTS = ("logits", "probabilities", "gate", "expert")
PARTS = ("local_expert", "gating_network")
ATTEMPTS = 4


class RoutingHead(nn.Module):
    """GE's outputs -> the routed answer: what ``device.mixture.route`` computes."""

    def __init__(self, le: nn.Module, gn: nn.Module, threshold: float):
        super().__init__()
        self.le, self.gn = le, gn
        self.threshold = nn.Parameter(torch.tensor([threshold], dtype=torch.float32), requires_grad=False)

    def forward(self, logits: torch.Tensor, le_features: torch.Tensor, gn_features: torch.Tensor):
        le_logits = self.le(le_features, logits)
        gate_logits = self.gn(gn_features)
        gate = torch.sigmoid(gate_logits[:, 1] - gate_logits[:, 0])
        use_le = gate > self.threshold
        routed = torch.where(use_le.unsqueeze(1), le_logits, logits)
        return routed, torch.softmax(routed, dim=1), gate, use_le.to(torch.int32)


class PersonalizedModel(nn.Module):
    def __init__(self, ge: nn.Module, head: RoutingHead, le_index: int, gn_index: int):
        super().__init__()
        self.ge, self.head = ge, head
        self.le_index, self.gn_index = le_index, gn_index

    def forward(self, image: torch.Tensor):
        logits, *features = self.ge(image)
        return self.head(logits, features[self.le_index], features[self.gn_index])


def _marked_parts(parts: dict[str, TrainablePart], seed: int) -> tuple[dict[str, nn.Module], dict, np.ndarray]:
    """Copies of LE and GN whose every weight is a distinct placeholder value
    (and the threshold's): large, random, so that its four bytes occur
    nowhere else in the program."""
    rng = np.random.default_rng(seed)
    modules, markers, used = {}, {}, set()

    def fresh(count: int) -> np.ndarray:
        values = []
        while len(values) < count:
            v = np.float32(rng.uniform(1e4, 1e5) * rng.choice([-1.0, 1.0]))
            if v.tobytes() not in used:
                used.add(v.tobytes())
                values.append(v)
        return np.array(values, np.float32)

    for key, part in parts.items():
        module = copy.deepcopy(part.module)
        markers[key] = {}
        for name, parameter in module.named_parameters():
            values = fresh(parameter.numel())
            markers[key][name] = values
            with torch.no_grad():
                parameter.copy_(torch.from_numpy(values.reshape(parameter.shape)))
        modules[key] = module
    return modules, markers, fresh(1)


def _patch_table(data: bytes, markers: dict, threshold_marker: np.ndarray) -> PatchTable | None:
    values = {}
    for key, params in markers.items():
        values[key] = {}
        for name, marks in params.items():
            found = find_offsets(data, marks)
            if any(len(f) == 0 for f in found):
                return None  # a converter changed the constant (folded or transformed it)
            elements = [i for i, offsets in enumerate(found) for _ in offsets]
            values[key][name] = (elements, [o for offsets in found for o in offsets])
    threshold = find_offsets(data, threshold_marker)[0]
    return PatchTable(values, threshold, len(data)) if threshold else None


def _write_onnx(ge_file: Path, head: RoutingHead, le_tap: str, gn_tap: str, num_classes: int,
                dims: dict[str, int]) -> bytes:
    """The bundle's GE graph with the head's graph appended (onnx.compose)."""
    import onnx
    from onnx import compose

    inputs = ["ge_logits", "le_features", "gn_features"]
    example = (torch.zeros(2, num_classes), torch.zeros(2, dims[le_tap]), torch.zeros(2, dims[gn_tap]))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "head.onnx"
        torch.onnx.export(head, example, str(path), dynamo=False, input_names=inputs, output_names=list(OUTPUTS),
                          dynamic_axes={n: {0: "batch"} for n in [*inputs, *OUTPUTS]}, opset_version=OPSET)
        head_model = onnx.load(str(path))
    ge_model = onnx.load(str(ge_file))
    head_model.ir_version = ge_model.ir_version
    # GE's names get a prefix (its input keeps its name), the head's outputs keep theirs.
    ge_model = compose.add_prefix(ge_model, "ge/", rename_inputs=False)
    head_model = compose.add_prefix(head_model, "head/", rename_inputs=False, rename_outputs=False)
    logits = ge_model.graph.output[0].name
    io_map = [(logits, inputs[0]), (f"ge/{le_tap}", inputs[1]), (f"ge/{gn_tap}", inputs[2])]
    merged = compose.merge_models(ge_model, head_model, outputs=list(OUTPUTS), io_map=io_map)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def _write_converted(fmt: str, model: nn.Module, example: torch.Tensor) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet_native_output(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model"
        if fmt == "tflite":
            import litert_torch

            litert_torch.convert(model.eval(), (example,)).export(str(path))
        else:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

            program = torch.export.export(model.eval(), (example,))
            path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
                             .to_executorch().buffer)
        return path.read_bytes()


def export_personalized_template(fmt: str, ge_model: nn.Module, ge_file: Path, parts: dict[str, TrainablePart],
                                 le_tap: str, gn_tap: str, taps: list[str], dims: dict[str, int],
                                 examples: np.ndarray, out_dir: Path, quantized: bool) -> dict[str, str] | None:
    """Write ``out_dir/model{suffix}`` and its patch table; returns {role: path
    relative to the bundle}, or None when this format cannot carry one (a
    quantized GE outside ONNX)."""
    from edgetailor.server_side.models import WithFeatures

    if quantized and fmt != "onnx":
        return None
    num_classes = parts["local_expert"].num_classes
    for attempt in range(ATTEMPTS):
        modules, markers, threshold_marker = _marked_parts(parts, seed=attempt)
        head = RoutingHead(modules["local_expert"], modules["gating_network"], float(threshold_marker[0]))
        try:
            if fmt == "onnx":
                data = _write_onnx(ge_file, head, le_tap, gn_tap, num_classes, dims)
            else:
                model = PersonalizedModel(WithFeatures(copy.deepcopy(ge_model)).eval(), head, taps.index(le_tap),
                                          taps.index(gn_tap))
                data = _write_converted(fmt, model, torch.as_tensor(examples[:1]))
        except Exception as exc:
            raise ExportError(f"the {fmt} personalized-model template could not be written: "
                              f"{type(exc).__name__}: {str(exc)[:400]}") from exc
        table = _patch_table(data, markers, threshold_marker)
        if table is not None and _check(fmt, data, table, parts, ge_file, le_tap, gn_tap, taps, examples):
            out_dir.mkdir(parents=True, exist_ok=True)
            suffix = ge_file.suffix
            atomic.write_bytes(out_dir / f"model{suffix}", data)
            atomic.write_text(out_dir / f"model{suffix}.patches.json", table.to_json())
            if fmt == "onnx":
                cap_ir_version(out_dir / f"model{suffix}")
            return {"program": f"{out_dir.name}/model{suffix}", "patches": f"{out_dir.name}/model{suffix}.patches.json"}
    raise ExportError(f"the {fmt} personalized-model template cannot be patched: its converter transforms LE's or "
                      f"GN's weights (tried {ATTEMPTS} placeholder sets)",
                      hint=f"export without the {fmt} personalized model, or report the converter's change")


def _check(fmt: str, data: bytes, table: PatchTable, parts: dict[str, TrainablePart], ge_file: Path,
           le_tap: str, gn_tap: str, taps: list[str], examples: np.ndarray) -> bool:
    """Patch with random weights and a threshold that sends half the examples
    to LE; the program must answer as torch's head on the format's own GE
    outputs (same logits, gates and routes)."""
    rng = np.random.default_rng(11)
    weights, modules = {}, {}
    for key, part in parts.items():
        weights[key] = {name: (p.detach().numpy() + rng.normal(0, 0.05, p.shape)).astype(np.float32)
                        for name, p in part.module.named_parameters()}
        modules[key] = copy.deepcopy(part.module)
        modules[key].load_state_dict({k: torch.from_numpy(v) for k, v in weights[key].items()})
    ge_outputs = get_exporter(fmt).load(ge_file, threads=1, all_outputs=True)(examples)
    head = RoutingHead(modules["local_expert"], modules["gating_network"], 0.5)
    outputs = [torch.from_numpy(np.asarray(o)) for o in ge_outputs]
    head_inputs = (outputs[0], outputs[1 + taps.index(le_tap)], outputs[1 + taps.index(gn_tap)])
    with torch.no_grad():
        head.threshold.fill_(float(np.median(head(*head_inputs)[2].numpy())))
        want = [w.numpy() for w in head(*head_inputs)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{ge_file.suffix}"
        path.write_bytes(apply_patches(data, table, weights, float(head.threshold)))
        got = [np.asarray(g) for g in get_exporter(fmt).load(path, threads=1, all_outputs=True)(examples)]
    if len(got) != len(want) or any(g.size != w.size for g, w in zip(got, want)):
        return False
    logits_ok = np.abs(got[0] - want[0]).max() <= 1e-3 * max(1.0, np.abs(want[0]).max())
    gate_ok = np.abs(got[2].reshape(-1) - want[2].reshape(-1)).max() <= 1e-4
    # Routes must agree but for a gate within float error of the threshold.
    close = np.abs(want[2].reshape(-1) - float(head.threshold)) < 1e-5
    routed_ok = np.array_equal(got[3].reshape(-1)[~close], want[3].reshape(-1)[~close])
    return bool(logits_ok and gate_ok and routed_ok)
