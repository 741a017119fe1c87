"""Benchmark of the device backends on one bundle, against the torch reference in the same run.

    python benchmarks/backends.py [--users 3] [--model GE_DIR] [--out benchmarks/results/backends]

Pretrains the default GE (LeNet-5 on the built-in digits) unless --model is
given, exports one bundle with every format, then, for each backend in its
own process (so that peak RSS is that backend's alone): GE latency at batch 1
(median of 300 single-image calls), personalization of the same simulated
users (wall time, median over users), accuracy on each user's test set and on
the generic test set, peak RSS, whether torch was imported. Also the bundle
size per format, and a small conv net (LeNet-5, batch 32) trained in
ExecuTorch against torch: ms per step, and the gradient error with and
without the max-pool workaround (docs/upstream/executorch-training.md).

Prints one table and the targets; writes OUT/backends.json.
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

BACKENDS = ("ort", "executorch", "litert", "torch")


def child(bundle: str, backend: str, samples: Path, users: int) -> dict:
    """One backend, in a fresh process that loads only what a device would
    (the runtime and the users' sample files): latency, personalization,
    accuracy, peak memory."""
    import numpy as np

    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.loaders import load_samples
    from edgetailor.toolkit.memory import peak_rss_mb

    generic = load_samples(samples / "generic_test.npz")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for user_id in range(users):
            with DeviceRuntime.open(bundle, Path(tmp) / str(user_id), backend) as rt:
                if not rows:  # GE latency once per backend
                    x = rt.manifest.input.normalize(generic.images[:300])
                    for i in range(20):
                        rt.ge.run(x[i:i + 1])
                    times = []
                    for i in range(len(x)):
                        started = time.perf_counter()
                        rt.ge.run(x[i:i + 1])
                        times.append(time.perf_counter() - started)
                    latency_ms = 1000 * statistics.median(times)
                    logits, _ = rt.ge.run(x[:64])
                    trainer = rt.trainer.name
                rt.add_dataset(load_samples(samples / f"user{user_id}_train.npz"))
                report = rt.personalize()
                rows.append({"seconds": report["seconds"], "le_loss": report["le_loss"],
                             "user": rt.evaluate_dataset(load_samples(samples / f"user{user_id}_test.npz"))["accuracy"],
                             "generic": rt.evaluate_dataset(generic)["accuracy"]})
    return {"backend": backend, "trainer": trainer, "ge_latency_ms": latency_ms,
            "personalize_s": statistics.median(r["seconds"] for r in rows),
            "user_accuracy": float(np.mean([r["user"] for r in rows])),
            "generic_accuracy": float(np.mean([r["generic"] for r in rows])),
            "per_user": rows, "logits": logits.tolist(),
            "peak_rss_mb": peak_rss_mb(),  # VmHWM: ru_maxrss would carry this parent's peak over
            "torch_imported": "torch" in sys.modules}


def conv_net_trial(steps: int = 20, batch: int = 32) -> dict:
    """LeNet-5 trained in ExecuTorch and in torch, the first trial's setting."""
    import copy

    import torch
    import torch.nn.functional as F

    from edgetailor.export.trainable import executorch_training_program
    from edgetailor.toolkit.data import load_generic_digits
    from edgetailor.server_side.models import LeNet5
    from edgetailor.toolkit.native_output import quiet_native_output

    with quiet_native_output():
        from executorch.exir import to_edge
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
        from torch.export.experimental import _export_forward_backward

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = load_generic_digits()
    x = torch.as_tensor(data.images[:batch * steps, None] / 255.0, dtype=torch.float32)
    y = torch.as_tensor(data.labels[:batch * steps])
    net = LeNet5()

    def gradient_error(buffer: bytes) -> float:
        program = _load_for_executorch_from_buffer(buffer)
        at = program.run_method("__et_training_gradients_index_forward", ())[0]
        end = program.run_method("__et_training_parameters_index_forward", ())[0]
        names = [n.removeprefix("part.") for n in program.run_method("__et_training_fqn_forward", ())]
        grads = dict(zip(names, program.run_method("forward", (x[:batch], y[:batch]))[at:end]))
        reference = copy.deepcopy(net)
        F.cross_entropy(reference(x[:batch]), y[:batch]).backward()
        return max(float((grads[n] - p.grad).abs().max()) for n, p in reference.named_parameters())

    fixed = executorch_training_program(net, [x[:batch]], y[:batch], max_batch=batch)

    class WithLoss(torch.nn.Module):
        def __init__(self, part):
            super().__init__()
            self.part = part

        def forward(self, inputs, target):
            logits = self.part(inputs)
            return F.cross_entropy(logits, target), logits.detach()

    with quiet_native_output():
        upstream = to_edge(_export_forward_backward(torch.export.export(
            WithLoss(copy.deepcopy(net)), (x[:batch], y[:batch]), strict=True))).to_executorch().buffer
    program = _load_for_executorch_from_buffer(fixed)
    started = time.perf_counter()
    for step in range(steps):
        program.run_method("forward", (x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]),
                           clone_outputs=False)
    et_ms = 1000 * (time.perf_counter() - started) / steps
    reference = copy.deepcopy(net)
    started = time.perf_counter()
    for step in range(steps):
        reference.zero_grad()
        F.cross_entropy(reference(x[step * batch:(step + 1) * batch]), y[step * batch:(step + 1) * batch]).backward()
    torch_ms = 1000 * (time.perf_counter() - started) / steps
    return {"executorch_ms_per_step": et_ms, "torch_ms_per_step": torch_ms, "slowdown": et_ms / torch_ms,
            "gradient_error_upstream_export": gradient_error(upstream),
            "gradient_error_with_workaround": gradient_error(fixed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GE checkpoint (default: pretrain the default recipe)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "backends")
    parser.add_argument("--child", nargs=3, metavar=("BUNDLE", "BACKEND", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]), args.users)))
        return 0

    import numpy as np

    from edgetailor.device.backends import BACKENDS as BACKEND_INFO
    from edgetailor.export.bundle import export_bundle
    from edgetailor.toolkit.formats import FORMATS
    from edgetailor.toolkit.manifest import Manifest
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit import atomic
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.data import load_generic_digits, split_generic
    from edgetailor.toolkit.tables import format_table
    from edgetailor.toolkit.loaders import save_npz
    from edgetailor.toolkit.users import simulate_users

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.out / "ge"
        if not (model / "meta.json").exists():
            print("pretraining the default GE ...", flush=True)
            pretrain(model, load_recipe("default"), overwrite=True)
    print("exporting one bundle with every format ...", flush=True)
    started = time.perf_counter()
    bundle = export_bundle(model, args.out / "bundle", formats=list(FORMATS), make_zip=False, overwrite=True)
    export_s = time.perf_counter() - started
    manifest = Manifest.from_json((bundle / "manifest.json").read_text())
    sizes = {name: sum((bundle / f).stat().st_size for f in entry.files) / 1024
             for name, entry in manifest.formats.items()}

    split = split_generic(load_generic_digits(), seed=args.seed)
    samples = args.out / "users"
    samples.mkdir(exist_ok=True)
    save_npz(split.test, samples / "generic_test.npz")
    for person in simulate_users(split.user_pool, args.users, seed=args.seed, train_per_class=10, test_per_class=20):
        save_npz(person.train, samples / f"user{person.user_id}_train.npz")
        save_npz(person.test, samples / f"user{person.user_id}_test.npz")

    results = {}
    for backend in BACKENDS:
        print(f"{backend}: GE latency, personalizing {args.users} users ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(bundle), backend, str(samples),
                               "--users", str(args.users)], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("ExecuTorch training of a small conv net ...", flush=True)
    trial = conv_net_trial()

    ref = results["torch"]
    rows = []
    for backend, r in results.items():
        logit_diff = float(np.abs(np.array(r["logits"]) - np.array(ref["logits"])).max())
        rows.append({"backend": backend, "GE format": manifest.global_expert.files[BACKEND_INFO[backend].format],
            "trains with": r["trainer"], "GE ms b1": r["ge_latency_ms"],
            "x torch": r["ge_latency_ms"] / ref["ge_latency_ms"],
            "personalize s": r["personalize_s"], "x torch ": r["personalize_s"] / ref["personalize_s"],
            "peak RSS MB": r["peak_rss_mb"], "x torch  ": r["peak_rss_mb"] / ref["peak_rss_mb"],
            "user acc": r["user_accuracy"], "generic acc": r["generic_accuracy"], "|logits-torch|": logit_diff,
            "torch imported": "yes" if r["torch_imported"] else "no"})
    columns = [("backend", "backend", ""), ("GE format", "GE file", ""), ("trains with", "trains with", ""),
               ("GE ms b1", "GE ms b1", ".3f"), ("x torch", "x torch", ".2f"),
               ("personalize s", "personalize s", ".3f"),
               ("x torch ", "x torch", ".2f"), ("peak RSS MB", "peak RSS MB", ".0f"), ("x torch  ", "x torch", ".2f"),
               ("user acc", "user acc", ".4f"), ("generic acc", "generic acc", ".4f"),
               ("|logits-torch|", "|logits-torch|", ".1e"), ("torch imported", "torch?", "")]
    print()
    print(format_table(rows, columns))
    print()
    print(format_table([{"format": n, "runtime": FORMATS[n].runtime, "files": len(manifest.formats[n].files),
                         "KiB": s} for n, s in sizes.items()],
                       [("format", "format", ""), ("runtime", "runtime", ""), ("files", "files", "d"),
                        ("KiB", "KiB", ".0f")]))
    print(f"\nExecuTorch conv-net training (LeNet-5, batch 32): {trial['executorch_ms_per_step']:.1f} ms/step vs torch "
          f"{trial['torch_ms_per_step']:.1f} ({trial['slowdown']:.0f}x); max gradient error vs torch "
          f"{trial['gradient_error_upstream_export']:.3g} with the upstream export, "
          f"{trial['gradient_error_with_workaround']:.1e} with the max-pool workaround")

    candidates = {b: r for b, r in results.items() if b != "torch"}
    fastest = min(candidates, key=lambda b: candidates[b]["personalize_s"])
    accuracies = [r["user_accuracy"] for r in results.values()]
    max_logit = max(r["|logits-torch|"] for r in rows)
    targets = [
        {"target": f"fastest backend ({fastest}) personalizes at least as fast as torch", "goal": "<= 1.00x",
         "measured": candidates[fastest]["personalize_s"] / ref["personalize_s"],
         "met": candidates[fastest]["personalize_s"] <= ref["personalize_s"]},
        {"target": "its peak RSS vs torch's", "goal": "<= 0.33x",
         "measured": candidates[fastest]["peak_rss_mb"] / ref["peak_rss_mb"],
         "met": candidates[fastest]["peak_rss_mb"] <= ref["peak_rss_mb"] / 3},
        {"target": "fp32 GE logits, max |difference| to torch", "goal": "<= 1e-4", "measured": max_logit,
         "met": max_logit <= 1e-4},
        {"target": "user accuracy spread across backends, points", "goal": "<= 1.0",
         "measured": 100 * (max(accuracies) - min(accuracies)), "met": max(accuracies) - min(accuracies) <= 0.01},
    ]
    for t in targets:
        t["met"] = "yes" if t["met"] else "NO"
    print()
    print(format_table(targets, [("target", "target", ""), ("goal", "goal", ""), ("measured", "measured", ".3g"),
                                 ("met", "met", "")]))
    result = {"benchmark": "backends", "cpu_count": os.cpu_count(), "users": args.users, "seed": args.seed,
              "export_seconds": export_s, "bundle_kib": sizes, "backends": rows, "targets": targets,
              "conv_net_trial": trial, "per_user": {b: r["per_user"] for b, r in results.items()}}
    atomic.write_text(args.out / "backends.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out / 'backends.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
