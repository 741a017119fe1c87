"""The same bundle and the same user samples through every backend: GE
answers alike, personalization ends alike (the runtimes an app embeds
training with step programs, the parity backends with their runtimes' own
training packages), and a backend that cannot run says which ones can."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgetailor.device import DeviceRuntime
from edgetailor.device.backends import PREFERENCE, choose_backends, installed_backends
from tests.conftest import ROOT, run_cli
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BundleError, EdgetailorError

# onnxruntime-training cannot share a venv with onnxruntime: its parity runs
# in a venv of its own (tests/device/test_ort_training.py, benchmarks/backends.py).
BACKENDS = [b for b in PREFERENCE if b != "ort-training"]


def test_every_backend_is_installed_here():
    # The dev install has every other runtime; a missing one would silently skip parity below.
    assert installed_backends() == BACKENDS


def test_ge_outputs_agree_across_backends(bundle_dir, user, tmp_path):
    outputs = {}
    for name in BACKENDS:
        with DeviceRuntime.open(bundle_dir, tmp_path / name, name) as rt:
            x = rt.manifest.input.normalize(user.test.images[:24])
            outputs[name] = rt.ge.run(x)
    ref_logits, ref_features = outputs["torch"]
    for name, (logits, features) in outputs.items():
        assert np.abs(logits - ref_logits).max() < 1e-4, name
        for tap, value in features.items():
            assert np.abs(value - ref_features[tap]).max() < 1e-4, (name, tap)


@pytest.fixture(scope="module")
def personalized(bundle_dir, user, tmp_path_factory):
    """Each backend personalizes the same user from the same samples."""
    results = {}
    for name in BACKENDS:
        state = tmp_path_factory.mktemp(f"state-{name}")
        with DeviceRuntime.open(bundle_dir, state, name) as rt:
            rt.add_dataset(user.train)
            report = rt.personalize()
            results[name] = {"report": report, "state": state, "trainer": rt.trainer.name,
                             "accuracy": rt.evaluate_dataset(user.test)["accuracy"]}
    return results


def test_personalization_agrees_across_backends(personalized):
    accuracies = {name: r["accuracy"] for name, r in personalized.items()}
    assert max(accuracies.values()) - min(accuracies.values()) <= 0.01, accuracies
    for name, r in personalized.items():
        assert np.isfinite(r["report"]["le_loss"]) and np.isfinite(r["report"]["gn_loss"]), name
        assert abs(r["report"]["le_loss"] - personalized["torch"]["report"]["le_loss"]) < 0.01, name
    # Every backend trains itself: the app needs no second runtime.
    assert all(r["trainer"] == name == r["report"]["backend"] for name, r in personalized.items())


def test_a_personalization_runs_on_any_training_backend(bundle_dir, user, personalized):
    """Stored weights are backend-neutral: LiteRT's personalization answers the same under every backend."""
    state = personalized["litert"]["state"]
    answers = {}
    for name in BACKENDS:
        with DeviceRuntime.open(bundle_dir, state, name) as rt:
            assert rt.personalized
            answers[name] = rt.predict(user.test.images)
    for name in BACKENDS:
        assert answers[name].labels == answers["litert"].labels, name
        assert np.abs(answers[name].gate - answers["litert"].gate).max() < 1e-4, name


def test_bundle_without_the_backends_format(ge_dir, tmp_path):
    from edgetailor.export.bundle import export_bundle

    bundle = export_bundle(ge_dir, tmp_path / "b", formats=["onnx"], make_zip=False)
    with pytest.raises(BundleError, match="has no tflite files") as info:
        DeviceRuntime.open(bundle, tmp_path / "s", "litert")
    assert "backends that would work with it: ort" in str(info.value)
    assert "--formats onnx,tflite" in str(info.value)
    with pytest.raises(BundleError, match="has no executorch files"):
        DeviceRuntime.open(bundle, tmp_path / "s", "executorch-training")
    with DeviceRuntime.open(bundle, tmp_path / "s") as rt:  # auto picks what the bundle carries
        assert rt.backend.name == "ort"


@pytest.mark.parametrize("file, backend", [("ge.pte", "executorch"), ("ge.tflite", "litert"),
                                           ("le/step.pte", "executorch"), ("gn/forward.tflite", "litert"),
                                           ("le/training.pte", "executorch-training")])
def test_tampered_program_names_the_backends_that_work(bundle_dir, tmp_path, file, backend):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    data = bytearray((copy / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / file).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{file} does not match its sha256") as info:
        DeviceRuntime.open(copy, tmp_path / "s", backend)
    message = str(info.value)
    working = message.split("work with it:")[1].split(";")[0]
    assert "ort" in working and backend not in working
    with DeviceRuntime.open(copy, tmp_path / "s2") as rt:  # auto skips the damaged format
        assert rt.backend.name == "ort"


def test_unknown_backend(bundle_dir):
    with Bundle.open(bundle_dir) as b, pytest.raises(EdgetailorError, match="unknown backend 'tensorrt'"):
        choose_backends(b, "tensorrt")


def test_backend_not_installed(bundle_dir, tmp_path):
    """LiteRT's modules made unimportable in a fresh interpreter, as on a phone without it."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ai_edge_litert"] = None
        sys.modules["tflite_runtime"] = None
        from edgetailor.device import DeviceRuntime
        from edgetailor.toolkit.errors import EdgetailorError
        try:
            DeviceRuntime.open({str(bundle_dir)!r}, {str(tmp_path / 's')!r}, "litert")
        except EdgetailorError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert "backend 'litert' is not installed" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'ai-edge-litert'" in proc.stdout
    assert "installed backends: ort, executorch, executorch-training, torch" in proc.stdout


def test_device_info_cli(bundle_dir):
    result = json.loads(run_cli("device", "info", "--bundle", str(bundle_dir), "--json").stdout)
    assert result["auto"] == "ort"
    rows = {r["backend"]: r for r in result["backends"]}
    assert set(rows) == set(PREFERENCE)
    assert all(rows[b]["bundle"] == "runs GE and trains" for b in BACKENDS)
    assert rows["ort-training"]["bundle"] == "not installed" and rows["litert"]["training"] == "steps"
    text = run_cli("device", "info").stdout
    assert "auto picks: ort" in text


def test_cli_backend_flag(bundle_dir, user, tmp_path):
    from edgetailor.toolkit.loaders import save_npz

    save_npz(user.train, tmp_path / "train.npz")
    out = run_cli("device", "personalize", "--bundle", str(bundle_dir), "--state", str(tmp_path / "s"),
                  "--samples", str(tmp_path / "train.npz"), "--backend", "executorch", "--json").stdout
    assert json.loads(out.strip().splitlines()[-1])["backend"] == "executorch"
    proc = run_cli("device", "evaluate", "--bundle", str(bundle_dir), "--state", str(tmp_path / "s"),
                   "--samples", str(tmp_path / "train.npz"), "--backend", "nope", check=False)
    assert proc.returncode != 0 and "unknown backend 'nope'" in proc.stderr
