"""Benchmark of the device install: a fresh venv with `edgetailor[device]`,
for each CPython found here, as a user on an edge board installs it.

    python benchmarks/device_install.py [--pythons 3.10,3.11,3.12,3.13] [--out benchmarks/results/install]

Builds the wheel from this checkout, then for each Python: a fresh venv,
`pip install 'edgetailor[device]'` from the registry (the wheel from here),
the venv's size on disk, whether torch or onnxruntime-training got in, and a
personalization in that venv (`edgetailor device personalize` and `device
evaluate` on a bundle exported here, ONNX only). A Python that is not
installed here is reported and skipped (pyenv's are looked up too).

Prints a table and the targets; writes OUT/install.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def find_python(version: str) -> str | None:
    """A working python{version}: on PATH, or one of pyenv's (whose shims fail for a version not selected)."""
    pyenv = sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"{version}.*/bin/python{version}"))
    for candidate in [shutil.which(f"python{version}"), *map(str, pyenv)]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def venv_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythons", default="3.10,3.11,3.12,3.13")
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "install")
    args = parser.parse_args()

    from edgetailor.export.bundle import export_bundle
    from common import default_ge  # benchmarks/common.py, beside this script
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.loaders import save_npz
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.users import simulate_user

    args.out.mkdir(parents=True, exist_ok=True)
    model = default_ge(args.out, args.model)
    bundle = export_bundle(model, args.out / "bundle", formats=["onnx"], overwrite=True)
    person = simulate_user(split_generic(load_generic_digits(), seed=0).user_pool, user_id=0, seed=0)
    save_npz(person.train, args.out / "train.npz")
    save_npz(person.test, args.out / "test.npz")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("building the wheel ...", flush=True)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp, str(ROOT)])
        wheel = next(Path(tmp).glob("edgetailor-*.whl"))
        for version in args.pythons.split(","):
            python = find_python(version)
            if python is None:
                print(f"CPython {version}: not installed here, skipped", flush=True)
                rows.append({"python": version, "status": "not installed here"})
                continue
            venv = Path(tmp) / f"venv{version}"
            print(f"CPython {version}: fresh venv, pip install 'edgetailor[device]' ...", flush=True)
            run([python, "-m", "venv", str(venv)])
            bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
            started = time.perf_counter()
            run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 f"edgetailor[device] @ {wheel.as_uri()}"])
            install_s = time.perf_counter() - started
            installed = {line.split("==")[0].lower() for line in
                         run([str(bin_dir / "python"), "-m", "pip", "freeze"]).stdout.split()}
            state = Path(tmp) / f"state{version}"
            started = time.perf_counter()
            personalized = json.loads(run([str(bin_dir / "edgetailor"), "device", "personalize", "--bundle",
                                           f"{bundle}.zip", "--state", str(state), "--samples",
                                           str(args.out / "train.npz"), "--json"]).stdout.splitlines()[-1])
            process_s = time.perf_counter() - started
            evaluated = json.loads(run([str(bin_dir / "edgetailor"), "device", "evaluate", "--bundle",
                                        f"{bundle}.zip", "--state", str(state), "--samples",
                                        str(args.out / "test.npz"), "--json"]).stdout.splitlines()[-1])
            rows.append({"python": version, "status": "ok", "venv MB": venv_size_mb(venv), "install s": install_s,
                         "packages": len(installed), "torch": "torch" in installed,
                         "onnxruntime-training": "onnxruntime-training" in installed,
                         "onnxruntime": next((p for p in run([str(bin_dir / "python"), "-m", "pip", "freeze"])
                                              .stdout.split() if p.lower().startswith("onnxruntime==")), "-"),
                         "personalize s": process_s, "user acc": evaluated["accuracy"],
                         "GE acc": evaluated["ge_only_accuracy"], "torch imported": personalized["torch_imported"]})
            shutil.rmtree(venv, ignore_errors=True)
    print()
    print(format_table(rows, [("python", "CPython", "<"), ("status", "status", "<"), ("venv MB", "venv MB", ".0f"),
                              ("install s", "install s", ".0f"), ("onnxruntime", "runtime", "<"),
                              ("torch", "torch?", ""), ("onnxruntime-training", "ort-training?", ""),
                              ("personalize s", "personalize s", ".2f"), ("user acc", "user acc", ".4f"),
                              ("GE acc", "GE acc", ".4f")]))
    measured = [r for r in rows if r["status"] == "ok"]
    targets = [{"target": "fresh [device] venv, MB (largest)", "goal": "<= 250",
                "measured": max(r["venv MB"] for r in measured),
                "met": "yes" if max(r["venv MB"] for r in measured) <= 250 else "NO"},
               {"target": "torch or onnxruntime-training in it", "goal": "no",
                "measured": float(any(r["torch"] or r["onnxruntime-training"] for r in measured)),
                "met": "yes" if not any(r["torch"] or r["onnxruntime-training"] for r in measured) else "NO"},
               {"target": "CPython versions that install and personalize", "goal": args.pythons,
                "measured": float(len(measured)), "met": "yes" if len(measured) == len(rows) else "NO"}]
    print()
    print(format_table(targets, [("target", "target", "<"), ("goal", "goal", "<"), ("measured", "measured", ".4g"),
                                 ("met", "met", "")]))
    atomic.write_text(args.out / "install.json", json.dumps({"benchmark": "device_install", "rows": rows,
                                                             "targets": targets}, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'install.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
