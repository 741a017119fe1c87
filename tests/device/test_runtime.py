import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from edgetailor.device import DeviceRuntime
from edgetailor.toolkit.errors import SampleError, StateError
from tests.conftest import run_cli


@pytest.fixture
def runtime(bundle_dir, tmp_path):
    with DeviceRuntime.open(bundle_dir, tmp_path / "state") as rt:
        yield rt


@pytest.fixture(scope="module")
def personalized_state(bundle_dir, user, tmp_path_factory):
    state = tmp_path_factory.mktemp("personalized") / "state"
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_dataset(user.train)
        report = rt.personalize()
    return state, report


def test_unpersonalized_answers_with_ge_alone(runtime, bundle_dir, user):
    prediction = runtime.predict_dataset(user.test)  # prepared samples, as GE reads them
    session = ort.InferenceSession(str(bundle_dir / "ge.onnx"), providers=["CPUExecutionProvider"])
    ge_logits = session.run(["logits"], {"image": runtime.manifest.input.normalize(user.test.images)})[0]
    assert np.array_equal(prediction.indices, ge_logits.argmax(1))
    assert set(prediction.experts) == {"GE"}
    result = runtime.evaluate_dataset(user.test)
    assert result["personalized"] is False and result["experts"]["LE"] == 0
    assert result["accuracy"] == result["ge_only_accuracy"]


def test_personalize_improves_the_user_and_keeps_generic(bundle_dir, personalized_state, user, generic_split):
    state, report = personalized_state
    assert report["n_samples"] == 100 and report["le_steps"] > 0 and np.isfinite(report["le_loss"])
    with DeviceRuntime.open(bundle_dir, state) as rt:  # a restart: everything comes from the state dir
        assert rt.personalized and rt.sample_count() == 100
        on_user = rt.evaluate_dataset(user.test)
        on_generic = rt.evaluate_dataset(generic_split.test)
        prediction = rt.predict(user.test.images[:5])
    assert on_user["accuracy"] >= on_user["ge_only_accuracy"] + 0.05
    assert on_user["experts"]["LE"] > on_user["experts"]["GE"]
    assert on_generic["accuracy"] >= on_generic["ge_only_accuracy"] - 0.01
    assert prediction.probabilities.shape == (5, 10)
    assert np.allclose(prediction.probabilities.sum(1), 1.0, atol=1e-5)
    assert all(label in rt.labels for label in prediction.labels)


def test_reset_goes_back_to_ge(bundle_dir, personalized_state, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(personalized_state[0], state)
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.reset()                       # the samples stay by default: personalize again any time
        assert not rt.personalized and rt.sample_count() == 100
        rt.reset(keep_samples=False)
        assert rt.sample_count() == 0


@pytest.mark.parametrize("images, match", [
    (np.zeros((3, 28, 28, 2), np.uint8), r"\(N, H, W\) grey"),
    (np.zeros((3, 32, 32), np.uint8), "3 of 3 images have no usable ink"),
    (np.zeros((3, 28, 28), np.int64), "dtype int64"),
    (np.full((3, 28, 28), np.nan, np.float32), "NaN"),
    (np.full((3, 28, 28), 3.0, np.float32), r"\[0, 1\]"),
    (np.zeros((0, 28, 28), np.uint8), "empty"),
])
def test_bad_images_are_refused(runtime, images, match):
    with pytest.raises(SampleError, match=match):
        runtime.add_samples(images, [1] * len(images))
    assert runtime.sample_count() == 0


def test_bad_labels_are_refused(runtime, user):
    images = user.train.images[:2]
    with pytest.raises(SampleError, match="unknown label.*'A'"):
        runtime.add_samples(images, ["A", "1"])
    with pytest.raises(SampleError, match=r"index\(es\) \[12\]"):
        runtime.add_samples(images, [12, 1])
    with pytest.raises(SampleError, match="2 images but 1 labels"):
        runtime.add_samples(images, [1])


def test_samples_are_deduplicated_and_floats_accepted(runtime, user):
    assert runtime.add_dataset(user.train.subset(np.arange(10))) == 10
    assert runtime.add_dataset(user.train.subset(np.arange(10))) == 0
    assert runtime.add_samples(user.train.images[10:12] / 255.0, user.train.labels[10:12]) == 2


def test_personalize_needs_samples(runtime, user):
    with pytest.raises(SampleError, match="no samples"):
        runtime.personalize()
    runtime.add_samples(user.train.images[:3], [4, 4, 4])
    with pytest.raises(SampleError, match="at least two labels"):
        runtime.personalize()


def test_personalization_of_another_bundle_is_not_used(ge_dir, bundle_dir, personalized_state, user, tmp_path):
    from edgetailor.export.bundle import export_bundle
    from edgetailor.toolkit.config import ExpertConfig

    other = export_bundle(ge_dir, tmp_path / "other", experts=ExpertConfig(gate_threshold=0.6), make_zip=False,
                          formats=["onnx"])   # any other bundle will do; one format exports fastest
    state = tmp_path / "state"
    shutil.copytree(personalized_state[0], state)
    with DeviceRuntime.open(other, state) as rt:
        assert not rt.personalized and rt.sample_count() == 100  # samples kept, LE/GN of another GE dropped
        assert "trained with another bundle" in rt.status()["personalization_problem"]
    # and the CLI says so, in evaluate and in info
    np.savez(tmp_path / "few.npz", x=user.test.images[:2], y=user.test.labels[:2])
    evaluated = json.loads(run_cli("device", "evaluate", "--bundle", str(other), "--state", str(state),
                                   "--samples", str(tmp_path / "few.npz"), "--json").stdout)
    assert "trained with another bundle" in evaluated["personalization_problem"]
    proc = run_cli("device", "evaluate", "--bundle", str(other), "--state", str(state),
                   "--samples", str(tmp_path / "few.npz"))
    assert "not in use: it was trained with another bundle" in proc.stderr
    info = run_cli("device", "info", "--bundle", str(other), "--state", str(state)).stdout
    assert "100 samples stored" in info and "not in use: it was trained with another bundle" in info


def test_state_for_other_labels_is_refused(bundle_dir, tmp_path):
    from edgetailor.device.store import StateStore

    StateStore(tmp_path / "state", ["a", "b"]).close()
    with pytest.raises(StateError, match="labels"):
        DeviceRuntime.open(bundle_dir, tmp_path / "state")


def test_full_disk_is_clear_and_keeps_stored_samples(runtime, user):
    runtime.add_dataset(user.train.subset(np.arange(5)))
    pages = runtime.store.db.execute("PRAGMA page_count").fetchone()[0]
    runtime.store.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full" from here on
    with pytest.raises(StateError, match="disk is full"):
        runtime.add_dataset(user.train)
    assert runtime.sample_count() == 5
