"""Bundles exported before step programs (GE in ONNX, LE and GN as
onnxruntime-training artifacts only) still open and answer with GE; training
them needs the ort-training backend, and the error says so and how to
re-export. With onnxruntime-training installed in a venv of its own, that
backend trains them (skipped without it)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgetailor.device import DeviceRuntime
from edgetailor.toolkit.errors import BackendError
from tests.conftest import ROOT, run_cli

OLD_BUNDLE = ROOT / "tests/fixtures/bundle-0.1-ort-training.zip"
ORT_TRAINING_PYTHON = Path(os.environ.get("EDGETAILOR_ORT_TRAINING_PYTHON", ROOT / ".venv-ort-training/bin/python"))


def test_an_old_bundle_answers_with_ge_and_explains_how_to_train(user, tmp_path):
    with DeviceRuntime.open(OLD_BUNDLE, tmp_path / "s") as rt:
        assert rt.backend.name == "ort" and rt.trainer is None
        before = rt.evaluate_dataset(user.test)
        assert before["accuracy"] > 0.5 and not before["personalized"]
        rt.add_dataset(user.train)
        with pytest.raises(BackendError, match="has no step programs") as info:
            rt.personalize()
    message = str(info.value)
    assert "exported by edgetailor 0.1.0" in message and "edgetailor export bundle" in message
    assert "ort-training" in message and "without onnxruntime" in message
    rows = {r["backend"]: r for r in json.loads(run_cli("device", "info", "--bundle", str(OLD_BUNDLE),
                                                         "--json").stdout)["backends"]}
    assert rows["ort"]["bundle"] == "runs GE (no step programs)"


@pytest.mark.skipif(not ORT_TRAINING_PYTHON.exists(),
                    reason=f"no onnxruntime-training venv at {ORT_TRAINING_PYTHON}: create one with "
                           "benchmarks/make_ort_training_venv.sh --device-only (or set EDGETAILOR_ORT_TRAINING_PYTHON)")
def test_the_ort_training_backend_trains_an_old_bundle(user, tmp_path):
    from edgetailor.toolkit.loaders import save_npz

    save_npz(user.train, tmp_path / "train.npz")
    save_npz(user.test, tmp_path / "test.npz")
    script = textwrap.dedent(f"""
        import json, sys
        from edgetailor.device import DeviceRuntime
        from edgetailor.toolkit.loaders import load_samples
        with DeviceRuntime.open({str(OLD_BUNDLE)!r}, {str(tmp_path / 's')!r}, "ort-training") as rt:
            rt.add_dataset(load_samples({str(tmp_path / 'train.npz')!r}, rt.labels))
            report = rt.personalize()
            result = rt.evaluate_dataset(load_samples({str(tmp_path / 'test.npz')!r}, rt.labels))
        print(json.dumps({{"trainer": report["backend"], "accuracy": result["accuracy"],
                          "ge": result["ge_only_accuracy"], "torch": "torch" in sys.modules}}))
    """)
    proc = subprocess.run([str(ORT_TRAINING_PYTHON), "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trainer"] == "ort-training" and not result["torch"]
    assert result["accuracy"] > result["ge"]
    # The weights it stored run on the maintained backends too.
    with DeviceRuntime.open(OLD_BUNDLE, tmp_path / "s") as rt:
        assert rt.personalization_problem is not None  # no step programs here: GE answers, and says why
        assert np.isfinite(rt.evaluate_dataset(user.test)["accuracy"])
