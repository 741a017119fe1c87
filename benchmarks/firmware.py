"""Benchmark of the C firmware (firmware_examples/) against the Python device
runtime, on the same bundles, users and seed, in one run.

    python benchmarks/firmware.py [--users 5] [--real-users 3] [--qemu-users 2] [--model GE_DIR]
                                  [--out benchmarks/results/firmware]

Pretrains the default GE unless --model is given, compresses it to int8
(`server compress`'s int8 stages, ONNX only), and exports a microcontroller
bundle of each, with 50 replay glyphs (`export bundle --replay-size 50`: the
300 of a phone bundle are 235 KB, more than the flash budget). Each bundle
becomes a C project (`export firmware`), built for the host (`make host`) and
for a Cortex-M4 (`make cortex-m4`; the fp32 image links against a 1 MB flash,
since its 247 KB of weights cannot fit the 128 KB one).

Users: simulated writers as benchmarks/backends.py makes them and real MNIST
writers (toolkit/real_users.py), each with 10 samples per label to train and
the rest to test. For each user and bundle, the Python runtime (`ort`
backend) and the host build personalize the same samples with the same seed
and answer the same test samples; --qemu-users of them also run on the
Cortex-M4 image under QEMU (mps2-an386, `-icount`), which counts
instructions. RAM is the image's data and bss (the static arena included)
plus the stack measured by painting, while personalizing 100 samples.

Targets (issue 16): fp32 GE logits within 1e-4 of Python's, host and QEMU;
the int8 GE's top-1 answers agree with the Python int8 bundle's on >= 99 %;
after personalizing, user accuracy within 1 point of Python's and >= 98 % of
the answers the same, on simulated and real writers; the int8 image <= 128 KB
of flash and <= 64 KB of RAM; instructions per training sample and per
inference, with an estimate for 100 samples at 80 MHz. Prints one table and
the targets; writes OUT/firmware.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "firmware_examples" / "scripts"))

REPLAY = 50
INT8_RECIPE = """description = "int8 for the firmware benchmark: server compress's int8 stage, ONNX only"
[[stage]]
kind = "quantize"
weight_bits = 8
rounding = "nearest"
calibration_samples = 256

