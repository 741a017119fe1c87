import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.bundle import MAX_IR_VERSION, export_bundle
from server_side.checkpoint import GECheckpoint
from toolkit.config import ExpertConfig
from toolkit.errors import ConfigError


def test_manifest_and_overhead(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    ge, le, gn = manifest["global_expert"], manifest["local_expert"], manifest["gating_network"]
    assert (le["params"] + gn["params"]) / ge["params"] <= 0.025
    assert (le["macs"] + gn["macs"]) / ge["macs"] <= 0.025
    assert set(manifest["files"]) >= {"ge.onnx", "replay.npz", *le["artifacts"].values(), *gn["artifacts"].values()}
    assert manifest["input"]["std"] > 0 and manifest["labels"] == [str(d) for d in range(10)]


def test_every_onnx_file_is_readable_by_ort_training(bundle_dir):
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
