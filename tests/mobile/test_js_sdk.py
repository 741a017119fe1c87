"""The TypeScript SDK (mobile/js), run from the suite: its Node tests on a
bundle this suite exports and signs, compared with the Python device runtime
on the same samples and seed, and its browser test in Chromium.

The SDK's own tests are node:test files; this module makes their fixtures
(a signed bundle, an older release of it, a foreign key, user samples, the
Python runtime's answers) and passes them by environment variables. Node
and Chromium are optional on a user's machine: without them these tests
skip and say what to install. CI installs both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "mobile" / "js"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def node_missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return ("Node.js is not installed: install Node.js >= 18 with npm (Debian: apt-get install nodejs npm) "
                "to test the TypeScript SDK")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        return f"Node.js {version} is too old for the TypeScript SDK: install Node.js >= 18"
    return None


def npm(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["npm", *args], cwd=SDK, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"npm {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def sdk():
    """The SDK installed (``npm ci``, scripts off: see mobile/js/.npmrc) and built."""
    why = node_missing()
    if why:
        pytest.skip(why)
    if not (SDK / "node_modules" / "onnxruntime-node").exists():
        npm("ci", "--ignore-scripts", "--no-audit", "--no-fund")
    npm("run", "build")
    return SDK


@pytest.fixture(scope="module")
def fixtures(bundle_dir, user, tmp_path_factory):
    """A signed bundle (and an older release of it, and a foreign key), the user's samples, and what Python answers."""
    from edgetailor.toolkit.bundle import sign_bundle
    from edgetailor.toolkit.signing import generate_key

    out = tmp_path_factory.mktemp("js")
    generate_key(out / "key")
    generate_key(out / "other")
    paths = {}
    for name, version in (("old", 1), ("bundle", 2)):
        copy = out / name
        shutil.copytree(bundle_dir, copy)
        (copy.parent / f"{name}.zip").unlink(missing_ok=True)
        sign_bundle(copy, out / "key", name="digits", version=version, expires="2099-01-01T00:00:00+00:00",
                    make_zip=True)
        paths[name] = copy.with_suffix(".zip")
    samples = out / "samples.npz"
    np.savez(samples, train_x=user.train.images, train_y=user.train.labels.astype(np.int64),
             test_x=user.test.images, test_y=user.test.labels.astype(np.int64))
    python_json = out / "python.json"
    subprocess.run([sys.executable, str(SDK / "scripts" / "python_reference.py"), "--bundle", str(paths["bundle"]),
                    "--key", str(out / "key" / "signing.pub"), "--samples", str(samples), "--out", str(python_json)],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {"EDGETAILOR_TEST_BUNDLE": str(paths["bundle"]), "EDGETAILOR_TEST_OLD_BUNDLE": str(paths["old"]),
            "EDGETAILOR_TEST_KEY": str(out / "key" / "signing.pub"),
            "EDGETAILOR_TEST_OTHER_KEY": str(out / "other" / "signing.pub"),
            "EDGETAILOR_TEST_SAMPLES": str(samples), "EDGETAILOR_TEST_PYTHON": str(python_json)}


def tone_clips(n_per_class: int, rng: np.random.Generator, stretch: float = 1.0, rate: int = 8000,
               length: int = 4000):
    """Half-second clips of three rising tones (0.4, 0.9 and 1.8 kHz, each sweeping up by a fifth), with
    random phase, loudness and noise; ``stretch`` scales every pitch: a speaker the GE never heard."""
    from edgetailor.toolkit.data import LabeledImages

    t = np.arange(length) / rate
    clips, labels = [], []
    for label, base in enumerate((400.0, 900.0, 1800.0)):
        for _ in range(n_per_class):
            f0 = base * stretch * rng.uniform(0.95, 1.05)
            phase = 2 * np.pi * (f0 * t + f0 * 0.5 * t ** 2) + rng.uniform(0, 2 * np.pi)
            clip = rng.uniform(0.1, 0.5) * np.sin(phase) + rng.normal(0, 0.02, length)
            clips.append(np.clip(clip, -1, 1).astype(np.float32))
            labels.append(label)
    return LabeledImages(np.stack(clips)[:, None, :], np.array(labels), ["low", "mid", "high"], source="tones")


class ToneNet(nn.Module):
    """A small CNN on edgetailor's log-mel front-end: clips (N, 1, 4000) at 8 kHz -> 3 tones."""

    def __init__(self):
        from edgetailor.server_side.frontends import LogMel

        super().__init__()
        self.frontend = LogMel(sample_rate=8000, window=256, hop=128, n_mels=20)   # 20 mels x 30 frames
        self.body = nn.Sequential(
            nn.BatchNorm2d(1), nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AvgPool2d((5, 2)), nn.Flatten(), nn.Linear(64 * 4, 3))

    def forward(self, x):
        return self.body(self.frontend(x))


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    """Bundles of the two other modalities, signed, each with a user's samples, the Python runtime's answers
    and Python's augmentation of a few samples (~40 s): sensor windows (a 1-D CNN on simulated wrist
    gestures) and audio clips (a CNN with the log-mel front-end, on tones)."""
    from edgetailor.export import bundle_from_model
    from edgetailor.toolkit.config import ExpertConfig
    from edgetailor.toolkit.data import split_generic
    from edgetailor.toolkit.gestures import generic_gestures, simulate_gesture_user
    from edgetailor.toolkit.input_spec import InputSpec
    from edgetailor.toolkit.modalities import augment_params, get_modality
    from edgetailor.toolkit.signing import generate_key
    from examples.byom.architectures import GestureCNN, train_classifier

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("signals")
    generate_key(out / "key")
    rng = np.random.default_rng(0)
    split = split_generic(generic_gestures(people=30), seed=0)
    gesture_spec = InputSpec.for_timeseries(3, 64, float(split.train.images.mean()), float(split.train.images.std()))
    gesture_user = simulate_gesture_user(3, seed=0, train_per_class=6, test_per_class=8)
    tones = tone_clips(60, rng)
    tone_user = (tone_clips(10, rng, stretch=1.3), tone_clips(10, rng, stretch=1.3))
    cases = {
        "timeseries": (lambda: train_classifier(GestureCNN(),
                                                torch.from_numpy(gesture_spec.normalize(split.train.images)),
                                                torch.from_numpy(split.train.labels), epochs=8),
                       split.train, gesture_spec, (gesture_user.train, gesture_user.test)),
        "audio": (lambda: train_classifier(ToneNet(), torch.from_numpy(tones.images), torch.from_numpy(tones.labels),
                                           epochs=8, shift_dims=(2,)),
                  tones, InputSpec.for_audio(8000, 0.5), tone_user),
    }
    paths = {}
    for name, (train, generic, spec, (user_train, user_test)) in cases.items():
        model = train()
        bundle = bundle_from_model(model, torch.from_numpy(spec.normalize(generic.images[:4])), generic.label_names,
                                   generic.subset(np.arange(0, len(generic), 2)), out / name, input_spec=spec,
                                   formats=["onnx"], experts=ExpertConfig(le_gn_budget=0.05),
                                   signing_key=out / "key" / "signing.key", name=name, version=1)
        samples = out / f"{name}-samples.npz"
        np.savez(samples, train_x=user_train.images, train_y=user_train.labels.astype(np.int64),
                 test_x=user_test.images, test_y=user_test.labels.astype(np.int64))
        python_json = out / f"{name}-python.json"
        subprocess.run([sys.executable, str(SDK / "scripts" / "python_reference.py"), "--bundle",
                        str(bundle.with_suffix(".zip")), "--key", str(out / "key" / "signing.pub"), "--samples",
                        str(samples), "--out", str(python_json)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        few = user_train.images[:3]
        augmented = get_modality(spec.modality).augment(few, 2, np.random.default_rng(11), augment_params(spec))
        np.savez(out / f"{name}-augment.npz", x=few, expected=augmented, copies=np.int64(2), seed=np.int64(11))
        paths[name] = {"bundle": str(bundle.with_suffix(".zip")), "samples": str(samples), "python": str(python_json),
                       "augment": str(out / f"{name}-augment.npz")}
    index = out / "signals.json"
    index.write_text(json.dumps({"key": str(out / "key" / "signing.pub"), "cases": paths}))
    return {"EDGETAILOR_TEST_SIGNALS": str(index)}


def test_node_suite(sdk, fixtures, signals):
    """Every node:test file in mobile/js/test: numpy's streams, preprocessing golden vectors, verification,
    trust, storage failures, and personalization compared with the Python runtime, on glyphs, sensor
    windows and audio clips."""
    proc = npm("test", env={**fixtures, **signals})
    assert re.search(r"\bfail 0\b", proc.stdout) and re.search(r"\bskipped 0\b", proc.stdout), proc.stdout[-4000:]
    python = json.loads(Path(fixtures["EDGETAILOR_TEST_PYTHON"]).read_text())
    assert python["accuracy_after"] > python["accuracy_before"]


def test_browser_demo(sdk, fixtures):
    """The web demo in Chromium (playwright-core drives Debian's chromium): draw, label, personalize, predict."""
    if not any(Path(p).exists() for p in CHROMIUM) and not os.environ.get("CHROMIUM_PATH"):
        pytest.skip("Chromium is not installed: apt-get install chromium (Debian) to run the SDK's browser test")
    proc = npm("run", "test:browser", env=fixtures)
    assert re.search(r"\bfail 0\b", proc.stdout) and re.search(r"\bskipped 0\b", proc.stdout), proc.stdout[-4000:]
    result = json.loads((SDK / "test-output" / "browser.json").read_text())
    assert result["accuracy_after"] >= result["accuracy_before"] - 0.02
    assert result["le_answers"] > 0
