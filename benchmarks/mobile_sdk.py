"""Benchmark of the TypeScript SDK (mobile/js) against the Python device
runtime, on the same bundle and the same users, in one run.

    python benchmarks/mobile_sdk.py [--users 5] [--real-users 3] [--rounds 3] [--model GE_DIR]
                                    [--out benchmarks/results/mobile_sdk]

Pretrains the default GE unless --model is given, exports one signed bundle
(the ONNX format, as a phone app ships it), and makes the users: simulated
writers as benchmarks/backends.py makes them (10 samples per class to train,
20 to test) and real MNIST writers (toolkit/real_users.py). For each user,
both runtimes personalize the same raw samples with the same seed: Python's
`ort` backend (scripts/python_reference.py) and the SDK in Node with
onnxruntime-node (scripts/bench.mjs), each in a fresh process, ``--rounds``
times interleaved (this machine's speed drifts within minutes; medians
compare fairly). Then the SDK in Chromium with onnxruntime-web (WASM), by the
browser test (`npm run test:browser`), and the SDK's minified size
(`npm run bundle`, esbuild, onnxruntime not included): what an app loads at
startup, and the chunks it loads on first use (training, the export, and
@noble's crypto where WebCrypto lacks Ed25519).

Targets (issue 15): predictions agree on >= 98 % and user accuracies within
1 point; personalizing 100 samples takes <= 1.5x Python's time in Node and
<= 3 s in Chromium; opening and verifying a bundle <= 300 ms in Node; the
SDK <= 60 KB minified. Prints one table and the targets; writes
OUT/mobile_sdk.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "mobile" / "js"
sys.path.insert(0, str(ROOT))


def run_json(cmd: list[str], **kwargs) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


def npm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["npm", *args], cwd=SDK, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"npm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5, help="simulated writers")
    parser.add_argument("--real-users", type=int, default=3, help="real MNIST writers (toolkit/real_users.py)")
    parser.add_argument("--rounds", type=int, default=3, help="personalizations per user and runtime, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mobile_sdk")
    args = parser.parse_args()

    import numpy as np

    from common import default_ge  # benchmarks/common.py, beside this script
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.real_users import load_mnist_5k, split_real_users
    from edgetailor.toolkit.signing import generate_key
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.users import simulate_users

    if shutil.which("node") is None:
        raise SystemExit("Node.js is not installed: install Node.js >= 18 with npm to benchmark the SDK")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (SDK / "node_modules" / "onnxruntime-node").exists():
        npm("ci", "--ignore-scripts", "--no-audit", "--no-fund")
    npm("run", "build")
    model = default_ge(args.out, args.model)
    key_dir = args.out / "key"
    if not (key_dir / "signing.key").exists():
        generate_key(key_dir)
    bundle = args.out / "bundle"
    print("exporting a signed ONNX bundle ...", flush=True)
    subprocess.run([sys.executable, "-m", "edgetailor.app.cli", "export", "bundle", "--model", str(model), "--out",
                    str(bundle), "--formats", "onnx", "--signing-key", str(key_dir), "--overwrite"],
                   check=True, cwd=ROOT, capture_output=True)
    bundle_zip, key = bundle.with_suffix(".zip"), key_dir / "signing.pub"

    users: list[tuple[str, Path]] = []
    samples_dir = args.out / "users"
    samples_dir.mkdir(exist_ok=True)

    def save(name: str, train, test) -> None:
        path = samples_dir / f"{name}.npz"
        np.savez(path, train_x=train.images, train_y=train.labels.astype(np.int64), test_x=test.images,
                 test_y=test.labels.astype(np.int64))
        users.append((name, path))

    split = split_generic(load_generic_digits(), seed=args.seed)
    for person in simulate_users(split.user_pool, args.users, seed=args.seed, train_per_class=10, test_per_class=20):
        save(f"simulated {person.user_id}", person.train, person.test)
    if args.real_users:
        for i, person in enumerate(split_real_users(load_mnist_5k(), n_users=9, seed=args.seed)[:args.real_users]):
            save(f"real writer {i}", person.train, person.test)

    rows, results = [], []
    for name, path in users:
        print(f"{name}: Python and Node, {args.rounds} rounds each ...", flush=True)
        py_runs, js_runs = [], []
        for _ in range(args.rounds):  # interleaved, each in a fresh process
            py_out = args.out / "python.json"
            subprocess.run([sys.executable, str(SDK / "scripts" / "python_reference.py"), "--bundle", str(bundle_zip),
                            "--key", str(key), "--samples", str(path), "--out", str(py_out), "--seed", str(args.seed)],
                           check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            py_runs.append(json.loads(py_out.read_text()))
            js_runs.append(run_json(["node", str(SDK / "scripts" / "bench.mjs"), str(bundle_zip), str(key), str(path),
                                     "1", str(args.seed)]))
        py, js = py_runs[0], js_runs[0]
        n = len(py["after"]["indices"])
        agree = sum(a == b for a, b in zip(py["after"]["indices"], js["after"]["indices"])) / n
        experts_agree = sum(a == b for a, b in zip(py["after"]["experts"], js["after"]["experts"])) / n
        py_s = statistics.median(r["personalize_seconds"][0] for r in py_runs)
        js_s = statistics.median(r["personalize_seconds"][0] for r in js_runs)
        row = {"user": name, "n_test": n, "agree": agree, "experts_agree": experts_agree,
               "py_before": py["accuracy_before"], "py_after": py["accuracy_after"],
               "js_before": js["accuracy_before"], "js_after": js["accuracy_after"],
               "accuracy_gap": abs(py["accuracy_after"] - js["accuracy_after"]),
               "py_seconds": py_s, "js_seconds": js_s, "ratio": js_s / py_s,
               "js_open_first": statistics.median(r["open_seconds_first"] for r in js_runs),
               "js_open_warm": statistics.median(r["open_seconds_warm"] for r in js_runs),
               "same_bundle_id": py["bundle_id"] == js["bundle_id"],
               "threshold_gap": abs(py["threshold"] - js["threshold"])}
        rows.append(row)
        summary = [{k: v for k, v in r.items() if k not in ("before", "after")} for r in py_runs + js_runs]
        results.append({**row, "python_runs": summary[:len(py_runs)], "node_runs": summary[len(py_runs):]})

    browser = None
    if not args.no_browser:
        print("Chromium: the demo page personalizes 100 samples with onnxruntime-web (WASM) ...", flush=True)
        first = users[0][1]
        env = {"EDGETAILOR_TEST_BUNDLE": str(bundle_zip), "EDGETAILOR_TEST_KEY": str(key),
               "EDGETAILOR_TEST_SAMPLES": str(first)}
        try:
            npm("run", "test:browser", env=env)
            browser = json.loads((SDK / "test-output" / "browser.json").read_text())
        except SystemExit as exc:
            print(f"the browser measurement failed or Chromium is missing: {str(exc)[:400]}")
    npm("run", "bundle")
    size = json.loads((SDK / "test-output" / "size.json").read_text())

    print()
    print(format_table(rows, [("user", "user", "<"), ("n_test", "test n", "d"),
                              ("agree", "predictions agree", ".3f"),
                              ("experts_agree", "experts agree", ".3f"), ("py_before", "GE acc.", ".3f"),
                              ("py_after", "Python acc.", ".3f"), ("js_after", "JS acc.", ".3f"),
                              ("py_seconds", "Python s", ".2f"), ("js_seconds", "Node s", ".2f"),
                              ("ratio", "Node/Python", ".2f"), ("js_open_first", "open s (first)", ".3f")]))
    overall_agree = sum(r["agree"] * r["n_test"] for r in rows) / sum(r["n_test"] for r in rows)
    worst_gap = max(r["accuracy_gap"] for r in rows)
    ratio = statistics.median(r["ratio"] for r in rows)
    open_first = max(r["js_open_first"] for r in rows)
    node_s = statistics.median(r["js_seconds"] for r in rows)
    python_s = statistics.median(r["py_seconds"] for r in rows)
    warm = statistics.median(r["js_open_warm"] for r in rows)
    chromium_s = browser["personalize_seconds"] if browser else None
    lazy = size.get("lazy_chunks", {})
    noble = sum(b for name, b in lazy.items() if "ed25519" in name or "sha2" in name)
    training = sum(lazy.values()) - noble
    targets = [
        ("predictions agree >= 98 %", f"{overall_agree:.4f} (lowest user {min(r['agree'] for r in rows):.3f})",
         overall_agree >= 0.98),
        ("user accuracies within 1 point", f"largest gap {100 * worst_gap:.2f} points", worst_gap <= 0.01),
        ("personalize 100 samples in Node <= 1.5x Python",
         f"{ratio:.2f}x (median over users; Node {node_s:.2f} s, Python {python_s:.2f} s)", ratio <= 1.5),
        ("personalize 100 samples in Chromium <= 3 s", f"{chromium_s:.2f} s" if browser else "not measured",
         chromium_s is not None and chromium_s <= 3.0),
        ("open and verify <= 300 ms in Node",
         f"{1000 * open_first:.0f} ms first open in a fresh process (slowest user); {1000 * warm:.0f} ms warm",
         open_first <= 0.3),
        ("SDK <= 60 KB minified",
         f"{size['bytes'] / 1024:.1f} KB at startup ({size['own_bytes'] / 1024:.1f} KB the SDK's own code, the rest "
         f"fflate; {size['gzip_bytes'] / 1024:.1f} KB gzipped); on first use +{training / 1024:.1f} KB training, "
         f"export and repair, +{noble / 1024:.1f} KB @noble where WebCrypto lacks Ed25519",
         size["bytes"] <= 60 * 1024),
    ]
    print()
    print(format_table([{"target": t, "measured": m, "met": "yes" if ok else "NO"} for t, m, ok in targets],
                       [("target", "target", "<"), ("measured", "measured", "<"), ("met", "met", "<")]))
    atomic.write_text(args.out / "mobile_sdk.json", json.dumps({
        "users": results, "browser": browser, "size": size, "rounds": args.rounds,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    print(f"\nwrote {args.out / 'mobile_sdk.json'}")
    return 0 if all(ok for _, _, ok in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
