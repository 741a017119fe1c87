import json
import shutil

import pytest

from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BundleError
from tests.conftest import ROOT

OLD_BUNDLE = ROOT / "tests/fixtures/bundle-0.1-ort-training.zip"


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    return copy


def test_open_dir_and_zip(bundle_dir):
    with Bundle.open(bundle_dir) as b:
        assert b.labels == [str(d) for d in range(10)]
        bundle_id = b.bundle_id
    with Bundle.open(bundle_dir.with_name(bundle_dir.name + ".zip")) as z:
        assert z.bundle_id == bundle_id
        root = z.root
        assert (root / "ge.onnx").exists()
    assert not root.exists()  # the zip's extraction is cleaned up


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_format_file_disables_only_that_format(bundle_copy):
    _flip_a_byte(bundle_copy / "le" / "step.onnx")
    with Bundle.open(bundle_copy) as b:
        assert set(b.damaged) == {"onnx"} and "le/step.onnx does not match its sha256" in b.damaged["onnx"]
        assert b.usable_formats == ["executorch", "tflite", "torch"]
        with pytest.raises(BundleError, match="le/step.onnx does not match its sha256") as info:
            b.require_format("onnx")
        assert "usable formats: executorch, tflite, torch" in str(info.value)
        b.require_format("executorch")


@pytest.mark.parametrize("shared", ["replay.npz", "le/initial.npy"])
def test_tampered_shared_file_refuses_the_bundle(bundle_copy, shared):
    _flip_a_byte(bundle_copy / shared)
    with pytest.raises(BundleError, match=f"{shared} does not match its sha256"):
        Bundle.open(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "ge.onnx").unlink()
    with Bundle.open(bundle_copy) as b:
        assert "ge.onnx is missing" in b.damaged["onnx"]
    for ge in ("ge.pte", "ge.tflite", "ge.pt2"):
        (bundle_copy / ge).unlink()
    with pytest.raises(BundleError, match="ge.onnx is missing"):
        Bundle.open(bundle_copy)


def test_version_1_manifest_is_read(tmp_path):
    """A bundle written by the first edgetailor 0.1 (ONNX only, schema 1) still opens."""
    with Bundle.open(OLD_BUNDLE) as old:
        bundle_copy = shutil.copytree(old.root, tmp_path / "v1")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    v1 = {k: v for k, v in manifest.items() if k != "formats"}
    v1["schema_version"] = 1
    v1["global_expert"] = {k: v for k, v in manifest["global_expert"].items() if k not in ("files", "output_order")}
    v1["global_expert"]["file"] = "ge.onnx"
    for part in ("local_expert", "gating_network"):
        v1[part] = {k: v for k, v in manifest[part].items() if k not in ("training", "parameters", "max_batch")}
        v1[part]["artifacts"] = manifest[part]["training"]["onnx"]
    (bundle_copy / "manifest.json").write_text(json.dumps(v1))
    with Bundle.open(bundle_copy) as b:
        assert b.formats == ["onnx"] and b.manifest.global_expert.files == {"onnx": "ge.onnx"}
        assert b.manifest.local_expert.training["onnx"]["checkpoint"] == "le/checkpoint"
        assert b.manifest.local_expert.parameters is None


def test_unknown_schema_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.open(bundle_copy)


def test_manifest_that_breaks_the_schema(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["labels"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'labels' is a required property"):
        Bundle.open(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)


def test_corrupt_or_missing_zip(tmp_path, bundle_dir):
    broken = tmp_path / "broken.zip"
    data = bundle_dir.with_name(bundle_dir.name + ".zip").read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError):
        Bundle.open(broken)
    with pytest.raises(BundleError, match="no bundle at"):
        Bundle.open(tmp_path / "nothing")
