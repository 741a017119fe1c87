"""What the firmware and the Python device runtime answer on the same bundle and samples.

The tests (tests/firmware/) and the benchmark (benchmarks/firmware.py) use it:
- ``python_reference``: the Python device runtime (``ort`` backend) personalizes on the train samples and
  answers the test samples, with GE's own logits;
- ``run_example``: the C example (host build or ``make qemu``) on the same samples, its JSON line and its
  ``--dump`` of each test sample's GE logits, gate and answer;
- ``compare``: the figures the issue's targets name.

Not shipped with the package: a development tool, like mobile/js/scripts/python_reference.py.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_samples(path: Path, bundle: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A sample file of raw images, prepared by the bundle's preprocessing as `export firmware-samples` and the
    Python runtime's ``add_samples`` prepare them (real handwriting changes; already prepared glyphs do not)."""
    from edgetailor.export.firmware_samples import firmware_samples_bytes
    from edgetailor.toolkit.bundle import Bundle
    from edgetailor.toolkit.preprocess import prepare_images

    with Bundle.open(bundle) as opened:
        manifest = opened.manifest
    prepared = prepare_images(images, manifest.input.preprocessing()).images
    path.write_bytes(firmware_samples_bytes(prepared, labels.astype(np.int64), list(manifest.labels)))
    return path


def python_reference(bundle: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                     overrides: dict[str, Any] | None = None, trusted_keys: Path | None = None) -> dict:
    from edgetailor.device import DeviceRuntime
    from edgetailor.device.backends import get_backend

    with tempfile.TemporaryDirectory() as state:
        runtime = DeviceRuntime.open(bundle, state, backend="ort", trusted_keys=trusted_keys)
        with runtime:
            prepared = runtime.prepare(test_x)   # what predict() reads, and the firmware's sample file holds
            ge_logits, _ = get_backend("ort").load_global_expert(runtime.bundle).run(
                runtime.bundle.manifest.input.normalize(prepared))
            before = runtime.predict(test_x)
            runtime.add_samples(train_x, train_y.astype(np.int64))
            started = time.perf_counter()
            report = runtime.personalize(overrides or {})
            seconds = time.perf_counter() - started
            after = runtime.predict(test_x)
    return {"ge_logits": np.asarray(ge_logits, np.float32), "before": before.indices, "after": after.indices,
            "used_le": np.array([e == "LE" for e in after.experts]), "gate": np.asarray(after.gate, np.float32),
            "threshold": float(report["gate_threshold"]), "le_steps": int(report["le_steps"]),
            "seconds": seconds, "train_seconds": float(report["train_seconds"])}


def read_dump(path: Path, n_classes: int) -> dict[str, np.ndarray]:
    """The example's ``--dump``: per test sample, float32 GE logits, float32 gate, u8 answer, u8 used LE, 2 pad."""
    record = n_classes * 4 + 8
    raw = np.fromfile(path, np.uint8)
    if raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records")
    rows = raw.reshape(-1, record)
    return {"ge_logits": rows[:, :n_classes * 4].copy().view(np.float32),
            "gate": rows[:, n_classes * 4:n_classes * 4 + 4].copy().view(np.float32)[:, 0],
            "after": rows[:, n_classes * 4 + 4].astype(np.int64),
            "used_le": rows[:, n_classes * 4 + 5].astype(bool)}


def run_example(project: Path, train: Path, test: Path, workdir: Path, *, qemu: bool = False,
                options: list[str] | None = None, timeout: float = 1200, flash_kb: int | None = None) -> dict:
    """The host program or the Cortex-M4 image under QEMU; returns its JSON line plus ``dump`` and ``wall_seconds``.

    ``flash_kb``: the flash `make qemu` links against (an fp32 LeNet-5 needs more than the default 256 KB)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dump = workdir / ("dump-qemu.bin" if qemu else "dump-host.bin")
    args = ["--quiet", "--dump", str(dump), "--state", str(workdir / "state"),
            "--scratch", str(workdir / "scratch.bin"), *(options or [])]
    if qemu:
        cmd = ["make", "-s", "--no-print-directory", "-C", str(project), "qemu", f"TRAIN={train}", f"TEST={test}",
               "ARGS=" + " ".join(args), *([f"FLASH_KB={flash_kb}"] if flash_kb else [])]
    else:
        cmd = [str(project / "example-host"), str(train), str(test), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["dump"] = read_dump(dump, len(json.loads((project / "model" / "model.json").read_text())["labels"]))
    result["wall_seconds"] = wall
    return result


def compare(python: dict, c: dict, truth: np.ndarray) -> dict:
    """The issue's figures for one user: GE logits, answers before and after, experts, gate, accuracy."""
    dump = c["dump"]
    py_after = (python["after"] == truth).mean()
    return {
        "logits_max_abs_diff": float(np.abs(python["ge_logits"] - dump["ge_logits"]).max()),
        "ge_top1_agreement": float((python["ge_logits"].argmax(1) == dump["ge_logits"].argmax(1)).mean()),
        "agreement": float((python["after"] == dump["after"]).mean()),
        "experts_agreement": float((python["used_le"] == dump["used_le"]).mean()),
        "py_before": float((python["before"] == truth).mean()), "c_before": float(c["accuracy_before"]),
        "py_after": float(py_after), "c_after": float(c["accuracy_after"]),
        "accuracy_gap": abs(float(py_after) - float(c["accuracy_after"])),
        "threshold_gap": abs(python["threshold"] - float(c["threshold"])),
    }
