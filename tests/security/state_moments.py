"""Real device processes killed at chosen moments, and run side by side on
one state: what ``test_state_recovery.py`` checks a few of and
``benchmarks/security.py`` measures at scale."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.loaders import save_npz

ROOT = Path(__file__).resolve().parents[2]


def device_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgetailor.app.cli", "device", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def new_samples(data: LabeledImages, moment: int, n: int = 20) -> LabeledImages:
    """``n`` samples no state has seen yet: the user's, shifted by a pixel and marked by ``moment``."""
    rng = np.random.default_rng(moment)
    picks = rng.choice(len(data), size=n, replace=False)
    images = np.roll(data.images[picks], shift=1 + moment % 3, axis=1 + moment % 2).copy()
    images[:, 0, 0] = moment % 256
    images[:, 0, 1] = moment // 256
    return LabeledImages(images, data.labels[picks], data.label_names, "moment", data.prepared_with)


def _snapshot(bundle: Path, state: Path) -> dict:
    from edgetailor.device import DeviceRuntime

    with DeviceRuntime.open(bundle, state, "ort") as rt:
        return {"samples": rt.sample_count(), "personalization": rt.personalization_id,
                "personalized": rt.personalized, "problem": rt.personalization_problem}


def kill_at(bundle_dir: Path, state: Path, data: LabeledImages, work: Path, delays: list[float],
            first_moment: int = 0, epochs: int = 40) -> list[dict]:
    """For each delay: a device process adds 20 new samples and personalizes, and is killed (SIGKILL) that long
    after it starts; then the state must hold every sample it held before (plus, all or none, the new ones) and
    a personalization that is intact: the previous one, or the new one if it had committed."""
    zipped = bundle_dir.with_name(bundle_dir.name + ".zip")
    outcomes = []
    for moment, delay in enumerate(delays, start=first_moment):
        if moment % 2 == 0:    # a fresh unpack of the .zip, so some kills land in the middle of it
            import shutil

            shutil.rmtree(state / "bundles", ignore_errors=True)
        before = _snapshot(bundle_dir, state)
        path = work / f"moment{moment}.npz"
        save_npz(new_samples(data, moment + 1), path)
        proc = device_process("personalize", "--bundle", str(zipped), "--state", str(state), "--samples", str(path),
                              "--backend", "ort", "--epochs", str(epochs))
        started = time.perf_counter()
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        process_seconds = time.perf_counter() - started
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        after = _snapshot(bundle_dir, state)
        stage = "finished" if finished else _stage(stderr)
        grown = after["samples"] - before["samples"]
        outcomes.append({
            "delay_s": delay, "stage": stage, "process_seconds": process_seconds,
            "samples_before": before["samples"], "samples_after": after["samples"],
            "samples_lost": max(0, -grown), "partial_add": grown not in (0, 20),
            "personalization_before": before["personalization"], "personalization_after": after["personalization"],
            "personalization_ok": (after["personalized"] and after["problem"] is None
                                   and (after["personalization"] == before["personalization"] or grown == 20)),
        })
    return outcomes


def _stage(stderr: str) -> str:
    """How far the killed process got, from its progress bars."""
    for marker, stage in (("gating", "training GN"), ("local expert", "training LE"), ("features", "GE features")):
        if marker in stderr:
            return stage
    return "starting / unpacking / storing"


def concurrent_personalizes(bundle_dir: Path, work: Path, data: LabeledImages, processes: int = 4,
                            epochs: int = 5) -> dict:
    """``processes`` device processes, each adding its own share of the samples and personalizing, all at once
    on one state. Returns their errors and whether the personalization in use was trained on every sample."""
    from edgetailor.device import DeviceRuntime

    state = work / "shared-state"
    order = np.random.default_rng(0).permutation(len(data))
    paths = []
    for i, share in enumerate(np.array_split(order, processes)):
        path = work / f"share{i}.npz"
        save_npz(data.subset(share), path)
        paths.append(path)
    with DeviceRuntime.open(bundle_dir, state, "ort"):
        pass      # the state exists (and the bundle is accepted) before the race starts
    started = time.perf_counter()
    procs = [device_process("personalize", "--bundle", str(bundle_dir), "--state", str(state), "--samples",
                            str(path), "--backend", "ort", "--epochs", str(epochs), "--json") for path in paths]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]
    seconds = time.perf_counter() - started
    errors = [err[-800:] for rc, _, err in results if rc != 0]
    import json

    reports = [json.loads(out.strip().splitlines()[-1]) for rc, out, _ in results if rc == 0 and out.strip()]
    with DeviceRuntime.open(bundle_dir, state, "ort") as rt:
        saved = rt.store.active_personalization()
        count, generation = rt.sample_count(), rt.store.samples_generation()
    won = saved is not None and saved.samples_generation == generation and saved.n_samples == count == len(data)
    return {"processes": processes, "errors": errors, "seconds": round(seconds, 1), "samples": count,
            "active_trained_on": saved.n_samples if saved else None, "newest_samples_won": won,
            "retrained": sum(r.get("attempts", 1) - 1 for r in reports),
            "superseded": sum(bool(r.get("superseded")) for r in reports)}
