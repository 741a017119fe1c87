"""The users a personalization must not hurt: samples of only some labels,
one sample per label, and samples GE already reads right. For each, the
generic accuracy stays within the real-inputs issue's 0.5 points of GE alone,
and the report says what was learned."""

import numpy as np

from edgetailor.device import DeviceRuntime
from edgetailor.device.mixture import describe_learning
from tests.conftest import run_cli

GENERIC_POINTS = 0.005  # the most generic accuracy a personalization may cost


def personalize_and_measure(bundle_dir, state, images, labels, generic_split):
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_samples(images, labels)
        report = rt.personalize()
        on_generic = rt.evaluate_dataset(generic_split.test)
    assert on_generic["accuracy"] >= on_generic["ge_only_accuracy"] - GENERIC_POINTS, on_generic
    return report, on_generic


def test_a_user_with_only_some_labels(bundle_dir, user, generic_split, tmp_path):
    keep = user.train.labels < 5
    report, _ = personalize_and_measure(bundle_dir, tmp_path / "state", user.train.images[keep],
                                        user.train.labels[keep], generic_split)
    learned = report["learned"]
    assert learned["labels_without_samples"] == ["5", "6", "7", "8", "9"]
    assert sorted(learned["labels"]) == ["0", "1", "2", "3", "4"]
    assert learned["personalized_accuracy"] >= learned["ge_accuracy"]
    assert "No samples of '5', '6', '7', '8', '9'" in describe_learning(learned)
    with DeviceRuntime.open(bundle_dir, tmp_path / "state") as rt:
        # the labels the user did give are read better than by GE alone
        given = np.isin(user.test.labels, np.arange(5))
        result = rt.evaluate(rt.prepare(user.test.images[given]), user.test.labels[given])
    assert result["accuracy"] > result["ge_only_accuracy"]


def test_a_user_with_one_sample_per_label(bundle_dir, user, generic_split, tmp_path):
    first = np.array([np.flatnonzero(user.train.labels == k)[0] for k in range(10)])
    report, _ = personalize_and_measure(bundle_dir, tmp_path / "state", user.train.images[first],
                                        user.train.labels[first], generic_split)
    learned = report["learned"]
    assert report["n_samples"] == 10 and report["le_steps"] > 0
    assert all(v["samples"] == 1 for v in learned["labels"].values()) and learned["labels_without_samples"] == []
    assert learned["personalized_accuracy"] >= learned["ge_accuracy"]


def test_samples_ge_already_reads_right(bundle_dir, generic_split, tmp_path):
    """Glyphs of the generic writers that GE reads right: nothing to correct,
    so neither they nor other such glyphs may get worse."""
    pool = generic_split.user_pool
    with DeviceRuntime.open(bundle_dir, tmp_path / "ge-only") as rt:
        right = np.flatnonzero(rt.predict_dataset(pool).indices == pool.labels)
    samples = np.concatenate([right[pool.labels[right] == k][:8] for k in range(10)])
    others = np.setdiff1d(right, samples)
    report, _ = personalize_and_measure(bundle_dir, tmp_path / "state", pool.images[samples], pool.labels[samples],
                                        generic_split)
    learned = report["learned"]
    assert learned["ge_accuracy"] == 1.0 and learned["broken"] == 0
    assert "GE already read every sample right" in describe_learning(learned)
    with DeviceRuntime.open(bundle_dir, tmp_path / "state") as rt:
        still = rt.evaluate(pool.images[others], pool.labels[others])
    assert still["accuracy"] >= 1.0 - GENERIC_POINTS, still


def test_the_cli_says_what_was_learned(bundle_dir, user, tmp_path):
    keep = user.train.labels != 3
    np.savez(tmp_path / "mine.npz", x=user.train.images[keep], y=user.train.labels[keep])
    out = run_cli("device", "personalize", "--bundle", str(bundle_dir), "--state", str(tmp_path / "state"),
                  "--samples", str(tmp_path / "mine.npz")).stdout
    assert "learned: on your 90 samples: GE alone read" in out
    assert "No samples of '3'" in out


