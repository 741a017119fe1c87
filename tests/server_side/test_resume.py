"""Resumable training: a pretraining killed with SIGKILL continues with
--resume to the very model an uninterrupted run makes, and a resume that
does not match the run it continues is refused before any training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

EPOCHS = "12"


def _pretrain(out, *extra, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "edgetailor", "server", "pretrain", "--out", str(out), "--epochs", EPOCHS,
           "--checkpoint-every", "20", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_kill_9_then_resume_gives_the_uninterrupted_model(tmp_path):
    whole = _pretrain(tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    killed = _pretrain(tmp_path / "killed", wait=False)
    state = tmp_path / "killed.training" / "fit-00.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert state.exists() and not (tmp_path / "killed").exists()
    again = _pretrain(tmp_path / "killed")
    assert again.returncode == 2 and "--resume" in again.stderr          # state there, no --resume: refused
    resumed = _pretrain(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch" in resumed.stdout
    # every random draw is keyed by its batch: bit for bit the same weights
    assert (tmp_path / "killed" / "model.pt").read_bytes() == (tmp_path / "whole" / "model.pt").read_bytes()
    assert not (tmp_path / "killed.training").exists()


def _state(tmp_path, data=None):
    """A run killed after its first checkpoint, with its training state left."""
    extra = ["--data", str(data)] if data else []
    run = _pretrain(tmp_path / "ge", *extra, wait=False)
    state = tmp_path / "ge.training" / "fit-00.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert state.exists()


def test_a_resume_of_another_recipe_or_data_is_refused_before_training(tmp_path, generic_split, monkeypatch):
    monkeypatch.setenv("EDGETAILOR_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "generic.npz"
    np.savez(data, x=generic_split.train.images, y=generic_split.train.labels)
    _state(tmp_path, data)
    other = _pretrain(tmp_path / "ge", "--data", str(data), "--resume", "--seed", "3")
    assert other.returncode == 2 and "another run" in other.stderr and "pretrain.seed: 0 -> 3" in other.stderr
    np.savez(data, x=generic_split.train.images[::-1], y=generic_split.train.labels[::-1])
    changed = _pretrain(tmp_path / "ge", "--data", str(data), "--resume")
    assert changed.returncode == 2 and "data:" in changed.stderr


def test_nothing_to_resume(tmp_path):
    run = _pretrain(tmp_path / "ge", "--resume")
    assert run.returncode == 2 and "nothing to resume" in run.stderr


@pytest.mark.parametrize("value", ["0", "soon", "-5", "0s", "-5m"])
def test_a_bad_checkpoint_interval_is_refused(tmp_path, value):
    run = _pretrain(tmp_path / "ge", "--checkpoint-every", value)
    assert run.returncode == 2 and "--checkpoint-every" in run.stderr


def test_a_state_from_another_toolkit_or_a_damaged_one_is_refused(tmp_path):
    """The run's identity is checked field by field; the error names what changed."""
    from edgetailor.server_side.resume import TrainingCheckpoints
    from edgetailor.toolkit.errors import CheckpointError

    identity = {"command": "pretrain", "recipe": {"pretrain": {"epochs": 3}}, "data": "ab12",
                "toolkit_version": "0.1.0", "processes": 1}
    TrainingCheckpoints(tmp_path / "ge.training").begin(identity, is_main=True)
    with pytest.raises(CheckpointError, match="holds the training state of an unfinished run"):
        TrainingCheckpoints(tmp_path / "ge.training").begin(identity, is_main=True)
    TrainingCheckpoints(tmp_path / "ge.training", resume=True).begin(identity, is_main=True)     # the same run
    for change, named in (({"toolkit_version": "0.2.0"}, "toolkit_version: '0.1.0' -> '0.2.0'"),
                          ({"processes": 2}, "processes: 1 -> 2"),
                          ({"recipe": {"pretrain": {"epochs": 4}}}, "recipe.pretrain.epochs: 3 -> 4")):
        with pytest.raises(CheckpointError, match="from another run") as error:
            TrainingCheckpoints(tmp_path / "ge.training", resume=True).begin({**identity, **change}, is_main=True)
        assert named in error.value.message
    (tmp_path / "ge.training" / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="run.json is damaged"):
        TrainingCheckpoints(tmp_path / "ge.training", resume=True).begin(identity, is_main=True)
