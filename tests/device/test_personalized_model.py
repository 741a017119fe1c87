"""The personalized model as one inference program: the bundle's template in
each format, filled with the trained weights on the device, answers exactly
as `device predict` does, in the format's own runtime."""

from __future__ import annotations

import numpy as np
import pytest

from edgetailor.device import DeviceRuntime
from edgetailor.export.formats import get_exporter
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import BundleError, PersonalizationError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def personalized_state(bundle_dir, user, tmp_path_factory):
    state = tmp_path_factory.mktemp("personalized-model") / "state"
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_dataset(user.train)
        rt.personalize()
    return state


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("tflite", ".tflite"), ("executorch", ".pte")])
def test_the_program_answers_as_predict(bundle_dir, personalized_state, user, generic_split, tmp_path, fmt,
                                        suffix):
    # the user's glyphs and generic ones, so that both routes are taken
    samples = np.concatenate([user.test.images, generic_split.test.images[:100]])
    with DeviceRuntime.open(bundle_dir, personalized_state) as rt:
        made = rt.preprocessing.to_dict()
        prediction = rt.predict_dataset(LabeledImages(samples, np.zeros(len(samples)), prepared_with=made))
        path = rt.export_personalized(tmp_path / f"model{suffix}", fmt)
        x = rt.manifest.input.normalize(samples)
    logits, probabilities, gate, expert = (np.asarray(o) for o in get_exporter(fmt).load(path, all_outputs=True)(x))
    assert np.array_equal(logits.argmax(1), prediction.indices)
    assert list(np.where(expert.reshape(-1) == 1, "LE", "GE")) == prediction.experts
    assert set(prediction.experts) == {"GE", "LE"}  # both routes exercised
    assert np.abs(gate.reshape(-1) - prediction.gate).max() < 1e-5
    assert np.abs(probabilities - prediction.probabilities).max() < 1e-5


def test_cli_and_refusals(bundle_dir, personalized_state, tmp_path):
    out = run_cli("device", "export-personalized", "--bundle", str(bundle_dir), "--state", str(personalized_state),
                  "--out", str(tmp_path / "m.onnx")).stdout
    assert "outputs logits, probabilities, gate, expert" in out and (tmp_path / "m.onnx").stat().st_size > 100_000
    with DeviceRuntime.open(bundle_dir, personalized_state) as rt, \
            pytest.raises(BundleError, match="no torch personalized-model template.*executorch, onnx, tflite"):
        rt.export_personalized(tmp_path / "m.pt2", "torch")
    with DeviceRuntime.open(bundle_dir, tmp_path / "fresh") as rt, \
            pytest.raises(PersonalizationError, match="no personalization in use"):
        rt.export_personalized(tmp_path / "m.onnx")

