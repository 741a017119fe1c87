"""Benchmark: models edgetailor did not train, brought as users bring them,
personalized on every backend.

    python benchmarks/user_models.py [--users 5] [--real-users 3] [--archs resnet,dscnn,row_gru]
                                     [--out benchmarks/results/user_models]

For each architecture in ``examples/byom/architectures.py``:
- a residual net with BatchNorm;
- a depthwise-separable CNN;
- a GRU reading glyph rows;
- a 1-D CNN on 3-axis accelerometer windows, with its own data: simulated
  wrist gestures (``toolkit/gestures.py``) and users whose watch sits
  rotated or tilted, or who move at another tempo.

Each one is trained by a plain torch loop on the built-in generic digits, as
its owner would. It then becomes a bundle through
``edgetailor.export.bundle_from_model`` with automatic taps, in ONNX,
ExecuTorch and TFLite. Then, on each backend (ort, executorch, litert), the
same users personalize it:
- simulated writers;
- real MNIST writers (``toolkit/real_users.py``).

Accuracy is measured on each user's test set and on the generic test set.
Every device state is fresh. Fine-tuning all of GE, or its last layer, on the
same samples is the baseline.

Prints one table per architecture and a summary of the targets:
- every architecture exports;
- the backends agree within 0.5 points;
- LE+GN ≤ 2.5 % of GE.

Writes OUT/user_models.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = {"ort": "onnx", "executorch": "executorch", "litert": "tflite"}
# How each owner trains their model (examples.byom.architectures.train_classifier): epochs, learning rate.
TRAINING = {"resnet": (15, 3e-3), "dscnn": (15, 3e-3), "row_gru": (25, 1e-2), "gesture_cnn": (15, 3e-3)}
AGREEMENT_TARGET = 0.005
BUDGET_TARGET = 0.025


def users(split, n_simulated: int, n_real: int, seed: int) -> list[tuple[str, object, object]]:
    from edgetailor.toolkit.real_users import load_mnist_5k, split_real_users
    from edgetailor.toolkit.users import simulate_users

    people = [(f"simulated {p.user_id}", p.train, p.test)
              for p in simulate_users(split.user_pool, n_simulated, seed=seed, train_per_class=10, test_per_class=20)]
    if n_real:
        people += [(f"real writer {i}", p.train, p.test)
                   for i, p in enumerate(split_real_users(load_mnist_5k(), n_users=9, seed=seed)[:n_real])]
    return people


def gestures(n_users: int, seed: int):
    """The time-series task: simulated wrist gestures (toolkit/gestures.py), and users whose watch sits
    otherwise; the spec standardises by the generic windows' mean and std."""
    from edgetailor.toolkit.data import split_generic
    from edgetailor.toolkit.gestures import generic_gestures, simulate_gesture_user
    from edgetailor.toolkit.input_spec import InputSpec

    split = split_generic(generic_gestures(seed=seed), seed=seed)
    spec = InputSpec.for_timeseries(3, 64, float(split.train.images.mean()), float(split.train.images.std()))
    people = [(f"wrist {u}", p.train, p.test)
              for u, p in ((u, simulate_gesture_user(u, seed=seed)) for u in range(n_users))]
    return split, spec, people


