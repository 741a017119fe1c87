"""A device process killed during personalize keeps the previous
personalization in use and loses no stored sample."""

import signal
import subprocess
import sys
import time

import numpy as np

from edgetailor.device import DeviceRuntime
from tests.conftest import ROOT
from edgetailor.toolkit.loaders import save_npz


def test_kill_during_personalize(bundle_dir, user, tmp_path):
    state = tmp_path / "state"
    first = user.train.subset(np.flatnonzero(user.train.labels < 5))
    with DeviceRuntime.open(bundle_dir, state) as rt:
        rt.add_dataset(first)
        rt.personalize({"le_epochs": 20, "gn_steps": 20})
        before_id, before_pred = rt.personalization_id, rt.predict(user.test.images).indices
    save_npz(user.train, tmp_path / "all.npz")
    # A long personalization in a real device process, killed mid-training.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetailor.app.cli", "device", "personalize", "--bundle", str(bundle_dir),
         "--state", str(state), "--samples", str(tmp_path / "all.npz"), "--epochs", "100000", "--max-seconds", "600"],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        seen = ""
        while "local expert" not in seen and time.time() < deadline:  # wait until training is under way
            chunk = proc.stderr.readline()
            if not chunk:
                break
            seen += chunk
        assert "local expert" in seen, seen
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with DeviceRuntime.open(bundle_dir, state) as rt:
        assert rt.sample_count() == len(user.train)  # the new samples were committed before training
        assert rt.personalization_id == before_id
        assert np.array_equal(rt.predict(user.test.images).indices, before_pred)
