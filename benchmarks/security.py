"""Issue 14's targets: a device that cannot be fooled, starved or locked out.

    python benchmarks/security.py                  # every section (about 15 minutes on 2 cores)
    python benchmarks/security.py --fuzz 2000      # fewer fuzz inputs per loader, for a quick look
    python benchmarks/security.py --only attacks,bombs

Sections and their goals:
- attacks: every attack in tests/security/attacks.py refused (100 %), and a
  genuine update after a key rotation accepted;
- fuzz: random mutations of a valid input per loader (npz, IDX, IDX.gz, PNG,
  manifest, bundle .zip): exceptions outside EdgetailorError, goal 0 of
  >= 10,000 per loader;
- bombs: each refused in <= 1 s with peak RSS <= 150 MB, measured in a fresh
  process per bomb (the process's whole peak: Python, numpy and the refusal);
- kill: kill -9 of a device process at >= 20 moments: 0 samples lost, the
  previous personalization (or the new one, if it had committed) intact;
- concurrent: 4 personalizes on one state at once: 0 errors, the newest
  sample set wins;
- signature: the time signature checking adds to opening a bundle (<= 20 ms).

Prints a table per section and writes benchmarks/results/security/security.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import default_ge  # noqa: E402

from edgetailor.toolkit.tables import format_table  # noqa: E402

SECTIONS = ("attacks", "fuzz", "bombs", "kill", "concurrent", "signature")


def make_bundle(out: Path, model: Path | None) -> Path:
    """A bundle of the default GE (ONNX only: the attacks and the state tests need one runtime)."""
    from edgetailor.export.bundle import export_bundle

    bundle = out / "bundle"
    if not (bundle / "manifest.json").exists():
        print("exporting the bundle ...", flush=True)
        export_bundle(default_ge(out, model), bundle, formats=["onnx"], overwrite=True)
    return bundle


# ----------------------------------------------------------------- attacks
def run_attacks(bundle: Path, work: Path) -> dict:
    from tests.security.attacks import ATTACKS, Lab, genuine_update_after_rotation

    lab = Lab(work / "lab", bundle)
    rows = []
    for attack in ATTACKS:
        started = time.perf_counter()
        outcome = attack.run(lab)
        rows.append({"attack": attack.name, "what": attack.what, "refused": outcome.startswith("refused"),
                     "seconds": time.perf_counter() - started, "error": outcome.removeprefix("refused: ")[:150]})
    genuine = genuine_update_after_rotation(lab)
    print(format_table(rows, [("attack", "attack", ""), ("refused", "refused", ""), ("seconds", "s", ".2f"),
                              ("error", "what the device said", "")]))
    refused = sum(r["refused"] for r in rows)
    print(f"attacks refused: {refused}/{len(rows)} ({100 * refused / len(rows):.0f} %); genuine update after a key "
          f"rotation: {genuine}")
    return {"rows": rows, "refused": refused, "total": len(rows), "refused_pct": 100 * refused / len(rows),
            "genuine_after_rotation": genuine, "met": refused == len(rows) and genuine == "accepted"}


# -------------------------------------------------------------------- fuzz
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four edits: bit flips, byte overwrites, truncation, insertion, duplication, or a header field
    set to an extreme value (0, 0xFF.., a big number)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if not out:
            out = bytearray(b"\x00")
        position = rng.randrange(len(out)) if rng.random() < 0.6 else rng.randrange(min(len(out), 64))
        if kind < 0.3:
            out[position] ^= 1 << rng.randrange(8)
        elif kind < 0.5:
            out[position] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif kind < 0.6:
            out = out[: rng.randrange(len(out) + 1)]
        elif kind < 0.7:
            out[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind < 0.8:
            end = min(len(out), position + rng.randint(1, 64))
            out[position:position] = out[position:end]
        else:
            width = rng.choice([2, 4])
            value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)])
            out[position:position + width] = value.to_bytes(8, "little")[:width]
    return bytes(out)


ODD_VALUES = [None, True, -1, 0, 2 ** 63, 1e308, float("nan"), "", "../../etc/passwd", "/abs", "C:\\x", "\x00",
              [], {}, [[[[]]]], {"a": {"b": {}}}, "x" * 1000, ["onnx"], {"onnx": "ge.onnx"}]


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """Half the time a structural edit: one value anywhere in the document replaced by an odd one, or a key
    deleted or added; otherwise byte-level mutations."""
    if rng.random() < 0.5:
        return mutate(data, rng)
    document = json.loads(data)
    containers = []

    def walk(node):
        if isinstance(node, dict):
            containers.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            containers.append(node)
            for value in node:
                walk(value)
    walk(document)
    for _ in range(rng.randint(1, 3)):
        node = rng.choice(containers)
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            choice = rng.random()
            if choice < 0.2:
                del node[key]
            elif choice < 0.3:
                node[f"{key}_extra"] = rng.choice(ODD_VALUES)
            else:
                node[key] = rng.choice(ODD_VALUES)
        elif isinstance(node, list) and node:
            node[rng.randrange(len(node))] = rng.choice(ODD_VALUES)
    return json.dumps(document).encode()


def bundle_fuzz_cases(bundle: Path, work: Path):
    """Fuzz targets for what the device reads from a bundle: the manifest JSON and the whole .zip."""
    from edgetailor.toolkit.bundle import Bundle, zip_bundle
    from edgetailor.toolkit.errors import EdgetailorError
    from edgetailor.toolkit.manifest import Manifest

    zipped = zip_bundle(bundle, work / "fuzz-bundle.zip")
    manifest_bytes = (bundle / "manifest.json").read_bytes()

    def manifest_case(data: bytes) -> str | None:
        try:
            Manifest.from_json(data, "manifest.json")
        except EdgetailorError:
            return None
        except Exception as exc:  # noqa: BLE001 -- the fuzz is looking for exactly these
            return type(exc).__name__
        return None

    def zip_case(data: bytes) -> str | None:
        path = work / "case.zip"
        path.write_bytes(data)
        try:
            Bundle.open(path).close()
        except EdgetailorError:
            return None
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__
        return None

    return {"manifest": (manifest_bytes, manifest_case, mutate_json),
            "bundle.zip": (zipped.read_bytes(), zip_case, mutate)}


def run_fuzz(bundle: Path, work: Path, per_loader: int, seed: int = 0) -> dict:
    from tests.security import fuzz_cases

    fuzz_dir = work / "fuzz"
    fuzz_dir.mkdir(exist_ok=True)
    # the sample loaders with tests/security/fuzz_cases.py's format-aware mutations; the bundle's own below
    targets = {name: (data, lambda d, n=name: fuzz_cases.fuzz_one(n, d, fuzz_dir),
                      lambda d, r, n=name: fuzz_cases.mutate(n, d, r))
               for name, data in fuzz_cases.seed_inputs().items()}
    targets.update(bundle_fuzz_cases(bundle, fuzz_dir))
    rows = []
    for name, (seed_bytes, check, mutator) in targets.items():
        rng = random.Random(f"{seed}-{name}")
        outside: dict[str, int] = {}
        example: dict[str, str] = {}
        started = time.perf_counter()
        for i in range(per_loader):
            data = mutator(seed_bytes, rng)
            kind = check(data)
            if kind:
                outside[kind] = outside.get(kind, 0) + 1
                if kind not in example:
                    example[kind] = str(fuzz_dir / f"{name.replace('.', '_')}-{kind}.bin")
                    Path(example[kind]).write_bytes(data)
            if (i + 1) % 2000 == 0:
                print(f"  fuzz {name}: {i + 1}/{per_loader}", flush=True)
        rows.append({"loader": name, "inputs": per_loader, "outside": sum(outside.values()),
                     "kinds": ", ".join(f"{k} x{v}" for k, v in outside.items()) or "-",
                     "seconds": time.perf_counter() - started, "examples": example})
    print(format_table(rows, [("loader", "loader", ""), ("inputs", "inputs", ",d"),
                              ("outside", "outside EdgetailorError", ",d"), ("kinds", "kinds", ""),
                              ("seconds", "s", ".0f")]))
    return {"rows": rows, "met": all(r["outside"] == 0 and r["inputs"] >= 10_000 for r in rows)}


# ------------------------------------------------------------------- bombs
BOMB_PROBE = r"""
import sys, time, json
sys.path.insert(0, {root!r})
from edgetailor.toolkit.memory import peak_rss_mb
kind, path = sys.argv[1], sys.argv[2]
started = time.perf_counter()
from edgetailor.toolkit.errors import EdgetailorError   # imports count: a device command pays for them too
error = None
try:
    if kind == "bundle":
        from edgetailor.toolkit.bundle import Bundle
        Bundle.open(path).close()
    elif kind == "manifest":
        from edgetailor.toolkit.manifest import Manifest
        Manifest.from_json(open(path, "rb").read(), path)
    elif kind == "images":
        from edgetailor.toolkit.loaders import load_images
        load_images(path)
    else:
        from edgetailor.toolkit.loaders import load_samples
        load_samples(path)
