"""Benchmark of server-side compression against the issue's targets.

Pretrains the default GE (LeNet-5, 62 k parameters) and a wide one (the
`wide` recipe, 3.7 M parameters), runs `server compress` with the shipped
recipes (plus per-tensor 4-bit variants for the FlexRound comparison), each
with device personalization on simulated users, and checks the targets.
Latency is batch 1 on one thread in each runtime; 2 CPU cores in all.

    python benchmarks/compression.py [--users 5] [--skip-wide] [--out benchmarks/results/compression]

Prints one table of every variant and a target table; writes OUT/report.json
(every run's report), OUT/targets.json and OUT/report.png; each run's own
report lies in OUT/<ge>/<recipe>/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetailor.toolkit import atomic  # noqa: E402
from edgetailor.toolkit.tables import format_table  # noqa: E402

DEFAULT_RECIPES = ["int8", "qat-int8", "prune50", "prune50-int8", "ticket90", "sparse-2of4",
                   "w4-nearest", "w4-flexround", "w4-tensor-nearest", "w4-tensor-flexround"]
WIDE_RECIPES = ["int8", "qat-int8", "prune50"]


def recipe_for(name: str):
    """Shipped recipes by name; the per-tensor 4-bit pair is the shipped pair with one key changed."""
    from edgetailor.server_side.compress.recipe import load_compress_recipe, recipe_from_dict

    if name.startswith("w4-tensor-"):
        rounding = name.removeprefix("w4-tensor-")
        stage = {"kind": "quantize", "weight_bits": 4, "rounding": rounding, "granularity": "tensor"}
        return recipe_from_dict({"description": f"4-bit per-tensor weights, {rounding}", "stage": [stage],
                                 "export": {"formats": ["onnx", "executorch"]}}, name=name)
    return load_compress_recipe(name)


def extended_accuracy(model_dir: Path, split, users) -> dict[str, float]:
    """Accuracy of a compressed GE's ONNX model on more data than the 359-image
    test set: the test set plus the unseen generic user pool (809 images), and
    the simulated users' styled test sets, where rounding errors flip more answers."""
    from edgetailor.export.formats import get_exporter
    from edgetailor.server_side.checkpoint import GECheckpoint

    ckpt = GECheckpoint.load(model_dir)
    run = get_exporter("onnx").load(model_dir / "ge.onnx")
    images = np.concatenate([split.test.images, split.user_pool.images])
    labels = np.concatenate([split.test.labels, split.user_pool.labels])
    generic = float((run(ckpt.normalize(images).numpy()).argmax(1) == labels).mean())
    styled = [float((run(ckpt.normalize(u.test.images).numpy()).argmax(1) == u.test.labels).mean()) for u in users]
    return {"generic_809": generic, "users_styled": float(np.mean(styled))}


