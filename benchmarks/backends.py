"""Benchmark of the device backends on one bundle: step programs on each
runtime's inference build against onnxruntime-training, the path they
replace, on the same bundle and the same users, in one run.

    python benchmarks/backends.py [--users 5] [--rounds 2] [--model GE_DIR] [--legacy-python PYTHON]
                                  [--out benchmarks/results/backends]

Pretrains the default GE (LeNet-5 on the built-in digits) unless --model is
given. The bundle is exported once, with every format's step programs plus
the runtimes' own training programs (ort-training, executorch-training), by
the onnxruntime-training venv (``--legacy-python``, default
``.venv-ort-training/bin/python``; made by benchmarks/make_ort_training_venv.sh),
since only onnxruntime-training writes its artifacts. Without that venv the
ort-training column is left out and the targets against it are not judged.

Then, for each backend in its own process (peak RSS is that backend's alone;
ort-training in the legacy venv, the rest in this one): GE latency at batch
1, personalization of the same simulated users (time in LE's and GN's
training steps, and in all), accuracy on each user's test set and on the
generic test set, which expert answered each test input, whether torch was
imported. Then the whole device process as a user runs it (`edgetailor
device personalize --json` in a fresh interpreter, from start to the stored
personalization), ort against ort-training. Every backend runs ``--rounds``
times, the rounds interleaved, and timings are medians over rounds and
users: this machine's speed drifts by tens of per cent within minutes.
Last, every step program in the bundle is checked again against
torch.optim.AdamW over 100 steps.

Prints the tables and the targets; writes OUT/backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAINTAINED = ("ort", "litert", "executorch")
PARITY = ("ort-training", "executorch-training", "torch")
# The path each backend personalized with before step programs: LiteRT ran GE
# only and paired with onnxruntime-training.
TODAY = {"ort": "ort-training", "litert": "ort-training", "executorch": "executorch-training"}
CLI_REPEATS = 3


def child(bundle: str, backend: str, samples: Path, users: int) -> dict:
    """One backend, in a fresh process that loads only what a device would."""
    import numpy as np

    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.loaders import load_samples
    from edgetailor.toolkit.memory import peak_rss_mb

    generic = load_samples(samples / "generic_test.npz")
    rows, latency_ms = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for user_id in range(users):
            with DeviceRuntime.open(bundle, Path(tmp) / str(user_id), backend) as rt:
                if latency_ms is None:
                    x = rt.manifest.input.normalize(generic.images[:300])
                    for i in range(20):
                        rt.ge.run(x[i:i + 1])
                    times = []
                    for i in range(len(x)):
                        started = time.perf_counter()
                        rt.ge.run(x[i:i + 1])
                        times.append(time.perf_counter() - started)
                    latency_ms = 1000 * statistics.median(times)
                rt.add_dataset(load_samples(samples / f"user{user_id}_train.npz"))
                report = rt.personalize()
                test = load_samples(samples / f"user{user_id}_test.npz")
                experts = rt.predict(test.images).experts
                rows.append({"seconds": report["seconds"], "train_seconds": report["train_seconds"],
                             "le_loss": report["le_loss"], "trainer": report["backend"],
                             "user": rt.evaluate_dataset(test)["accuracy"],
                             "generic": rt.evaluate_dataset(generic)["accuracy"],
                             "experts": "".join("L" if e == "LE" else "G" for e in experts)})
    return {"backend": backend, "trainer": rows[0]["trainer"], "ge_latency_ms": latency_ms,
            "personalize_s": statistics.median(r["seconds"] for r in rows),
            "train_s": statistics.median(r["train_seconds"] for r in rows),
            "user_accuracy": float(np.mean([r["user"] for r in rows])),
            "generic_accuracy": float(np.mean([r["generic"] for r in rows])),
            "per_user": rows, "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def merge_rounds(rounds: list[dict]) -> dict:
    """One backend's rounds: timings are medians over every round and user;
    accuracy, routes and memory come from the first round (they repeat)."""
    merged = dict(rounds[0])
    for key, per_user_key in (("personalize_s", "seconds"), ("train_s", "train_seconds")):
        merged[key] = statistics.median(u[per_user_key] for r in rounds for u in r["per_user"])
    merged["ge_latency_ms"] = statistics.median(r["ge_latency_ms"] for r in rounds)
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    return merged


def device_process(python: str, bundle: Path, samples: Path, backend: str) -> dict:
    """`edgetailor device personalize` in a fresh interpreter, as a user runs it: median wall time."""
    walls, result = [], {}
    for _ in range(CLI_REPEATS):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            proc = subprocess.run([python, "-m", "edgetailor.app.cli", "device", "personalize", "--bundle", str(bundle),
                                   "--state", tmp, "--samples", str(samples / "user0_train.npz"),
                                   "--backend", backend, "--json"], capture_output=True, text=True, cwd=ROOT)
            walls.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"device personalize with {backend} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_s": statistics.median(walls), "peak_rss_mb": result["peak_rss_mb"],
            "train_s": result["train_seconds"], "torch_imported": result["torch_imported"]}


def step_program_errors(bundle: Path) -> dict[str, float]:
    """Each step program re-run against torch autograd + torch.optim.AdamW over 100 steps."""
    from edgetailor.export.bundle import bundle_parts
    from edgetailor.export.step_programs import STEP_EXPORTERS, check_step_program
    from edgetailor.toolkit.bundle import Bundle

    errors = {}
    with Bundle.open(bundle) as opened:
        for key, part in bundle_parts(opened).items():
            for fmt, exporter in STEP_EXPORTERS.items():
                step = opened.path(opened.manifest.part(key).training_files(fmt, "steps")["step"])
                errors[f"{fmt} {key}"] = check_step_program(exporter.writer.load(step), part, fmt)
    return errors


def agreement(a: str, b: str) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="times every backend runs, interleaved (this machine's speed drifts by tens of %% "
                             "within minutes; medians over rounds compare backends fairly)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--legacy-python", default=str(ROOT / ".venv-ort-training/bin/python"),
                        help="python of a venv with onnxruntime-training (benchmarks/make_ort_training_venv.sh)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backends")
    parser.add_argument("--child", nargs=3, metavar=("BUNDLE", "BACKEND", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]), args.users)))
        return 0

    import numpy as np

    from common import default_ge  # benchmarks/common.py, beside this script
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.formats import FORMATS
    from edgetailor.toolkit.loaders import save_npz
    from edgetailor.toolkit.manifest import Manifest
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.users import simulate_users

    legacy = args.legacy_python if Path(args.legacy_python).exists() else None
    if legacy is None:
        print(f"no onnxruntime-training venv at {args.legacy_python}: the ort-training baseline is left out "
              "(make one with benchmarks/make_ort_training_venv.sh)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = default_ge(args.out, args.model)
    bundle = args.out / "bundle"
    extra = "ort-training,executorch-training" if legacy else "executorch-training"
    print(f"exporting one bundle: every format's step programs + {extra} ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([legacy or sys.executable, "-m", "edgetailor.app.cli", "export", "bundle", "--model",
                           str(model), "--out", str(bundle), "--formats", ",".join(FORMATS), "--extra-training",
                           extra, "--no-zip", "--overwrite"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"export failed:\n{proc.stderr[-3000:]}")
    export_s = time.perf_counter() - started
    manifest = Manifest.from_json((bundle / "manifest.json").read_text())

    split = split_generic(load_generic_digits(), seed=args.seed)
    samples = args.out / "users"
    samples.mkdir(exist_ok=True)
    save_npz(split.test, samples / "generic_test.npz")
    for person in simulate_users(split.user_pool, args.users, seed=args.seed, train_per_class=10, test_per_class=20):
        save_npz(person.train, samples / f"user{person.user_id}_train.npz")
        save_npz(person.test, samples / f"user{person.user_id}_test.npz")

    runs: dict[str, list[dict]] = {}
    processes_runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for backend in (*MAINTAINED, *PARITY):
            python = legacy if backend == "ort-training" else sys.executable
            if python is None:
                continue
            print(f"round {round_ + 1}/{args.rounds}, {backend}: GE latency, personalizing {args.users} users ...",
                  flush=True)
            proc = subprocess.run([python, __file__, "--child", str(bundle), backend, str(samples),
                                   "--users", str(args.users)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
            runs.setdefault(backend, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"round {round_ + 1}/{args.rounds}: whole device process (edgetailor device personalize, fresh "
              "interpreter) ...", flush=True)
        processes_runs.setdefault("ort", []).append(device_process(sys.executable, bundle, samples, "ort"))
        if legacy:
            processes_runs.setdefault("ort-training", []).append(
                device_process(legacy, bundle, samples, "ort-training"))
    results = {b: merge_rounds(r) for b, r in runs.items()}
    processes = {b: {k: statistics.median(p[k] for p in r) for k in ("process_s", "peak_rss_mb", "train_s")}
                 for b, r in processes_runs.items()}
    print("step programs against torch.optim.AdamW, 100 steps ...", flush=True)
    step_errors = step_program_errors(bundle)

    baseline = results.get("ort-training")
    experts = {b: "".join(u["experts"] for u in r["per_user"]) for b, r in results.items()}
    rows = []
    for backend, r in results.items():
        rows.append({"backend": backend, "trains with": r["trainer"], "GE ms b1": r["ge_latency_ms"],
                     "train s": r["train_s"], "personalize s": r["personalize_s"], "peak RSS MB": r["peak_rss_mb"],
                     "user acc": r["user_accuracy"], "generic acc": r["generic_accuracy"],
                     "pts vs ort-training": (100 * (r["user_accuracy"] - baseline["user_accuracy"])
                                             if baseline else None),
                     "routes = ort-training": (agreement(experts[backend], experts["ort-training"])
                                               if baseline else None),
                     "torch?": "yes" if r["torch_imported"] else "no"})
    print()
    print(format_table(rows, [("backend", "backend", "<"), ("trains with", "trains with", "<"),
                              ("GE ms b1", "GE ms b1", ".3f"), ("train s", "train s", ".3f"),
                              ("personalize s", "personalize s", ".3f"), ("peak RSS MB", "peak RSS MB", ".0f"),
                              ("user acc", "user acc", ".4f"), ("generic acc", "generic acc", ".4f"),
                              ("pts vs ort-training", "pts vs ort-training", "+.2f"),
                              ("routes = ort-training", "routes = ort-training", ".4f"), ("torch?", "torch?", "")]))
    print()
    print(format_table([{"backend": b, **p} for b, p in processes.items()],
                       [("backend", "device process", "<"), ("process_s", "start to stored, s", ".3f"),
                        ("train_s", "train s", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f")]))
    print()
    print(format_table([{"program": k, "error": v} for k, v in step_errors.items()],
                       [("program", "step program", "<"),
                        ("error", "max |param - torch AdamW| after 100 steps", ".2e")]))

    pairs = [(a, b) for i, a in enumerate(experts) for b in list(experts)[i + 1:]]
    worst_pair = min(pairs, key=lambda p: agreement(experts[p[0]], experts[p[1]]))
    ort = results["ort"]
    targets = [
        ("step programs vs torch.optim.AdamW, 100 steps (worst)", "<= 1e-5", max(step_errors.values()),
         max(step_errors.values()) <= 1e-5),
        (f"routing agreement between backends (worst pair: {'/'.join(worst_pair)})", ">= 0.99",
         agreement(experts[worst_pair[0]], experts[worst_pair[1]]),
         agreement(experts[worst_pair[0]], experts[worst_pair[1]]) >= 0.99),
        ("ort: training compute, s (median user)", "<= 0.1", ort["train_s"], ort["train_s"] <= 0.1),
        ("ort: whole device process, start to stored, s", "<= 0.6", processes["ort"]["process_s"],
         processes["ort"]["process_s"] <= 0.6),
        ("ort: device process peak RSS, MB", "<= 100", processes["ort"]["peak_rss_mb"],
         processes["ort"]["peak_rss_mb"] <= 100),
    ]
    if baseline:
        spread = max(abs(r["user_accuracy"] - baseline["user_accuracy"]) for r in results.values())
        targets.insert(0, ("user accuracy, worst backend vs ort-training, points", "<= 0.5", 100 * spread,
                           spread <= 0.005))
        for backend, before in TODAY.items():
            if before in results:
                targets.append((f"{backend} personalizes no slower than today ({before}), s", "<= "
                                f"{results[before]['personalize_s']:.3f}", results[backend]["personalize_s"],
                                results[backend]["personalize_s"] <= results[before]["personalize_s"]))
    target_rows = [{"target": t, "goal": g, "measured": float(m), "met": "yes" if ok else "NO"}
                   for t, g, m, ok in targets]
    print()
    print(format_table(target_rows, [("target", "target", "<"), ("goal", "goal", "<"), ("measured", "measured", ".4g"),
                                     ("met", "met", "")]))
    result = {"benchmark": "backends", "cpu_count": os.cpu_count(), "users": args.users, "rounds": args.rounds,
              "seed": args.seed,
              "legacy_python": legacy, "export_seconds": export_s, "backends": rows, "device_process": processes,
              "step_program_errors": step_errors, "targets": target_rows,
              "per_user": {b: r["per_user"] for b, r in results.items()},
              "bundle_kib": {name: sum((bundle / f).stat().st_size for f in entry.files) / 1024
                             for name, entry in manifest.formats.items()},
              "mean_user_accuracy": float(np.mean([r["user_accuracy"] for r in results.values()]))}
    atomic.write_text(args.out / "backends.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'backends.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