[export]
formats = ["onnx"]
"""


def make(project: Path, *args: str) -> str:
    proc = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(project), *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"make {' '.join(args)} in {project} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def image_size(elf: Path) -> dict[str, int]:
    """Flash (text + data's load image) and static RAM (data + bss) of a linked image, from arm-none-eabi-size."""
    out = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True).stdout
    sections = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    flash = sections.get(".text", 0) + sections.get(".ARM.exidx", 0) + sections.get(".data", 0)
    return {"flash": flash, "static_ram": sections.get(".data", 0) + sections.get(".bss", 0),
            "text": sections.get(".text", 0), "data": sections.get(".data", 0), "bss": sections.get(".bss", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5, help="simulated writers")
    parser.add_argument("--real-users", type=int, default=3, help="real MNIST writers (toolkit/real_users.py)")
    parser.add_argument("--qemu-users", type=int, default=2, help="users also run on the Cortex-M4 image under QEMU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "firmware")
    args = parser.parse_args()

    import parity  # firmware_examples/scripts/parity.py
    from common import default_ge  # benchmarks/common.py, beside this script
    from edgetailor.app.compress import compress
    from edgetailor.export.bundle import export_bundle
    from edgetailor.export.firmware import export_firmware
    from edgetailor.server_side.compress.recipe import load_compress_recipe
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.real_users import load_mnist_5k, split_real_users
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.users import simulate_users

    for tool, package in (("cc", "gcc"), ("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),
                          ("qemu-system-arm", "qemu-system-arm"), ("make", "make")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {package}")
    args.out.mkdir(parents=True, exist_ok=True)
    model = default_ge(args.out, args.model)

    # ---------------------------------------------------------------- bundles and projects
    int8_ge = args.out / "ge-int8"
    if not (int8_ge / "model.json").exists():
        print("compressing GE to int8 ...", flush=True)
        recipe = args.out / "int8-onnx.toml"
        recipe.write_text(INT8_RECIPE)
        compress(model, load_compress_recipe(str(recipe)), int8_ge, n_users=0, overwrite=True)
    bundles, projects = {}, {}
    for kind, ge in (("fp32", model), ("int8", int8_ge)):
        print(f"exporting the {kind} bundle ({REPLAY} replay glyphs) and its C project ...", flush=True)
        bundles[kind] = export_bundle(ge, args.out / f"bundle-{kind}", formats=["onnx"], replay_size=REPLAY,
                                      make_zip=False, overwrite=True)
        projects[kind] = args.out / f"firmware-{kind}"
        export_firmware(bundles[kind], projects[kind], overwrite=True)
        make(projects[kind], "host")
        # fp32: 247 KB of weights cannot fit 128 KB; link it where it fits to measure it
        make(projects[kind], "cortex-m4", f"FLASH_KB={128 if kind == 'int8' else 1024}", "RAM_KB=64")

    # ---------------------------------------------------------------- users
    users = []
    split = split_generic(load_generic_digits(), seed=args.seed)
    for person in simulate_users(split.user_pool, args.users, seed=args.seed, train_per_class=10, test_per_class=20):
        users.append((f"simulated {person.user_id}", "simulated", person.train, person.test))
    if args.real_users:
        for i, person in enumerate(split_real_users(load_mnist_5k(), n_users=9, seed=args.seed)[:args.real_users]):
            users.append((f"real writer {i}", "real", person.train, person.test))

    rows, results = [], []
    samples_dir = args.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    for index, (name, group, train, test) in enumerate(users):
        slug = name.replace(" ", "-")
        for kind in ("fp32", "int8"):
            train_file = parity.write_samples(samples_dir / f"{slug}-{kind}-train.etsm", bundles[kind], train.images,
                                              train.labels)
            test_file = parity.write_samples(samples_dir / f"{slug}-{kind}-test.etsm", bundles[kind], test.images,
                                             test.labels)
            print(f"{name}, {kind}: Python, C on the host"
                  + (", C on the Cortex-M4 under QEMU" if index < args.qemu_users else "") + " ...", flush=True)
            py = parity.python_reference(bundles[kind], train.images, train.labels, test.images,
                                         {"seed": args.seed})
            work = args.out / "runs" / f"{slug}-{kind}"
            c = parity.run_example(projects[kind], train_file, test_file, work / "host",
                                   options=["--seed", str(args.seed)])
            row = {"user": name, "group": group, "ge": kind, "n_train": len(train.labels), "n_test": len(test.labels),
                   **parity.compare(py, c, test.labels), "py_seconds": py["seconds"],
                   "host_seconds": c["seconds"]["personalize"], "host_inference_seconds":
                       c["seconds"]["per_inference_ge"]}
            if index < args.qemu_users:
                board = parity.run_example(projects[kind], train_file, test_file, work / "qemu", qemu=True,
                                           options=["--seed", str(args.seed)], timeout=3600,
                                           flash_kb=128 if kind == "int8" else 1024)
                qemu_cmp = parity.compare(py, board, test.labels)
                row.update({"qemu_logits_max_abs_diff": qemu_cmp["logits_max_abs_diff"],
                            "qemu_ge_top1_agreement": qemu_cmp["ge_top1_agreement"],
                            "qemu_agreement": qemu_cmp["agreement"], "qemu_after": qemu_cmp["c_after"],
                            "qemu_host_agreement": float((board["dump"]["after"] == c["dump"]["after"]).mean()),
                            "instructions": board["instructions"], "static_ram_bytes": board["static_ram_bytes"],
                            "stack_peak_bytes": board["stack_peak_bytes"],
                            "arena_peak_bytes": board["arena_peak_bytes"],
                            "qemu_wall_seconds": board["wall_seconds"]})
            rows.append(row)
            results.append(row)

    # ---------------------------------------------------------------- figures
    sizes = {kind: image_size(projects[kind] / "example-cortex-m4.elf") for kind in projects}

    def pooled(kind: str, key: str, group: str | None = None) -> float:
        chosen = [r for r in rows if r["ge"] == kind and (group is None or r["group"] == group)]
        return sum(r[key] * r["n_test"] for r in chosen) / sum(r["n_test"] for r in chosen)

    def worst(kind: str, key: str, group: str | None = None, qemu: bool = False) -> float:
        chosen = [r[key] for r in rows if r["ge"] == kind and (group is None or r["group"] == group)
                  and (not qemu or key in r)]
        return max(chosen) if chosen else float("nan")

    def mean_gap(kind: str, group: str) -> float:
        chosen = [r for r in rows if r["ge"] == kind and r["group"] == group]
        return abs(statistics.fmean(r["py_after"] for r in chosen) - statistics.fmean(r["c_after"] for r in chosen))

    qemu_rows = [r for r in rows if "instructions" in r]
    q8 = [r for r in qemu_rows if r["ge"] == "int8"]
    q32 = [r for r in qemu_rows if r["ge"] == "fp32"]
    per_sample_8 = statistics.median(r["instructions"]["per_training_sample"] for r in q8) if q8 else float("nan")
    per_inference_8 = statistics.median(r["instructions"]["per_inference_ge"] for r in q8) if q8 else float("nan")
    per_sample_32 = statistics.median(r["instructions"]["per_training_sample"] for r in q32) if q32 else float("nan")
    per_inference_32 = statistics.median(r["instructions"]["per_inference_ge"] for r in q32) if q32 else float("nan")
    ram_8 = max(r["static_ram_bytes"] + r["stack_peak_bytes"] for r in q8) if q8 else float("nan")
    ram_32 = max(r["static_ram_bytes"] + r["stack_peak_bytes"] for r in q32) if q32 else float("nan")
    host_sample = statistics.median(r["host_seconds"] / r["n_train"] for r in rows if r["ge"] == "int8")
    host_inference = statistics.median(r["host_inference_seconds"] for r in rows if r["ge"] == "int8")

    print()
    print(format_table(rows, [("user", "user", "<"), ("ge", "GE", "<"), ("n_test", "test n", "d"),
                              ("logits_max_abs_diff", "GE logits |diff|", ".1e"),
                              ("ge_top1_agreement", "GE top-1 agree", ".3f"),
                              ("py_before", "GE acc.", ".3f"), ("py_after", "Python acc.", ".3f"),
                              ("c_after", "C acc.", ".3f"), ("agreement", "answers agree", ".3f"),
                              ("experts_agreement", "experts agree", ".3f"),
                              ("py_seconds", "Python s", ".2f"), ("host_seconds", "C host s", ".2f")]))
    for kind in ("int8", "fp32"):
        print(f"{kind} image: {sizes[kind]['flash'] / 1024:.1f} KB flash ({sizes[kind]['text']:,} text + "
              f"{sizes[kind]['data']:,} data), {sizes[kind]['static_ram'] / 1024:.1f} KB static RAM")
    targets = []
    logits_host = worst("fp32", "logits_max_abs_diff")
    logits_qemu = worst("fp32", "qemu_logits_max_abs_diff", qemu=True)
    targets.append(("fp32 GE logits within 1e-4 of Python (host, QEMU)",
                    f"largest difference {logits_host:.2g} on the host, {logits_qemu:.2g} under QEMU "
                    f"({sum(r['n_test'] for r in rows if r['ge'] == 'fp32'):,} test glyphs)",
                    logits_host <= 1e-4 and logits_qemu <= 1e-4))
    top1 = pooled("int8", "ge_top1_agreement")
    targets.append(("int8 GE top-1 agrees with the Python int8 bundle >= 99 %",
                    f"{top1:.4f} (host; largest logit difference {worst('int8', 'logits_max_abs_diff'):.2g})",
                    top1 >= 0.99))
    for group, label in (("simulated", "simulated users"), ("real", "real writers")):
        for kind in ("fp32", "int8"):
            if not any(r["group"] == group for r in rows):
                continue
            agree = pooled(kind, "agreement", group)
            gap = mean_gap(kind, group)
            lowest = min(r["agreement"] for r in rows if r["ge"] == kind and r["group"] == group)
            targets.append((f"{label}, {kind}: accuracy within 1 point, answers agree >= 98 %",
                            f"accuracy gap {100 * gap:.2f} points (mean over users; largest user "
                            f"{100 * worst(kind, 'accuracy_gap', group):.2f}), answers agree {agree:.4f} "
                            f"(lowest user {lowest:.3f})",
                            gap <= 0.01 and agree >= 0.98))
    targets.append(("int8 image flash <= 128 KB (code, GE, replay, LE/GN)",
                    f"{sizes['int8']['flash'] / 1024:.1f} KB; fp32 image {sizes['fp32']['flash'] / 1024:.1f} KB",
                    sizes["int8"]["flash"] <= 128 * 1024))
    targets.append(("int8 peak RAM personalizing 100 samples <= 64 KB (data, bss with the arena, painted stack)",
                    f"{ram_8 / 1024:.1f} KB; fp32 {ram_32 / 1024:.1f} KB", ram_8 <= 64 * 1024))
    estimate_8 = 100 * per_sample_8 / 80e6
    targets.append(("cost per training sample and per inference (QEMU instructions, host time)",
                    f"int8: {per_sample_8 / 1e6:.1f} M instructions per training sample, {per_inference_8 / 1e6:.2f} M "
                    f"per inference; fp32: {per_sample_32 / 1e6:.1f} M and {per_inference_32 / 1e6:.2f} M; host "
                    f"{1000 * host_sample:.1f} ms per sample, {1e6 * host_inference:.0f} us per inference. Estimate: "
                    f"100 samples at 80 MHz and 1 instruction per cycle ~ {estimate_8:.0f} s (int8; an estimate)",
                    True))
    print()
    print(format_table([{"target": t, "measured": m, "met": "yes" if ok else "NO"} for t, m, ok in targets],
                       [("target", "target", "<"), ("measured", "measured", "<"), ("met", "met", "<")]))
    atomic.write_text(args.out / "firmware.json", json.dumps({
        "users": results, "images": sizes, "replay": REPLAY, "seed": args.seed,
        "estimate_100_samples_80mhz_seconds": {"int8": estimate_8, "fp32": 100 * per_sample_32 / 80e6},
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1, default=float))
    print(f"\nwrote {args.out / 'firmware.json'}")
    return 0 if all(ok for _, _, ok in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