except EdgetailorError as exc:
    error = str(exc).splitlines()[0]
print(json.dumps({{"refused": error is not None, "error": error, "seconds": time.perf_counter() - started,
                  "peak_rss_mb": peak_rss_mb()}}))
"""


def build_bombs(bundle: Path, work: Path) -> list[tuple[str, str, Path]]:
    """(name, loader kind, path) for every bomb in the issue, at the sizes the issue found."""
    from tests.security import bombs
    from tests.security.attacks import zip_bomb, zip_members

    out = work / "bombs"
    out.mkdir(exist_ok=True)
    cases = [("zip: 1 GiB member", "bundle", zip_bomb(out / "zip-member-1gib.zip", bundle, 1 << 30))]
    big_manifest = out / "manifest-1gib.zip"
    members = [(n, d) for n, d in zip_members(bundle) if n != "manifest.json"]
    with __import__("zipfile").ZipFile(big_manifest, "w", compression=8) as archive:
        with archive.open("manifest.json", "w", force_zip64=True) as member:
            member.write(b"{")
            chunk = b" " * (1 << 20)
            for _ in range(1024):
                member.write(chunk)
            member.write(b"}")
        for name, data in members:
            archive.writestr(name, data)
    cases.append(("zip: manifest inflating to 1 GiB", "bundle", big_manifest))
    deep = out / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases.append(("manifest nested 100,000 deep", "manifest", deep))
    glyph = np.zeros((1, 28, 28), np.uint8)
    glyph[0, 8:20, 12:16] = 255
    np.savez(out / "label-2e9.npz", x=glyph, y=np.array([2_000_000_000]))
    cases.append(("npz: one label of 2e9", "samples", out / "label-2e9.npz"))
    cases.append(("npz: x inflating to 1 GiB", "samples", bombs.npz_bomb(out / "x-1gib.npz", (1024, 1024, 1024))))
    idx_dir = out / "idx-labels"
    idx_dir.mkdir(exist_ok=True)
    (idx_dir / "t-images-idx3-ubyte").write_bytes(bombs.idx_header(glyph.shape) + glyph.tobytes())
    (idx_dir / "t-labels-idx1-ubyte").write_bytes(bombs.idx_header((1,), 0x0C) + (2_000_000_000).to_bytes(4, "big"))
    cases.append(("IDX: int32 label of 2e9", "samples", idx_dir / "t-images-idx3-ubyte"))
    cases.append(("IDX.gz: header promising 10.7 GB", "images",
                  bombs.idx_gz_bomb(out / "a-images-idx3-ubyte.gz", (10_000, 1070, 1000), zeros=1 << 20)))
    cases.append(("IDX.gz: one image, then 2.2 GB", "images",
                  bombs.idx_gz_bomb(out / "b-images-idx3-ubyte.gz", (1, 28, 28), zeros=int(2.2e9))))
    for side in (12_000, 20_000):
        folder = out / f"png{side}" / "7"
        folder.mkdir(parents=True, exist_ok=True)
        bombs.png_of_size(folder / "huge.png", side, side)
        cases.append((f"PNG {side:,}² in an image folder", "samples", folder.parent))
    return cases


def run_bombs(bundle: Path, work: Path) -> dict:
    probe = BOMB_PROBE.format(root=str(ROOT))
    rows = []
    for name, kind, path in build_bombs(bundle, work):
        wall = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, kind, str(path)], capture_output=True, text=True,
                              timeout=600)
        wall = time.perf_counter() - wall
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"refused": False, "error": f"crashed: {proc.stderr[-300:]}", "seconds": wall,
                      "peak_rss_mb": float("nan")}
        rows.append({"bomb": name, "size on disk": f"{Path(path).stat().st_size / 1e6:.2f} MB", **result,
                     "met": result["refused"] and result["seconds"] <= 1.0 and result["peak_rss_mb"] <= 150})
    print(format_table(rows, [("bomb", "bomb", ""), ("size on disk", "on disk", ""), ("refused", "refused", ""),
                              ("seconds", "s to refuse", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
                              ("met", "met", ""), ("error", "error", "")]))
    return {"rows": rows, "met": all(r["met"] for r in rows)}


# -------------------------------------------------------------- kill, race
KILL_EPOCHS = 150     # LE epochs of each killed personalize: a few seconds of training to land in


def run_kill(bundle: Path, work: Path, moments: int) -> dict:
    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.users import simulate_user
    from tests.security.state_moments import kill_at

    from edgetailor.toolkit.bundle import zip_bundle

    zip_bundle(bundle, bundle.with_name(bundle.name + ".zip"))
    user = simulate_user(split_generic(load_generic_digits(), seed=0).user_pool, user_id=2, seed=0,
                         train_per_class=10, test_per_class=5)
    state = work / "kill-state"
    with DeviceRuntime.open(bundle, state, "ort") as rt:
        rt.add_dataset(user.train)
        rt.personalize({"le_epochs": 5, "gn_steps": 20})
    # How long one add-and-personalize takes when nothing kills it, so that the moments cover all of it:
    # start-up and unpack, storing the samples, GE's features, LE's and GN's training, the commit.
    calibration = kill_at(bundle, state, user.train, work, [120.0], first_moment=1000, epochs=KILL_EPOCHS)[0]
    span = calibration["process_seconds"]
    print(f"one add-and-personalize takes {span:.1f} s unkilled; killing at {moments} moments across it")
    delays = list(np.round(np.linspace(0.02, 0.97 * span, moments), 2))   # the last ones may see it finish
    outcomes = kill_at(bundle, state, user.train, work, delays, epochs=KILL_EPOCHS)
    print(format_table(outcomes, [("delay_s", "killed at s", ".2f"), ("stage", "stage", ""),
                                  ("samples_before", "samples before", "d"), ("samples_after", "after", "d"),
                                  ("samples_lost", "lost", "d"), ("partial_add", "partial add", ""),
                                  ("personalization_before", "pers. before", ""),
                                  ("personalization_after", "after", ""), ("personalization_ok", "intact", "")]))
    lost = sum(o["samples_lost"] for o in outcomes)
    ok = all(o["personalization_ok"] and not o["partial_add"] for o in outcomes)
    leftovers = list((state / "bundles").glob(".partial-*"))
    print(f"kill -9 at {len(outcomes)} moments: {lost} samples lost; personalization intact every time: {ok}; "
          f"unpack leftovers: {len(leftovers)}")
    killed = sum(o["stage"] != "finished" for o in outcomes)
    print(f"  {killed} of the {len(outcomes)} processes were killed before they finished")
    return {"moments": outcomes, "samples_lost": lost, "personalization_intact": ok, "leftovers": len(leftovers),
            "process_seconds": span, "killed_before_finishing": killed,
            "met": killed >= 20 and lost == 0 and ok and not leftovers}


def run_concurrent(bundle: Path, work: Path, processes: int) -> dict:
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.users import simulate_user
    from tests.security.state_moments import concurrent_personalizes

    user = simulate_user(split_generic(load_generic_digits(), seed=0).user_pool, user_id=2, seed=0,
                         train_per_class=10, test_per_class=5)
    result = concurrent_personalizes(bundle, work, user.train, processes=processes, epochs=5)
    print(format_table([result], [("processes", "processes", "d"), ("seconds", "s", ".1f"),
                                  ("samples", "samples stored", "d"), ("active_trained_on", "active trained on", "d"),
                                  ("retrained", "retrained", "d"), ("superseded", "superseded", "d"),
                                  ("newest_samples_won", "newest won", "")]))
    print(f"errors: {len(result['errors'])}" + "".join(f"\n  {e}" for e in result["errors"]))
    return {**result, "met": not result["errors"] and result["newest_samples_won"]}


# --------------------------------------------------------------- signature
def run_signature(bundle: Path, work: Path, repeats: int = 100) -> dict:
    """Open the same bundle signed and unsigned (directory and .zip) in one process and compare medians, and
    the first open in a fresh process (what one device command pays, importing the Ed25519 code included)."""
    from edgetailor.toolkit.bundle import Bundle, sign_bundle, zip_bundle
    from edgetailor.toolkit.signing import generate_key

    unsigned = work / "sig-unsigned"
    signed = work / "sig-signed"
    for path in (unsigned, signed):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(bundle, path)
        (path / "signature.json").unlink(missing_ok=True)
    generate_key(work / "sig-key")
    sign_bundle(signed, work / "sig-key")
    rows = []
    for form in ("directory", "zip"):
        paths = {"unsigned": unsigned, "signed": signed}
        if form == "zip":
            paths = {k: zip_bundle(v, v.with_name(v.name + ".zip")) for k, v in paths.items()}
        samples = {label: [] for label in paths}
        for path in paths.values():
            Bundle.open(path).close()
        for _ in range(repeats):       # interleaved, so that drift in the machine's speed hits both alike
            for label, path in paths.items():
                started = time.perf_counter()
                Bundle.open(path).close()
                samples[label].append(time.perf_counter() - started)
        times = {label: statistics.median(values) * 1000 for label, values in samples.items()}
        rows.append({"form": form, "unsigned ms": times["unsigned"], "signed ms": times["signed"],
                     "added ms": times["signed"] - times["unsigned"]})
    # A device command is a fresh process: its first signed open also imports the Ed25519 code.
    probe = ("import sys, time; sys.path.insert(0, sys.argv[2]); from edgetailor.toolkit.bundle import Bundle; "
             "t = time.perf_counter(); Bundle.open(sys.argv[1]).close(); print((time.perf_counter() - t) * 1000)")
    first = {label: [] for label in ("unsigned", "signed")}
    for _ in range(7):
        for label, path in (("unsigned", unsigned), ("signed", signed)):
            out = subprocess.run([sys.executable, "-c", probe, str(path), str(ROOT)], capture_output=True, text=True)
            first[label].append(float(out.stdout))
    first_ms = {k: statistics.median(v) for k, v in first.items()}
    rows.append({"form": "directory, first open in a fresh process", "unsigned ms": first_ms["unsigned"],
                 "signed ms": first_ms["signed"], "added ms": first_ms["signed"] - first_ms["unsigned"]})
    print(format_table(rows, [("form", "bundle", ""), ("unsigned ms", "open unsigned ms", ".2f"),
                              ("signed ms", "open signed ms", ".2f"), ("added ms", "added ms", ".2f")]))
    worst = max(r["added ms"] for r in rows)
    return {"rows": rows, "added_ms": worst, "met": worst <= 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "security")
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: the default GE, pretrained once)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run: {','.join(SECTIONS)}")
    parser.add_argument("--fuzz", type=int, default=10_000, help="inputs per loader (goal: >= 10,000)")
    parser.add_argument("--moments", type=int, default=20, help="kill -9 moments (goal: >= 20)")
    parser.add_argument("--processes", type=int, default=4, help="concurrent personalizes")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(args.out, args.model)
    results_path = args.out / "security.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetailor-security-") as tmp:
        work = Path(tmp)
        for section in sections:
            print(f"\n== {section} ==", flush=True)
            t = time.perf_counter()
            if section == "attacks":
                results[section] = run_attacks(bundle, work)
            elif section == "fuzz":
                results[section] = run_fuzz(bundle, work, args.fuzz)
                for row in results[section]["rows"]:    # keep the failing inputs for a look
                    for kind, path in row["examples"].items():
                        kept = args.out / "fuzz-failures" / Path(path).name
                        kept.parent.mkdir(exist_ok=True)
                        shutil.copy(path, kept)
                        row["examples"][kind] = str(kept.relative_to(ROOT))
            elif section == "bombs":
                results[section] = run_bombs(bundle, work)
            elif section == "kill":
                results[section] = run_kill(bundle, work, args.moments)
            elif section == "concurrent":
                results[section] = run_concurrent(bundle, work, args.processes)
            elif section == "signature":
                results[section] = run_signature(bundle, work)
            results[section]["seconds"] = round(time.perf_counter() - t, 1)
    summary = [{"target": name, "met": results[name]["met"], "seconds": results[name]["seconds"]}
               for name in SECTIONS if name in results]
    print("\n" + format_table(summary, [("target", "target", ""), ("met", "met", ""), ("seconds", "s", ".0f")]))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
