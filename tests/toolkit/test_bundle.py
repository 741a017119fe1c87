import json
import shutil

import pytest

from toolkit.bundle import Bundle
from toolkit.errors import BundleError


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


def test_tampered_file_is_named(bundle_copy):
    path = bundle_copy / "le" / "checkpoint"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="le/checkpoint does not match its sha256"):
        Bundle.open(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "ge.onnx").unlink()
    with pytest.raises(BundleError, match="missing ge.onnx"):
        Bundle.open(bundle_copy)


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
