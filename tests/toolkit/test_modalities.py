"""Modalities: how each kind of input becomes samples and is augmented,
seeded and vectorised, and the sensor-window loaders with their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgetailor.toolkit.errors import DataFormatError, LimitError, SampleError
from edgetailor.toolkit.gestures import GESTURES, generic_gestures, simulate_gesture_user
from edgetailor.toolkit.imaging import affine
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.limits import Limits
from edgetailor.toolkit.modalities import MODALITIES, ImageModality, TimeSeriesModality, augment_params
from edgetailor.toolkit.windows import load_windows

SPEC = InputSpec.for_timeseries(3, 64)


def test_image_augmentation_is_the_per_image_warp_vectorised():
    rng = np.random.default_rng(3)
    images = (rng.random((6, 28, 28)) * 255).astype(np.uint8)
    out = ImageModality().augment(images, 2, np.random.default_rng(0), ImageModality.default_augment)
    assert out.shape == (18, 28, 28) and np.array_equal(out[:6], images)
    draws = np.random.default_rng(0)
    rotation, scale, translate = draws.uniform(-6, 6, 12), draws.uniform(0.95, 1.05, 12), draws.uniform(-1, 1, (12, 2))
    for k in range(12):
        want = affine(images[k % 6].astype(np.float32) / 255.0, rotation_deg=rotation[k], scale=scale[k],
                      translate=tuple(translate[k]))
        assert np.abs(out[6 + k].astype(int) - np.rint(want * 255)).max() <= 1, k


def test_window_augmentation_is_seeded_keeps_the_originals_and_varies_the_copies():
    windows = generic_gestures(people=2, per_class=1).images
    modality, params = TimeSeriesModality(), augment_params(SPEC)
    out = modality.augment(windows, 3, np.random.default_rng(7), params)
    again = modality.augment(windows, 3, np.random.default_rng(7), params)
    assert out.shape == (4 * len(windows), 3, 64) and out.dtype == np.float32
    assert np.array_equal(out, again) and np.array_equal(out[:len(windows)], windows)
    copies = out[len(windows):].reshape(3, *windows.shape)
    assert np.isfinite(out).all()
    for k in range(3):
        change = np.abs(copies[k] - windows).mean() / np.abs(windows).mean()
        assert 0.01 < change < 0.6, change          # a variation of the gesture, not noise
    none = {**params, "jitter": 0.0, "scaling": 0.0, "warp": 0.0}
    np.testing.assert_allclose(modality.augment(windows, 2, np.random.default_rng(0), none)[len(windows):],
                               np.concatenate([windows, windows]), atol=1e-5)


def test_a_bundle_can_describe_its_own_augmentation():
    spec = InputSpec.for_timeseries(3, 64, augment={"name": "sensor-v1", "jitter": 0.0})
    assert augment_params(spec)["jitter"] == 0.0 and augment_params(spec)["warp"] == 0.2
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert "modality" not in InputSpec.for_glyphs().to_dict()     # glyph specs stay as older clients read them
    assert set(MODALITIES) == {"image", "timeseries", "audio"}


def test_windows_are_prepared_exactly_or_refused():
    modality = TimeSeriesModality()
    windows = np.random.default_rng(0).normal(size=(4, 3, 64))
    assert modality.prepare(windows, SPEC).dtype == np.float32
    assert modality.prepare(list(windows), SPEC).shape == (4, 3, 64)
    assert modality.prepare(np.ones((2, 50)), InputSpec.for_timeseries(1, 50)).shape == (2, 1, 50)
    with pytest.raises(SampleError, match=r"\(3 channels, 64 steps\); got windows of shape \(3, 60\)"):
        modality.prepare(windows[:, :, :60], SPEC)
    with pytest.raises(SampleError, match="different shapes"):
        modality.prepare([windows[0], windows[1][:, :10]], SPEC)
    windows[2, 1, 5] = np.nan
    with pytest.raises(SampleError, match="1 window.* NaN .* window 2"):
        modality.prepare(windows, SPEC)
    with pytest.raises(SampleError, match="numbers"):
        modality.prepare(np.full((1, 3, 64), "a"), SPEC)


def _write_folder(root, user):
    for i, (window, label) in enumerate(zip(user.train.images, user.train.labels)):
        folder = root / GESTURES[label]
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            np.save(folder / f"{i}.npy", window)
        else:
            np.savetxt(folder / f"{i}.csv", window.T, delimiter=",", header="x,y,z", comments="")


def test_window_folders_and_npz_load_in_the_bundles_label_order(tmp_path):
    user = simulate_gesture_user(0, train_per_class=2, test_per_class=1)
    _write_folder(tmp_path / "windows", user)
    names = list(reversed(GESTURES))
    data = load_windows(tmp_path / "windows", (3, 64), names)
    assert data.images.shape == (12, 3, 64) and data.label_names == names
    order = np.argsort([GESTURES[i] for i in user.train.labels], kind="stable")
    np.testing.assert_allclose(np.sort(data.images.ravel()), np.sort(user.train.images.ravel()), rtol=1e-6)
    assert sorted(names[i] for i in data.labels) == sorted(GESTURES[i] for i in user.train.labels[order])
    np.savez(tmp_path / "w.npz", x=user.test.images, y=user.test.labels, label_names=np.array(GESTURES))
    npz = load_windows(tmp_path / "w.npz", (3, 64), names)
    assert [names[i] for i in npz.labels] == [GESTURES[i] for i in user.test.labels]
    unlabelled = load_windows(tmp_path / "windows" / "tap", (3, 64), labelled=False)
    assert len(unlabelled) == 2 and unlabelled.label_names == ["unlabelled"]


def test_bad_windows_are_named_or_left_out(tmp_path):
    user = simulate_gesture_user(1, train_per_class=1, test_per_class=1)
    _write_folder(tmp_path / "w", user)
    short = tmp_path / "w" / "tap" / "short.csv"
    np.savetxt(short, user.train.images[0].T[:50], delimiter=",")
    with pytest.raises(SampleError, match=r"short.csv: a window must be 3 channel\(s\) x 64 steps, got 50 rows x 3"):
        load_windows(tmp_path / "w", (3, 64))
    data = load_windows(tmp_path / "w", (3, 64), skip_bad=True)
    assert len(data) == 6 and any("short.csv" in note for note in data.notes)
    short.unlink()
    bad = user.train.images[:2].copy()
    bad[1, 0, 3] = np.inf
    np.savez(tmp_path / "nan.npz", x=bad, y=np.array([0, 1]))
    with pytest.raises(SampleError, match="NaN or infinite values, the first .*nan.npz window 1"):
        load_windows(tmp_path / "nan.npz", (3, 64))
    assert len(load_windows(tmp_path / "nan.npz", (3, 64), skip_bad=True)) == 1
    np.savez(tmp_path / "flat.npz", x=np.zeros((2, 3, 64, 2)), y=np.array([0, 1]))
    with pytest.raises(DataFormatError, match="shape"):
        load_windows(tmp_path / "flat.npz", (3, 64))
    (tmp_path / "w" / "tap" / "words.csv").write_text("a,b,c\nx,y,z\n")
    with pytest.raises(DataFormatError, match="not a CSV of numbers"):
        load_windows(tmp_path / "w", (3, 64))
    with pytest.raises(SampleError, match="not known to the bundle"):
        load_windows(tmp_path / "nan.npz", (3, 64), ["tap"], skip_bad=True)
    with pytest.raises(LimitError):
        load_windows(tmp_path / "w", (3, 64), limits=Limits(max_samples=3))
    with pytest.raises(DataFormatError, match="cannot read labelled windows"):
        load_windows(next((tmp_path / "w").rglob("*.npy")), (3, 64))


@pytest.mark.parametrize("spec, message", [
    (InputSpec.for_timeseries(3, 64, augment={"scaling": -0.1}), "scaling must be a finite number"),
    (InputSpec.for_timeseries(3, 64, augment={"snr_db": [10, 20]}), "snr_db that timeseries augmentation lacks"),
    (InputSpec.for_timeseries(3, 64, augment={"name": "affine-v1"}), "augmented by 'sensor-v1'"),
    (InputSpec.for_timeseries(3, 64, augment={"warp": 0.7}), "warp is a share"),
    (InputSpec.for_audio(augment={"snr_db": 20}), "snr_db must be a pair"),
])
def test_augmentation_parameters_a_device_could_not_use_are_refused(spec, message):
    from edgetailor.toolkit.modalities import check_augment

    with pytest.raises(ValueError, match=message):
        check_augment(spec)


def test_a_glyph_bundle_keeps_the_augmentation_every_client_applies():
    import dataclasses

    from edgetailor.toolkit.modalities import check_augment

    check_augment(dataclasses.replace(InputSpec.for_glyphs(), augment={"rotation": 6.0}))   # the default: fine
    with pytest.raises(ValueError, match="glyph bundle's augmentation is fixed"):
        check_augment(dataclasses.replace(InputSpec.for_glyphs(), augment={"rotation": 3.0}))