def run_all(out: Path, n_users: int, wide: bool) -> dict:
    import torch

    from edgetailor.app.compress import compress
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.users import simulate_users

    torch.set_num_threads(2)
    data = load_generic_digits()
    split = split_generic(data, seed=0)
    users = simulate_users(split.user_pool, n_users, seed=0)
    ges = [("lenet5", "default", DEFAULT_RECIPES)] + ([("lenet5-wide", "wide", WIDE_RECIPES)] if wide else [])
    runs = []
    for ge_name, pretrain_recipe, recipes in ges:
        ge_dir = out / ge_name / "ge"
        started = time.perf_counter()
        ckpt = pretrain(ge_dir, load_recipe(pretrain_recipe), data, overwrite=True)
        print(f"[{ge_name}] pretrained in {time.perf_counter() - started:.0f}s, generic "
              f"{ckpt.meta.generic_accuracy:.4f}", flush=True)
        for name in recipes:
            started = time.perf_counter()
            report = compress(ge_dir, recipe_for(name), out / ge_name / name, data, n_users=n_users, overwrite=True)
            report["ge"] = ge_name
            report["extended"] = extended_accuracy(out / ge_name / name, split, users)
            runs.append(report)
            print(f"[{ge_name}] {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return {"runs": runs, "users": n_users}


def _row(runs, ge, recipe, variant="compressed", fmt="onnx"):
    run = next(r for r in runs if r["ge"] == ge and r["recipe"]["name"] == recipe)
    return next(r for r in run["rows"] if r["variant"] == variant and r["format"] == fmt), run


def targets(result: dict) -> list[dict]:
    runs = result["runs"]
    rows = []

    def add(target, goal, measured, ok):
        rows.append({"target": target, "goal": goal, "measured": measured,
                     "met": "-" if ok is None else ("yes" if ok else "NO")})

    for ge in sorted({r["ge"] for r in runs}):
        if not any(r["ge"] == ge and r["recipe"]["name"] == "int8" for r in runs):
            continue
        for fmt in ("onnx", "executorch"):
            row, _ = _row(runs, ge, "int8", fmt=fmt)
            add(f"[{ge}] int8 {fmt}: file smaller x", ">= 3.5", row["size_x"], row["size_x"] >= 3.5)
            add(f"[{ge}] int8 {fmt}: accuracy drop pt", "<= 0.5", row["accuracy_drop_pt"],
                row["accuracy_drop_pt"] <= 0.5)
            add(f"[{ge}] int8 {fmt}: latency x fp32", "<= 0.6" if fmt == "onnx" else "-", row["latency_ratio"],
                row["latency_ratio"] <= 0.6 if fmt == "onnx" else None)
        row, _ = _row(runs, ge, "qat-int8")
        add(f"[{ge}] qat-int8 onnx: accuracy drop pt (QAT instead of PTQ)", "<= 0.5", row["accuracy_drop_pt"],
            row["accuracy_drop_pt"] <= 0.5)
        add(f"[{ge}] qat-int8 onnx: latency x fp32", "<= 0.6", row["latency_ratio"], row["latency_ratio"] <= 0.6)
        row, _ = _row(runs, ge, "prune50")
        add(f"[{ge}] prune50+KD onnx: accuracy drop pt", "<= 1.0", row["accuracy_drop_pt"],
            row["accuracy_drop_pt"] <= 1.0)
        add(f"[{ge}] prune50+KD: FLOPs x fp32", "<= 0.5", row["flops_ratio"], row["flops_ratio"] <= 0.5)
        for fmt in ("onnx", "executorch", "tflite"):
            row, _ = _row(runs, ge, "prune50", fmt=fmt)
            add(f"[{ge}] prune50+KD {fmt}: latency x fp32", "<= 0.7" if fmt == "onnx" else "-",
                row["latency_ratio"], row["latency_ratio"] <= 0.7 if fmt == "onnx" else None)
    if any(r["recipe"]["name"] == "ticket90" for r in runs):
        row, run = _row(runs, "lenet5", "ticket90")
        sparsity = run["stages"][-1]["weight_sparsity"]
        add("[lenet5] ticket90: weight sparsity", ">= 0.9", sparsity, sparsity >= 0.9 - 1e-3)
        add("[lenet5] ticket90: accuracy drop pt vs dense", "<= 1.0", row["accuracy_drop_pt"],
            row["accuracy_drop_pt"] <= 1.0)
    for grid in ("", "tensor-"):
        names = (f"w4-{grid}nearest", f"w4-{grid}flexround")
        if not all(any(r["recipe"]["name"] == n for r in runs) for n in names):
            continue
        (rtn_row, rtn), (flex_row, flex) = (_row(runs, "lenet5", n) for n in names)
        label = "per-tensor" if grid else "per-channel"
        add(f"[lenet5] w4 {label}: test acc FlexRound - RTN, pt", "> 0",
            100 * (flex_row["generic_accuracy"] - rtn_row["generic_accuracy"]),
            flex_row["generic_accuracy"] > rtn_row["generic_accuracy"])
        for key, what in (("generic_809", "809 generic"), ("users_styled", "users' styled")):
            delta = 100 * (flex["extended"][key] - rtn["extended"][key])
            add(f"[lenet5] w4 {label}: {what} acc FlexRound - RTN, pt", "> 0", delta, delta > 0)
    for run in runs:
        compressed, _ = _row(runs, run["ge"], run["recipe"]["name"])
        reference, _ = _row(runs, run["ge"], run["recipe"]["name"], variant="fp32 GE")
        if "personalized_user_accuracy" not in compressed:
            continue
        user = 100 * (reference["personalized_user_accuracy"] - compressed["personalized_user_accuracy"])
        generic = 100 * (reference["personalized_generic_accuracy"] - compressed["personalized_generic_accuracy"])
        add(f"[{run['ge']}] {run['recipe']['name']}: personalized user acc, pt below fp32", "<= 1.0", user,
            user <= 1.0)
        add(f"[{run['ge']}] {run['recipe']['name']}: personalized generic acc, pt below fp32", "<= 1.0", generic,
            generic <= 1.0)
    for row in rows:
        row["measured"] = round(float(row["measured"]), 4)
    return rows


def summary_rows(result: dict) -> list[dict]:
    out = []
    for run in result["runs"]:
        for row in run["rows"]:
            if row["variant"] == "fp32 GE" and run is not next(r for r in result["runs"] if r["ge"] == run["ge"]):
                continue  # the fp32 reference once per GE
            out.append({**row, "ge": run["ge"],
                        "variant": "fp32 GE" if row["variant"] == "fp32 GE" else run["recipe"]["name"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--skip-wide", action="store_true", help="Only the default LeNet-5 GE (saves ~8 min).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compression")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = run_all(args.out, args.users, wide=not args.skip_wide)
    rows = summary_rows(result)
    goals = targets(result)
    from edgetailor.app.compress_report import COLUMNS, plot

    print()
    print(format_table(rows, [("ge", "GE", ""), *COLUMNS]))
    print()
    print(format_table(goals, [("target", "target", ""), ("goal", "goal", ""), ("measured", "measured", ".3f"),
                               ("met", "met", "")]))
    result["targets"] = goals
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic.write_text(args.out / "report.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic.write_text(args.out / "targets.json", json.dumps(goals, indent=2) + "\n")
    plot([r for r in rows if r["ge"] == "lenet5"], args.out / "report.png",
         "compressed LeNet-5 GE: every recipe and runtime")
    print(f"\nwrote {args.out / 'report.json'}, {args.out / 'targets.json'}, {args.out / 'report.png'} "
          f"({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