def test_describe_learning_without_missing_labels():
    names = ["a", "b"]
    learned = {"ge_accuracy": 0.5, "personalized_accuracy": 1.0, "fixed": 1, "broken": 0, "routed_to_le": 1.0,
               "labels": {n: {"samples": 1, "ge_right": 0, "personalized_right": 1} for n in names},
               "labels_without_samples": []}
    assert describe_learning(learned) == ("on your 2 samples: GE alone read 50%, personalized 100% "
                                          "(1 fixed, 0 newly wrong; LE answers 100% of them)")


def test_large_sample_sets_train_a_bounded_number_of_steps():
    """150 epochs suit 100 samples; 20,000 get as many epochs as fit in le_max_steps (at least one)."""
    from edgetailor.device.mixture import le_epochs_for
    from edgetailor.toolkit.config import PersonalizeConfig

    cfg = PersonalizeConfig()
    assert le_epochs_for(cfg, 500) == 150                      # 4 batches of 128: 600 steps
    assert le_epochs_for(cfg, 20000) == 6000 // 157 == 38       # 157 batches each
    assert le_epochs_for(PersonalizeConfig(le_max_steps=10), 20000) == 1


def test_the_replay_outputs_a_bundle_carries_are_what_each_ge_computes(bundle_dir):
    """GE's outputs on the replay, computed at export by each format's program, are what the device's GE
    gives on the replay samples: reading them instead of running GE changes nothing but the time."""
    from edgetailor.device.backends import BACKENDS, get_backend, installed_backends
    from edgetailor.device.mixture import replay_outputs
    from edgetailor.toolkit.bundle import Bundle

    with Bundle.open(bundle_dir) as bundle:
        manifest = bundle.manifest
        taps = [manifest.local_expert.feature_tap, manifest.gating_network.feature_tap]
        assert set(manifest.replay.outputs) == set(manifest.formats)
        checked = []
        for name in ("ort", "litert", "executorch"):
            if name not in installed_backends():
                continue
            backend = BACKENDS[name]
            ge = get_backend(name).load_global_expert(bundle)
            carried = replay_outputs(bundle, ge, backend.format, taps)
            computed = replay_outputs(bundle, ge, None, taps)      # no outputs for this format: GE runs
            np.testing.assert_allclose(carried[0], computed[0], atol=1e-4)
            for tap in taps:
                np.testing.assert_allclose(carried[1][tap].reshape(computed[1][tap].shape), computed[1][tap],
                                           atol=1e-4)
            checked.append(name)
        assert "ort" in checked


def test_replay_outputs_of_the_wrong_shape_are_refused_by_name(bundle_dir, user, tmp_path):
    """A bundle whose replay outputs do not fit its GE (hashed, so written so by its publisher) is refused
    when personalizing, naming the file and the array, and nothing is stored."""
    import shutil

    import pytest

    from edgetailor.toolkit.bundle import write_manifest
    from edgetailor.toolkit.errors import BundleError
    from edgetailor.toolkit.manifest import Manifest

    root = tmp_path / "bundle"
    shutil.copytree(bundle_dir, root)
    manifest = Manifest.from_json((root / "manifest.json").read_text())
    file = manifest.replay.outputs["onnx"]
    with np.load(root / file) as archive:
        arrays = dict(archive)
    arrays["le"] = arrays["le"].reshape(len(arrays["le"]), -1)[:, :7]
    np.savez_compressed(root / file, **arrays)
    write_manifest(root, manifest)                 # hashed again: it is what the publisher shipped
    with DeviceRuntime.open(root, tmp_path / "state", "ort") as rt:
        rt.add_samples(user.train.images, user.train.labels)
        with pytest.raises(BundleError, match=r"replay/outputs.onnx.npz: le is float32 \(\d+, 7\); float32 rows"):
            rt.personalize()
        assert not rt.personalized
