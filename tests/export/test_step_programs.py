"""Step programs: LE's and GN's training step as plain inference programs in
every format, checked in the format's own runtime against torch autograd plus
torch.optim.AdamW, with standard operators only."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from edgetailor.export.bundle import bundle_parts
from edgetailor.export.parts import TrainablePart
from edgetailor.export.step_programs import STEP_EXPORTERS, STEP_TOLERANCE, check_step_program
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import ExportError

FORMATS = ["onnx", "executorch", "tflite"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["local_expert", "gating_network"])
def test_bundle_step_program_matches_torch_adamw_over_100_steps(bundle_dir, fmt, key):
    with Bundle.open(bundle_dir) as bundle:
        part = bundle_parts(bundle)[key]
        files = bundle.manifest.part(key).training_files(fmt, "steps")
        error = check_step_program(STEP_EXPORTERS[fmt].writer.load(bundle.path(files["step"])), part, fmt)
    assert error <= STEP_TOLERANCE


def test_onnx_programs_use_standard_operators_only(bundle_dir):
    for path in [*bundle_dir.glob("l*/*.onnx"), *bundle_dir.glob("g*/*.onnx"), bundle_dir / "personalized/model.onnx"]:
        model = onnx.load(str(path))
        assert {(o.domain or "ai.onnx") for o in model.opset_import} <= {"ai.onnx"}, path
        assert all(o.version <= 17 for o in model.opset_import), path
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, path


def test_tflite_programs_use_builtin_operators_only(bundle_dir):
    from ai_edge_litert.interpreter import Interpreter

    for path in [*bundle_dir.glob("*/step.tflite"), *bundle_dir.glob("*/forward.tflite")]:
        interpreter = Interpreter(model_path=str(path))
        ops = {op["op_name"] for op in interpreter._get_ops_details()}
        assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), (path, ops)


class NoisyGate(nn.Module):
    """Dropout in training mode: its traced step draws other random numbers than torch does."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.score = nn.Linear(8, 2)

    def forward(self, features):
        return self.score(self.drop(features))


def test_a_step_program_that_fails_its_check_is_refused(tmp_path):
    part = TrainablePart("gating_network", "gn", NoisyGate(), [8], ["features"], "gate_logits", 2, 16, 1e-2)
    with pytest.raises(ExportError, match="gating_network: the onnx step program.*differ") as info:
        STEP_EXPORTERS["onnx"].export(part, tmp_path / "gn")
    assert "--formats" in str(info.value)


def test_a_batch_dependent_forward_is_refused(tmp_path):
    """A forward whose trace bakes in the batch size cannot answer another batch."""

    class BatchBaked(nn.Module):
        def __init__(self):
            super().__init__()
            self.score = nn.Linear(8, 2)

        def forward(self, features):
            return self.score(features).reshape(features.shape[0], 2) + torch.zeros(features.shape[0], 1)

    part = TrainablePart("gating_network", "gn", BatchBaked(), [8], ["features"], "gate_logits", 2, 16, 1e-2)
    with pytest.raises(ExportError, match="gating_network"):
        STEP_EXPORTERS["onnx"].export(part, tmp_path / "gn")
