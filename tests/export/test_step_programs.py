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


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_mix_le_exports_and_answers_any_batch(tmp_path, fmt):
    """The channel-mix LE on a ViT-sized spatial feature (8 maps of 49):
    its step follows AdamW in every format, and the ONNX forward takes any batch."""
    from edgetailor.server_side.experts import local_expert

    torch.manual_seed(0)
    module = local_expert("residual_channel_mix", 8 * 49, 10, channels=8, width=3)
    with torch.no_grad():  # a trained LE's U is not zero: make the mix matter
        module.up.weight.normal_(0, 0.1)
    part = TrainablePart("local_expert", "le", module, [8 * 49, 10], ["features", "base_logits"], "logits", 10,
                         24, 1e-2)
    files = STEP_EXPORTERS[fmt].export(part, tmp_path / "le")
    assert set(files) == {"step", "forward"}


def test_channel_mix_le_is_a_shared_per_position_mix():
    """Its math, against the same thing written as a 1x1 convolution."""
    import torch.nn.functional as F

    from edgetailor.server_side.experts import ChannelMixHead

    torch.manual_seed(0)
    head = ChannelMixHead(16 * 25, 10, channels=16, width=4)
    with torch.no_grad():
        head.up.weight.normal_()
    features, base = torch.randn(5, 400), torch.randn(5, 10)
    maps = F.softplus(F.conv2d(features.view(5, 16, 5, 5), head.mix.weight[:, :, None, None], head.mix.bias))
    want = base + head.up(maps.permute(0, 2, 3, 1).reshape(5, -1))  # position-major, then the mixed channels
    assert torch.allclose(head(features, base), want, atol=1e-5)
    assert torch.equal(ChannelMixHead(400, 10, 16, 4)(features, base), base)  # U = 0: answers like GE
    with pytest.raises(ValueError, match="not 7 channels"):
        ChannelMixHead(400, 10, 7, 4)
