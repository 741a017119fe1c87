import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgetailor.export.bundle import export_bundle
from edgetailor.export.onnx_export import MAX_IR_VERSION
from edgetailor.server_side.checkpoint import GECheckpoint
from edgetailor.toolkit.config import ExpertConfig
from edgetailor.toolkit.errors import ConfigError


def test_manifest_and_overhead(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    ge, le, gn = manifest["global_expert"], manifest["local_expert"], manifest["gating_network"]
    assert (le["params"] + gn["params"]) / ge["params"] <= 0.025
    assert (le["macs"] + gn["macs"]) / ge["macs"] <= 0.025
    assert set(manifest["formats"]) == {"onnx", "executorch", "tflite", "torch"}
    assert ge["files"] == {"onnx": "ge.onnx", "executorch": "ge.pte", "tflite": "ge.tflite", "torch": "ge.pt2"}
    assert set(le["training"]) == set(gn["training"]) == {"onnx", "executorch", "tflite", "torch"}
    assert le["training"]["onnx"] == {"step": "le/step.onnx", "forward": "le/forward.onnx"}
    assert set(le["training"]["executorch"]) == {"step", "forward", "program"}  # + executorch-training's
    onnx_files = manifest["formats"]["onnx"]["files"]
    assert set(onnx_files) == {"ge.onnx", "replay/outputs.onnx.npz", *le["training"]["onnx"].values(),
                               *gn["training"]["onnx"].values(), "personalized/model.onnx",
                               "personalized/model.onnx.patches.json"}
    assert set(manifest["formats"]["tflite"]["files"]) == {
        "ge.tflite", "replay/outputs.tflite.npz", *le["training"]["tflite"].values(),
        *gn["training"]["tflite"].values(), *manifest["personalized_model"]["tflite"].values()}
    # GE's outputs on the replay, by format: what each format's GE computes (tests/device/test_mixture.py)
    assert manifest["replay"]["outputs"] == {name: f"replay/outputs{suffix}.npz" for name, suffix in
                                             (("onnx", ".onnx"), ("executorch", ".pte"), ("tflite", ".tflite"),
                                              ("torch", ".pt2"))}
    assert set(manifest["personalized_model"]) == {"onnx", "executorch", "tflite"}
    # Step programs: a static batch, AdamW's settings, and the initial weights every format starts from.
    assert le["max_batch"] == 128 + round(128 * 0.3) and gn["max_batch"] == 128
    assert le["optimizer"] == {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0}
    assert np.load(bundle_dir / le["initial_parameters"]).shape == (4 * 16 + 4 + 10 * 100 + 10,)
    assert all(manifest["files"][f] == h for entry in manifest["formats"].values() for f, h in entry["files"].items())
    assert le["kind"] == "residual_channel_mix" and (le["channels"], le["width"]) == (16, 4)
    assert le["parameters"] == {"mix.weight": [4, 16], "mix.bias": [4], "up.weight": [10, 100], "up.bias": [10]}
    assert manifest["input"]["std"] > 0 and manifest["labels"] == [str(d) for d in range(10)]


def test_every_onnx_file_is_readable_by_onnxruntime_1_19(bundle_dir):
    for path in bundle_dir.rglob("*.onnx"):
        assert onnx.load(str(path)).ir_version <= MAX_IR_VERSION, path


def test_ge_onnx_matches_torch(ge_dir, bundle_dir, user):
    ckpt = GECheckpoint.load(ge_dir)
    x = ckpt.normalize(user.test.images[:16])
    session = ort.InferenceSession(str(bundle_dir / "ge.onnx"), providers=["CPUExecutionProvider"])
    logits, conv, fc1, fc2 = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want, feats = ckpt.model.forward_with_features(x)
    assert np.abs(logits - want.numpy()).max() < 1e-4
    assert np.abs(fc1 - feats["fc1"].numpy()).max() < 1e-4


def test_bad_expert_config_leaves_nothing_behind(ge_dir, tmp_path):
    with pytest.raises(ConfigError, match="no feature 'nope'"):
        export_bundle(ge_dir, tmp_path / "b", experts=ExpertConfig(le_feature_tap="nope"))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(ge_dir, bundle_dir):
    with pytest.raises(FileExistsError):
        export_bundle(ge_dir, bundle_dir)


def test_formats_are_checked_before_any_work(ge_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown bundle format.*'coreml'"):
        export_bundle(ge_dir, tmp_path / "b", formats=["onnx", "coreml"])
    with pytest.raises(ConfigError, match="unknown training kind.*'tensorflow-training'"):
        export_bundle(ge_dir, tmp_path / "b", extra_training=["tensorflow-training"])
    with pytest.raises(ConfigError, match="executorch-training needs format.*executorch"):
        export_bundle(ge_dir, tmp_path / "b", formats=["onnx"], extra_training=["executorch-training"])
    assert list(tmp_path.iterdir()) == []


def test_onnx_only_bundle(ge_dir, tmp_path):
    out = export_bundle(ge_dir, tmp_path / "b", formats=["onnx"], make_zip=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["formats"]) == ["onnx"] and not list(out.glob("*.pte"))


def test_release_defaults_to_the_folder_name_and_the_time(bundle_dir):
    """Devices track versions per release name: export's defaults must be stable and growing."""
    from datetime import datetime, timezone

    release = json.loads((bundle_dir / "manifest.json").read_text())["release"]
    assert release["name"] == bundle_dir.name
    assert 20260101000000 < release["version"] <= int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))
