"""What the Python device runtime answers, for the SDK's parity test and benchmark.

Given a bundle, its publisher key and an .npz of samples (``train_x``,
``train_y``, ``test_x``, ``test_y``: uint8 images, or float32 windows or clips
as the bundle reads them, and integer labels), it personalizes with the
``ort`` backend on the train samples and writes, as JSON, the predictions on
the test samples before and after, the bundle id, the gate threshold and the
times. The SDK must agree with it.

    .venv/bin/python mobile/js/scripts/python_reference.py --bundle B.zip --key signing.pub \\
        --samples samples.npz --out python.json [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetailor.device import DeviceRuntime


def reference(bundle: Path, key: Path, samples: Path, seed: int = 0, repeats: int = 1) -> dict:
    data = np.load(samples)
    with tempfile.TemporaryDirectory() as state:
        started = time.perf_counter()
        runtime = DeviceRuntime.open(bundle, state, backend="ort", trusted_keys=key)
        open_seconds = time.perf_counter() - started
        with runtime:
            before = runtime.predict(data["test_x"])
            runtime.add_samples(data["train_x"], data["train_y"].astype(np.int64))
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                report = runtime.personalize({"seed": seed})
                times.append(time.perf_counter() - started)
            after = runtime.predict(data["test_x"])
            truth = data["test_y"].astype(np.int64)
            return {
                "bundle_id": runtime.bundle.bundle_id,
                "open_seconds": open_seconds,
                "personalize_seconds": times,
                "train_seconds": report["train_seconds"],
                "threshold": report["gate_threshold"],
                "le_steps": report["le_steps"],
                "before": {"indices": before.indices.tolist(), "experts": before.experts},
                "after": {"indices": after.indices.tolist(), "experts": after.experts,
                          "gate": after.gate.astype(float).tolist()},
                "accuracy_before": float((before.indices == truth).mean()),
                "accuracy_after": float((after.indices == truth).mean()),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    args.out.write_text(json.dumps(reference(args.bundle, args.key, args.samples, args.seed, args.repeats), indent=1))


if __name__ == "__main__":
    main()
