"""Benchmark of the end-to-end customization loop against its targets.

Runs the demo (pretrain -> bundle -> personalize 5 simulated users on 10
samples per class, each in a separate torch-free device process) and checks
the issue's targets, averaged over users:

    python benchmarks/e2e_loop.py [--users 5] [--out benchmarks/results/e2e]

Prints the demo's table and a target table; writes the target table to
OUT/targets.json next to the demo's report.json and report.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetailor.toolkit import atomic  # noqa: E402
from edgetailor.app.demo import run_demo  # noqa: E402
from edgetailor.toolkit.tables import format_table  # noqa: E402


def targets(report: dict) -> list[dict]:
    mean, users, overhead = report["mean"], report["users"], report["overhead"]
    gap_to_full_ft = mean["FT all user"] - mean["GE+LE+GN user"]
    generic_drop = mean["GE generic"] - mean["GE+LE+GN generic"]
    rows = [
        ("user accuracy GE+LE+GN", ">= 0.930", mean["GE+LE+GN user"], mean["GE+LE+GN user"] >= 0.93),
        ("points below fine-tuning all of GE", "<= 1.0", 100 * gap_to_full_ft, gap_to_full_ft <= 0.01),
        ("generic: points below GE alone", "<= 0.5", 100 * generic_drop, generic_drop <= 0.005),
        ("generic: points lost by FT all (measured)", "-", 100 * (mean["GE generic"] - mean["FT all generic"]), None),
        ("generic: points lost by FT last (measured)", "-", 100 * (mean["GE generic"] - mean["FT last generic"]), None),
        ("LE+GN params, % of GE", "<= 2.5", overhead["params_pct"], overhead["params_pct"] <= 2.5),
        ("LE+GN MACs, % of GE", "<= 2.5", overhead["macs_pct"], overhead["macs_pct"] <= 2.5),
        ("personalize 100 samples, s (worst user)", "<= 2.0", max(u["personalize s"] for u in users),
         max(u["personalize s"] for u in users) <= 2.0),
        ("whole device process, s (worst user)", "-", max(u["device process s"] for u in users), None),
        ("device peak RSS, MB (worst user)", "<= 150", max(u["peak RSS MB"] for u in users),
         max(u["peak RSS MB"] for u in users) <= 150),
        ("torch imported on the device", "no", float(any(u["torch imported"] for u in users)),
         not any(u["torch imported"] for u in users)),
    ]
    return [{"target": t, "goal": g, "measured": round(float(m), 4),
             "met": "-" if ok is None else ("yes" if ok else "NO")} for t, g, m, ok in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e")
    args = parser.parse_args()
    report = run_demo(args.out, recipe="default", n_users=args.users, seed=args.seed)
    rows = targets(report)
    print()
    print(format_table(rows, [("target", "target", ""), ("goal", "goal", ""), ("measured", "measured", ".3f"),
                              ("met", "met", "")]))
    result = {"benchmark": "e2e_loop", "cpu_count": os.cpu_count(), "users": args.users, "seed": args.seed,
              "targets": rows, "mean": report["mean"], "overhead": report["overhead"]}
    atomic.write_text(args.out / "targets.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'targets.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
