"""Fixtures shared by all test packages: a small real GE trained on the
built-in digits, a real bundle exported from it, and a simulated user. Built
once per session (a few seconds on two cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def generic_split():
    from edgetailor.toolkit.data import load_generic_digits, split_generic

    return split_generic(load_generic_digits(), seed=0)


@pytest.fixture(scope="session")
def ge_dir(tmp_path_factory):
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.server_side.pretrain import pretrain

    recipe = load_recipe("default")  # ~20 s on two cores: the real GE, not a toy
    out = tmp_path_factory.mktemp("ge") / "ge"
    pretrain(out, recipe)
    return out


@pytest.fixture(scope="session")
def bundle_dir(ge_dir, tmp_path_factory):
    """Every format, the torch reference's included, and ExecuTorch's training-extension programs (~40 s):
    the backends' parity tests run on it. (ort-training's artifacts need onnxruntime-training, which cannot
    share this venv with onnxruntime.)"""
    from edgetailor.export.bundle import export_bundle
    from edgetailor.toolkit.formats import FORMATS

    return export_bundle(ge_dir, tmp_path_factory.mktemp("bundle") / "bundle", formats=list(FORMATS),
                         extra_training=["executorch-training"])


@pytest.fixture(scope="session")
def user(generic_split):
    from edgetailor.toolkit.users import simulate_user

    # User 2 writes in a style GE reads poorly (about 0.8 with the default GE), so
    # personalization has something to fix. User 1 no longer does since GE
    # learns slant and pen width (0.945); users GE already reads are covered
    # by tests/device/test_mixture.py.
    return simulate_user(generic_split.user_pool, user_id=2, seed=0, train_per_class=10, test_per_class=15)


def run_cli(*args: str, env: dict | None = None, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter, as a user or a device would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "edgetailor.app.cli", *args], capture_output=True, text=True,
                          env=full_env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgetailor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
