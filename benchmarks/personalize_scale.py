"""Benchmark of personalization cost as the user's sample set grows.

    python benchmarks/personalize_scale.py [--sizes 100,1000,10000,20000] [--backend ort]
                                           [--model GE_DIR] [--out benchmarks/results/scale]

One simulated user's style rendered at each size (base glyphs drawn with
replacement), personalized by `edgetailor device personalize --json` in a
fresh interpreter, as a device runs it: wall time from start to the stored
personalization, peak RSS, LE's and GN's steps against their schedule
(fully trained = every planned step ran, none cut by the time budget), and
accuracy on the user's test set (`device evaluate`). Pretrains the default
GE unless --model is given; the bundle carries ONNX only.

Prints a table and the targets at the largest size; writes OUT/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cli(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgetailor.app.cli", *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"edgetailor {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000,20000")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale")
    args = parser.parse_args()

    from edgetailor.export.bundle import export_bundle
    from common import default_ge  # benchmarks/common.py, beside this script
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.config import PersonalizeConfig
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.loaders import save_npz
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.users import render_in_style, simulate_user
    from edgetailor.device.mixture import augmented_copies, le_epochs_for

    sizes = [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    model = default_ge(args.out, args.model)
    bundle = export_bundle(model, args.out / "bundle", formats=["onnx"], make_zip=False, overwrite=True)
    split = split_generic(load_generic_digits(), seed=args.seed)
    person = simulate_user(split.user_pool, user_id=0, seed=args.seed, train_per_class=10, test_per_class=20)
    save_npz(person.test, args.out / "test.npz")
    cfg = PersonalizeConfig()

    rows = []
    for size in sizes:
        samples = args.out / f"train-{size}.npz"
        data = person.train if size == 10 * len(person.train.label_names) else \
            render_in_style(split.user_pool, person.style, size // len(person.train.label_names), seed=size)
        save_npz(data, samples)
        print(f"{len(data.labels)} samples: personalizing ...", flush=True)
        with tempfile.TemporaryDirectory() as state:
            report, wall = cli("device", "personalize", "--bundle", str(bundle), "--state", state, "--samples",
                               str(samples), "--backend", args.backend)
            evaluation, _ = cli("device", "evaluate", "--bundle", str(bundle), "--state", state, "--samples",
                                str(args.out / "test.npz"), "--backend", args.backend)
        inputs = len(data.labels) * (augmented_copies(cfg, len(data.labels)) + 1)
        planned = le_epochs_for(cfg, inputs) * math.ceil(inputs / min(cfg.batch_size, inputs))
        rows.append({"samples": len(data.labels), "training inputs": report["n_training_inputs"],
                     "wall s": wall, "personalize s": report["seconds"], "train s": report["train_seconds"],
                     "peak RSS MB": report["peak_rss_mb"], "LE steps": report["le_steps"], "LE planned": planned,
                     "GN steps": report["gn_steps"], "GN planned": cfg.gn_steps,
                     "fully trained": "yes" if report["le_steps"] == planned and report["gn_steps"] == cfg.gn_steps
                     and not report["stopped_early"] else "NO",
                     "user acc": evaluation["accuracy"], "GE acc": evaluation["ge_only_accuracy"]})
    print()
    print(format_table(rows, [("samples", "samples", ",d"), ("training inputs", "inputs", ",d"),
                              ("wall s", "process s", ".2f"), ("personalize s", "personalize s", ".2f"),
                              ("train s", "train s", ".2f"), ("peak RSS MB", "peak RSS MB", ".0f"),
                              ("LE steps", "LE steps", ",d"), ("LE planned", "of", ",d"), ("GN steps", "GN steps", "d"),
                              ("GN planned", "of", "d"), ("fully trained", "fully trained", ""),
                              ("user acc", "user acc", ".4f"), ("GE acc", "GE acc", ".4f")]))
    largest = rows[-1]
    targets = [
        (f"{largest['samples']:,} samples: start to stored personalization, s", "<= 10", largest["wall s"],
         largest["wall s"] <= 10),
        (f"{largest['samples']:,} samples: peak RSS, MB", "<= 250", largest["peak RSS MB"],
         largest["peak RSS MB"] <= 250),
        (f"{largest['samples']:,} samples: LE and GN fully trained", "yes", float(largest["fully trained"] == "yes"),
         largest["fully trained"] == "yes"),
    ]
    target_rows = [{"target": t, "goal": g, "measured": float(m), "met": "yes" if ok else "NO"}
                   for t, g, m, ok in targets]
    print()
    print(format_table(target_rows, [("target", "target", "<"), ("goal", "goal", "<"), ("measured", "measured", ".4g"),
                                     ("met", "met", "")]))
    result = {"benchmark": "personalize_scale", "cpu_count": os.cpu_count(), "backend": args.backend, "rows": rows,
              "targets": target_rows}
    atomic.write_text(args.out / "scale.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