def run_architecture(name: str, split, people, out: Path, seed: int, spec=None) -> dict:
    import numpy as np
    import torch

    from edgetailor.device import DeviceRuntime
    from edgetailor.export import bundle_from_model
    from edgetailor.server_side.checkpoint import replay_subset
    from edgetailor.server_side.finetune import finetune
    from edgetailor.server_side.tapped import TappedModel, probe_taps
    from edgetailor.toolkit.input_spec import InputSpec
    from examples.byom.architectures import ARCHITECTURES, accuracy, train_classifier

    spec = spec or InputSpec.for_glyphs()
    normalized = lambda data: torch.from_numpy(spec.normalize(data.images))  # noqa: E731
    x, y = normalized(split.train), torch.from_numpy(split.train.labels)
    epochs, lr = TRAINING[name]
    started = time.perf_counter()
    model = train_classifier(ARCHITECTURES[name](), x, y, epochs=epochs, lr=lr, seed=seed)
    train_seconds = time.perf_counter() - started
    print(f"{name}: trained in {train_seconds:.0f} s, generic accuracy "
          f"{accuracy(model, normalized(split.test), torch.from_numpy(split.test.labels)):.3f}", flush=True)
    replay = replay_subset(split.train, min(300, len(split.train)), seed)
    started = time.perf_counter()
    bundle = bundle_from_model(model, x[:4], split.train.label_names, replay, out / f"bundle-{name}",
                               input_spec=spec, generic_test=split.test, formats=list(BACKENDS.values()),
                               overwrite=True, make_zip=False, seed=seed,
                               progress=lambda msg: print(f"  {msg}", flush=True))
    export_seconds = time.perf_counter() - started
    manifest = json.loads((bundle / "manifest.json").read_text())
    ge, le, gn = manifest["global_expert"], manifest["local_expert"], manifest["gating_network"]
    # The same model with its classifier found, which the last-layer baseline tunes.
    tapped = TappedModel(model, probe_taps(model, x[:4], len(split.train.label_names)), le["feature_tap"],
                         gn["feature_tap"])

    rows = []
    for person, train, test in people:
        row = {"user": person}
        for backend in BACKENDS:
            with tempfile.TemporaryDirectory() as state, DeviceRuntime.open(bundle, state, backend=backend) as rt:
                before = rt.evaluate_dataset(test)["accuracy"]
                rt.add_dataset(train)
                report = rt.personalize()
                row[f"{backend} user"] = rt.evaluate_dataset(test)["accuracy"]
                row[f"{backend} generic"] = rt.evaluate_dataset(split.test)["accuracy"]
                row[f"{backend} seconds"] = report["seconds"]
                row["GE user"] = before
        tx, ty = normalized(train), torch.from_numpy(train.labels)
        for mode in ("all", "last"):
            tuned = finetune(tapped, tx, ty, mode, seed=seed)
            row[f"FT {mode} user"] = accuracy(tuned, normalized(test), torch.from_numpy(test.labels))
            row[f"FT {mode} generic"] = accuracy(tuned, normalized(split.test), torch.from_numpy(split.test.labels))
        rows.append(row)
        print(f"  {person}: GE {row['GE user']:.3f} -> " + ", ".join(
            f"{b} {row[f'{b} user']:.3f}" for b in BACKENDS) + f"; FT all {row['FT all user']:.3f}", flush=True)

    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "user"}
    spread_user = max(max(r[f"{b} user"] for b in BACKENDS) - min(r[f"{b} user"] for b in BACKENDS) for r in rows)
    spread_generic = max(max(r[f"{b} generic"] for b in BACKENDS) - min(r[f"{b} generic"] for b in BACKENDS)
                         for r in rows)
    gain = mean["ort user"] - mean["GE user"]
    return {
        "architecture": name, "arch": ge["arch"], "ge_params": ge["params"], "ge_macs": ge["macs"],
        "generic_accuracy": ge["generic_accuracy"], "train_seconds": round(train_seconds, 1),
        "export_seconds": round(export_seconds, 1),
        "le": {"kind": le["kind"], "tap": le["feature_tap"], "params": le["params"],
               **{k: le[k] for k in ("rank", "channels", "width") if k in le}},
        "gn": {"tap": gn["feature_tap"], "params": gn["params"]},
        "le_gn_share": (le["params"] + gn["params"]) / ge["params"],
        "users": rows, "mean": mean,
        "largest_backend_gap_user": spread_user, "largest_backend_gap_generic": spread_generic,
        "gain_fraction_of_ft_all": gain / (mean["FT all user"] - mean["GE user"])
        if mean["FT all user"] > mean["GE user"] else None,
        "personalize_seconds_median": {b: statistics.median(r[f"{b} seconds"] for r in rows) for b in BACKENDS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5, help="simulated writers")
    parser.add_argument("--real-users", type=int, default=3, help="real MNIST writers (toolkit/real_users.py)")
    parser.add_argument("--archs", default="resnet,dscnn,row_gru,gesture_cnn",
                        help="comma-separated names from examples/byom/architectures.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "user_models")
    args = parser.parse_args()

    import torch

    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.tables import format_table

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    split = split_generic(load_generic_digits(), seed=args.seed)
    people = users(split, args.users, args.real_users, args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [a.strip() for a in args.archs.split(",") if a.strip()]:
            if name == "gesture_cnn":   # time series: its own data and users
                task_split, spec, task_people = gestures(args.users + args.real_users, args.seed)
                results.append(run_architecture(name, task_split, task_people, Path(tmp), args.seed, spec))
            else:
                results.append(run_architecture(name, split, people, Path(tmp), args.seed))

    for result in results:
        print(f"\n{result['architecture']} ({result['arch']}, {result['ge_params']:,} params; "
              f"LE {result['le']['kind']} on {result['le']['tap']}, GN on {result['gn']['tap']}; "
              f"LE+GN {result['le_gn_share']:.2%} of GE)")
        columns = [("user", "user", "")] + [(k, k, ".3f") for k in
                                              ("GE user", *(f"{b} user" for b in BACKENDS), "FT all user",
                                               "FT last user", *(f"{b} generic" for b in BACKENDS),
                                               "FT all generic")]
        print(format_table(result["users"] + [{"user": "mean", **result["mean"]}], columns))
    summary = [{"architecture": r["architecture"], "GE params": r["ge_params"], "LE+GN": r["le_gn_share"],
                "GE user": r["mean"]["GE user"], "GE+LE+GN user": r["mean"]["ort user"],
                "FT all user": r["mean"]["FT all user"], "gap user": r["largest_backend_gap_user"],
                "gap generic": r["largest_backend_gap_generic"], "GE generic": r["generic_accuracy"],
                "mixture generic": r["mean"]["ort generic"], "export s": r["export_seconds"],
                "personalize s": r["personalize_seconds_median"]["ort"]} for r in results]
    print("\nsummary (GE+LE+GN on ort; gaps: the largest difference between backends on any user)")
    print(format_table(summary, [("architecture", "architecture", ""), ("GE params", "GE params", ",d"),
                                 ("LE+GN", "LE+GN", ".2%"), ("GE user", "GE user", ".3f"),
                                 ("GE+LE+GN user", "GE+LE+GN user", ".3f"), ("FT all user", "FT all user", ".3f"),
                                 ("gap user", "gap user", ".3f"), ("gap generic", "gap generic", ".3f"),
                                 ("GE generic", "GE generic", ".3f"), ("mixture generic", "mixture generic", ".3f"),
                                 ("export s", "export s", ".0f"), ("personalize s", "personalize s", ".2f")]))
    targets = {
        "architectures exported and personalized on every backend": len(results),
        "backends agree within 0.5 points": all(r["largest_backend_gap_user"] <= AGREEMENT_TARGET
                                                and r["largest_backend_gap_generic"] <= AGREEMENT_TARGET
                                                for r in results),
        "LE+GN <= 2.5 % of GE": all(r["le_gn_share"] <= BUDGET_TARGET for r in results),
    }
    for what, value in targets.items():
        print(f"  {what}: {value}")
    (args.out / "user_models.json").write_text(json.dumps({"results": results, "targets": targets}, indent=2) + "\n")
    print(f"wrote {args.out / 'user_models.json'}")


if __name__ == "__main__":
    main()
