"""The typed manifest: one way to and from JSON, validated against the schema
(whose format names come from the registry), older versions upgraded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetailor.toolkit.errors import BundleError
from edgetailor.toolkit.manifest import Manifest


def test_round_trip_is_exact(bundle_dir):
    text = (bundle_dir / "manifest.json").read_text()
    manifest = Manifest.from_json(text)
    assert json.loads(manifest.to_json()) == json.loads(text)
    x = manifest.input.normalize(np.zeros((2, 28, 28), np.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]


def test_unknown_format_is_refused_by_the_schema(bundle_dir):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    data["formats"]["coreml"] = data["formats"]["onnx"]
    with pytest.raises(BundleError, match="coreml"):
        Manifest.from_dict(data)


def test_training_files_of_a_format_are_required(bundle_dir):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    del data["local_expert"]["training"]["onnx"]["forward"]
    with pytest.raises(BundleError, match="local_expert's onnx training files \\(step\\) make up no whole training "
                                          "kind \\(steps: step, forward; ort-training"):
        Manifest.from_dict(data)
    data = json.loads((bundle_dir / "manifest.json").read_text())
    data["local_expert"]["training"]["onnx"]["gradient_model"] = "le/gradient.onnx"
    with pytest.raises(BundleError, match="gradient_model"):
        Manifest.from_dict(data)
    data = json.loads((bundle_dir / "manifest.json").read_text())
    del data["gating_network"]["initial_parameters"]
    with pytest.raises(BundleError, match="gating_network has step programs but no .*initial_parameters"):
        Manifest.from_dict(data)


def test_a_manifest_that_fails_the_schema_is_never_written(bundle_dir):
    manifest = Manifest.from_json((bundle_dir / "manifest.json").read_text())
    manifest.labels = ["only one"]
    with pytest.raises(BundleError, match="labels"):
        manifest.to_json()


def test_a_format_without_its_ge_file_is_refused(bundle_dir):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    del data["global_expert"]["files"]["tflite"]
    with pytest.raises(BundleError, match="tflite without a GE file"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_the_manifest_schemas_are_valid_json_schemas(version):
    """The device validates manifests without re-checking the schema (it costs a tenth of a second per command)."""
    import jsonschema

    from edgetailor.toolkit.manifest import manifest_schema

    schema = manifest_schema(version)
    jsonschema.validators.validator_for(schema).check_schema(schema)


def test_a_patch_table_that_would_corrupt_the_program_is_refused():
    from edgetailor.toolkit.patching import PatchTable

    good = PatchTable({"local_expert": {"w": ([0, 1], [8, 12])}}, [20], 32)
    assert PatchTable.from_json(good.to_json(), "t").values == good.values
    for bad in (PatchTable({"local_expert": {"w": ([0], [8, 12])}}, [20], 32),      # more offsets than elements
                PatchTable({"local_expert": {"w": ([0, 1], [8, 10])}}, [20], 32),   # overlapping values
                PatchTable({"local_expert": {"w": ([0, 1], [8, 12])}}, [30], 32),   # past the end
                PatchTable({"local_expert": {"w": ([-1, 1], [8, 12])}}, [20], 32)):  # negative element
        with pytest.raises(BundleError, match="not a patch table"):
            PatchTable.from_json(bad.to_json(), "t")


def test_glyph_bundles_stay_version_2_and_other_inputs_are_version_3(bundle_dir):
    """Clients from before modalities read glyph bundles and refuse the rest, rather than read a window as an image."""
    from edgetailor.toolkit.input_spec import InputSpec

    data = json.loads((bundle_dir / "manifest.json").read_text())
    assert data["schema_version"] == 2 and "modality" not in data["input"]
    manifest = Manifest.from_dict(data)
    manifest.input = InputSpec.for_timeseries(3, 64, 0.1, 2.0)
    windows = json.loads(manifest.to_json())
    assert windows["schema_version"] == 3 and windows["input"]["modality"] == "timeseries"
    assert Manifest.from_dict(windows).input == manifest.input
    assert Manifest.from_dict(windows).input.normalize(np.ones((2, 3, 64))).shape == (2, 3, 64)
    windows["schema_version"] = 2
    with pytest.raises(BundleError, match="schema version 2 with input modality 'timeseries'"):
        Manifest.from_dict(windows)
    data["schema_version"] = 3
    with pytest.raises(BundleError, match="schema version 3 with input modality 'image'"):
        Manifest.from_dict(data)
    windows["schema_version"], windows["input"]["modality"] = 3, "hologram"
    with pytest.raises(BundleError, match="hologram"):
        Manifest.from_dict(windows)


def test_an_input_its_modality_cannot_have_is_refused(bundle_dir):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    data["input"]["dtype"] = "float32"
    with pytest.raises(BundleError, match="image input of shape .* and dtype float32"):
        Manifest.from_dict(data)
    data = json.loads((bundle_dir / "manifest.json").read_text())
    data["input"]["augment"] = {"name": "affine-v1", "rotation": 30.0}
    with pytest.raises(BundleError, match="augmentation is fixed"):
        Manifest.from_dict(data)
