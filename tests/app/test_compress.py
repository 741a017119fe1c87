"""Server-side compression on the real GE: each stage does what it claims on
the exported model, the compressed GE ships in a bundle the device
personalizes on, and bad recipes fail before any work with nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.conftest import run_cli
from edgetailor.toolkit.errors import CheckpointError, ConfigError


def recipe(*stages: dict, formats=("onnx",)):
    from edgetailor.server_side.compress.recipe import recipe_from_dict

    return recipe_from_dict({"stage": list(stages), "export": {"formats": list(formats)}}, name="test")


@pytest.fixture(scope="module")
def int8_dir(ge_dir, tmp_path_factory):
    from edgetailor.app.compress import compress

    out = tmp_path_factory.mktemp("int8") / "ge-int8"
    compress(ge_dir, recipe({"kind": "quantize", "weight_bits": 8, "calibration_samples": 64}), out, n_users=0)
    return out


@pytest.fixture(scope="module")
def pruned_dir(ge_dir, tmp_path_factory):
    from edgetailor.app.compress import compress

    out = tmp_path_factory.mktemp("pruned") / "ge-pruned"
    stage = {"kind": "prune_structured", "ratio": 0.5, "recovery": {"epochs": 8, "distill": True}}
    compress(ge_dir, recipe(stage, formats=("onnx", "tflite")), out, n_users=1)
    return out


def test_structured_pruning_shrinks_the_exported_model(ge_dir, pruned_dir):
    from edgetailor.server_side.checkpoint import GECheckpoint

    report = json.loads((pruned_dir / "report.json").read_text())
    rows = {(r["variant"], r["format"]): r for r in report["rows"]}
    dense, pruned = rows["fp32 GE", "onnx"], rows["compressed", "onnx"]
    assert pruned["flops_ratio"] <= 0.5 and pruned["size_x"] >= 3.0   # real savings, not zeros in dense tensors
    assert pruned["generic_accuracy"] >= dense["generic_accuracy"] - 0.03
    assert rows["compressed", "tflite"]["generic_accuracy"] == pytest.approx(pruned["generic_accuracy"], abs=0.01)
    ckpt = GECheckpoint.load(pruned_dir)  # a GE checkpoint again, rebuilt from its recorded widths
    assert ckpt.model.widths() == [3, 8, 60, 42]
    assert ckpt.meta.compression["stages"][0]["channels"]["conv2"] == {"before": 16, "after": 8}
    assert "personalized_user_accuracy" in pruned and "personalized_user_accuracy" in dense
    assert (pruned_dir / "report.png").stat().st_size > 10_000


def test_pruned_bundle_personalizes_on_the_device(pruned_dir, tmp_path, user):
    from edgetailor.device.runtime import DeviceRuntime
    from edgetailor.export.bundle import export_bundle

    bundle = export_bundle(pruned_dir, tmp_path / "bundle", make_zip=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["local_expert"]["feature_dim"] == 8 * 25
    assert manifest["global_expert"]["compression"]["stages"] == ["prune_structured"]
    with DeviceRuntime.open(bundle, tmp_path / "state") as runtime:
        runtime.add_dataset(user.train)
        runtime.personalize()
        result = runtime.evaluate_dataset(user.test)
    assert result["accuracy"] > result["ge_only_accuracy"]


def test_int8_is_a_qdq_model_with_the_stage_grid(int8_dir):
    from edgetailor.server_side.checkpoint import GECheckpoint

    model = onnx.load(str(int8_dir / "ge.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q, scale = inits["model.fc1.weight_quantized"], inits["model.fc1.weight_scale"]
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    ckpt = GECheckpoint.load(int8_dir)  # the checkpoint holds exactly the integers the ONNX model stores
    np.testing.assert_allclose(q * scale[:, None], ckpt.model.fc1.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
    report = json.loads((int8_dir / "report.json").read_text())
    row = next(r for r in report["rows"] if r["variant"] == "compressed")
    assert row["size_x"] > 3.2 and row["accuracy_drop_pt"] <= 1.0
    assert "tflite" in report["not_exported"]


def test_quantized_bundle_ships_the_qdq_model(int8_dir, tmp_path, user):
    from edgetailor.device.runtime import DeviceRuntime
    from edgetailor.export.bundle import export_bundle

    bundle = export_bundle(int8_dir, tmp_path / "bundle", make_zip=False)
    assert (bundle / "ge.onnx").read_bytes() == (int8_dir / "ge.onnx").read_bytes()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["global_expert"]["compression"]["quantization"]["weight_bits"] == 8
    with DeviceRuntime.open(bundle, tmp_path / "state") as runtime:
        runtime.add_dataset(user.train)
        runtime.personalize()
        assert runtime.evaluate_dataset(user.test)["accuracy"] > 0.8


def test_quantized_checkpoint_with_a_foreign_onnx_is_refused(int8_dir, ge_dir, tmp_path):
    import shutil

    from edgetailor.export.bundle import export_bundle
    from edgetailor.export.formats import get_exporter
    from edgetailor.server_side.checkpoint import GECheckpoint

    tampered = tmp_path / "tampered"
    shutil.copytree(int8_dir, tampered)
    other = GECheckpoint.load(ge_dir).model
    torch.manual_seed(3)
    for p in other.parameters():
        p.data = torch.randn_like(p)
    get_exporter("onnx").export(other, tampered / "ge.onnx", np.zeros((2, 1, 28, 28), np.float32), None)
    with pytest.raises(CheckpointError, match="agrees with the checkpoint"):
        export_bundle(tampered, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_magnitude_and_two_of_four_sparsity_survive_recovery(ge_dir):
    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.server_side.compress.pipeline import load_generic
    from edgetailor.server_side.compress.recipe import PruneMagnitude, PruneNM, Recovery
    from edgetailor.server_side.compress.stages import CompressionState, run_stage
    from edgetailor.server_side.compress.training import weight_layers

    ckpt = GECheckpoint.load(ge_dir)
    data, _ = load_generic(ckpt, None)
    state = CompressionState(ckpt.model, ckpt.model, data, "lenet5", 0)
    state.model = type(ckpt.model)(widths=ckpt.model.widths())
    state.model.load_state_dict(ckpt.model.state_dict())
    record = run_stage(PruneNM(2, 4, Recovery(epochs=2)), state, lambda *a: None)
    assert record["dense_layers"] == ["conv1", "conv2"]  # 25 and 150 inputs per filter: not multiples of 4
    for name, layer in weight_layers(state.model):
        if name.startswith("fc"):
            groups = (layer.weight.detach().reshape(layer.weight.shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2
    record = run_stage(PruneMagnitude(0.8, "global", Recovery(epochs=2)), state, lambda *a: None)
    assert record["weight_sparsity"] >= 0.8 - 1e-3
    assert record["generic_accuracy_torch"] > 0.85


def test_lottery_ticket_reaches_its_sparsity_in_rounds(ge_dir):
    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.server_side.compress.pipeline import load_generic
    from edgetailor.server_side.compress.recipe import LotteryTicket
    from edgetailor.server_side.compress.stages import CompressionState, run_stage

    ckpt = GECheckpoint.load(ge_dir)
    data, _ = load_generic(ckpt, None)
    state = CompressionState(ckpt.model, ckpt.model, data, "lenet5", 0)
    record = run_stage(LotteryTicket(sparsity=0.9, rounds=2, rewind_epochs=1, epochs=6), state, lambda *a: None)
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    assert record["rounds"][0]["sparsity"] == pytest.approx(1 - 0.1 ** 0.5, abs=0.01)
    assert record["weight_sparsity"] >= 0.9 - 1e-3
    assert record["generic_accuracy_torch"] > 0.8


def test_flexround_reconstructs_better_than_rounding_to_nearest(ge_dir):
    import copy

    import torch.nn.functional as F

    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.server_side.compress.pipeline import load_generic
    from edgetailor.server_side.compress.quantization import flexround, quantize_nearest

    ckpt = GECheckpoint.load(ge_dir)
    data, _ = load_generic(ckpt, None)
    nearest, learned = copy.deepcopy(ckpt.model), copy.deepcopy(ckpt.model)
    quantize_nearest(nearest, 4)
    scales = flexround(learned, torch.as_tensor(data.calibration(128)), 4, iterations=150, learning_rate=2e-3)
    test_x = data.normalize(data.test.to_images().images)
    with torch.no_grad():
        reference = ckpt.model(test_x)
        error = {name: float(F.mse_loss(m(test_x), reference)) for name, m in
                 (("nearest", nearest), ("flexround", learned))}
    assert error["flexround"] < error["nearest"]
    levels = learned.fc1.weight.detach().numpy() / scales["fc1"][:, None]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # still on the 4-bit grid ...
    assert np.abs(np.round(levels)).max() <= 7                         # ... within its range


def test_qat_keeps_weights_on_the_grid_and_exports_to_executorch(ge_dir, tmp_path):
    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.app.compress import compress

    out = tmp_path / "qat"
    qat = {"kind": "qat", "weight_bits": 8, "calibration_samples": 32, "recovery": {"epochs": 2}}
    report = compress(ge_dir, recipe(qat, formats=("onnx", "executorch")), out, n_users=0)
    rows = {(r["variant"], r["format"]): r for r in report["rows"]}
    assert rows["compressed", "executorch"]["generic_accuracy"] > 0.9
    assert rows["compressed", "executorch"]["file_bytes"] * 3 < rows["fp32 GE", "executorch"]["file_bytes"]
    weight = GECheckpoint.load(out).model.fc2.weight.detach()
    levels = weight / (weight.abs().amax(1, keepdim=True) / 127)
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("bad, message", [
    ({"stage": [{"kind": "prune_everything"}]}, "unknown kind 'prune_everything'"),
    ({"stage": [{"kind": "quantize", "bitz": 4}]}, "unknown key"),
    ({"stage": [{"kind": "quantize", "weight_bits": 3}]}, "weight_bits must be 4 or 8"),
    ({"stage": [{"kind": "quantize"}, {"kind": "distill"}]}, "must be the last stage"),
    ({"stage": [{"kind": "quantize"}], "export": {"formats": ["onnx", "tflite"]}}, "cannot carry"),
    ({"stage": [{"kind": "prune_structured", "ratio": 0.9}]}, "leaves layer conv1"),
    ({"stage": [{"kind": "prune_magnitude", "sparsity": 1.0}]}, "sparsity must be in"),
    ({"stage": []}, "no \\[\\[stage\\]\\]"),
])
def test_bad_recipes_fail_before_any_work(ge_dir, tmp_path, bad, message):
    from edgetailor.app.compress import compress
    from edgetailor.server_side.compress.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=message):
        compress(ge_dir, recipe_from_dict(bad), tmp_path / "out", n_users=0)
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_output(ge_dir, tmp_path, monkeypatch):
    from edgetailor.app.compress import compress
    from edgetailor.export.formats import OnnxExporter

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OnnxExporter, "export", full_disk)
    with pytest.raises(OSError, match="No space left"):
        compress(ge_dir, recipe({"kind": "distill", "recovery": {"epochs": 1}}), tmp_path / "out", n_users=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_compress_help_lists_recipes_and_refuses_a_non_checkpoint(tmp_path):
    help_text = run_cli("server", "compress", "--help").stdout
    for name in ("int8", "prune50-int8", "ticket90", "w4-flexround"):
        assert name in help_text
    (tmp_path / "notage").mkdir()
    proc = run_cli("server", "compress", "--model", str(tmp_path / "notage"), "--recipe", "int8",
                   "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "not a GE checkpoint" in proc.stderr
    proc = run_cli("server", "compress", "--model", str(tmp_path / "notage"), "--recipe", "int9",
                   "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "no compression recipe 'int9'" in proc.stderr and "prune50-int8" in proc.stderr
    assert not (tmp_path / "out").exists()
