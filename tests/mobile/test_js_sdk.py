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


def test_node_suite(sdk, fixtures):
    """Every node:test file in mobile/js/test: numpy's streams, preprocessing golden vectors, verification,
    trust, storage failures, and personalization compared with the Python runtime."""
    proc = npm("test", env=fixtures)
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
