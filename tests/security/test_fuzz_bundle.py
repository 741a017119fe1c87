"""A hypothesis fuzz of bundle opening: mutated manifests and mutated .zip
bundles must give only EdgetailorError (a clear refusal), never another
exception and never an unpacked folder left behind. Short here;
``benchmarks/security.py`` runs 10,000 inputs of each."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetailor.toolkit.bundle import TEMP_PREFIX, Bundle, zip_bundle
from edgetailor.toolkit.errors import EdgetailorError
from edgetailor.toolkit.manifest import Manifest

ODD = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                st.text(max_size=30), st.sampled_from(["../x", "/etc/passwd", "C:\\x", "a\x00b", ""]),
                st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@pytest.fixture(scope="module")
def manifest_doc(bundle_dir):
    return json.loads((bundle_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def small_zip(bundle_dir, tmp_path_factory):
    """The session bundle's ONNX files only: every mutated zip is opened whole, so it should be small."""
    import shutil

    from edgetailor.toolkit.bundle import write_manifest

    root = tmp_path_factory.mktemp("fuzz") / "small"
    manifest = Manifest.from_json((bundle_dir / "manifest.json").read_text())
    keep = set(manifest.format_files("onnx")) | {manifest.replay.file, manifest.local_expert.initial_parameters,
                                                 manifest.gating_network.initial_parameters}
    for name in keep:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle_dir / name, root / name)
    manifest.formats = {"onnx": manifest.formats["onnx"]}
    manifest.global_expert.files = {"onnx": manifest.global_expert.files["onnx"]}
    for key in ("local_expert", "gating_network"):
        part = manifest.part(key)
        part.training = {"onnx": part.training["onnx"]}
    manifest.personalized_model = {k: v for k, v in manifest.personalized_model.items() if k == "onnx"}
    manifest.replay.outputs = {k: v for k, v in manifest.replay.outputs.items() if k == "onnx"}
    write_manifest(root, manifest)
    Bundle.open(root).close()
    return zip_bundle(root, root.with_name("small.zip")).read_bytes()


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifest_gives_only_our_error(manifest_doc, data):
    doc = json.loads(json.dumps(manifest_doc))
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(ODD)
        except (KeyError, IndexError, TypeError):
            continue     # an earlier edit removed this path
    try:
        Manifest.from_json(json.dumps(doc), "fuzzed manifest")
    except EdgetailorError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])),
                      min_size=1, max_size=4))
def test_mutated_zip_gives_only_our_error_and_leaves_nothing(small_zip, edits, tmp_path_factory):
    data = bytearray(small_zip)
    for where, value, kind in edits:
        at = int(where * (len(data) - 1))
        if kind == "set":
            data[at] = value
        elif kind == "cut":
            data = data[:at]
        else:
            data[at:at] = bytes([value]) * 4
        if not data:
            data = bytearray(b"PK")
    path = tmp_path_factory.mktemp("case") / "case.zip"
    path.write_bytes(bytes(data))
    before = set(Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"))
    try:
        Bundle.open(path).close()
    except EdgetailorError:
        pass
    assert set(Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*")) <= before, "an unpacked folder was left behind"
