"""``edgetailor demo``: the whole loop on built-in data, with the baselines.

pretrain GE -> export a signed bundle -> for each simulated user: personalize in a
separate device process (the CLI, torch-free, as a phone would run it) ->
evaluate GE and GE+LE+GN on the user's test set and on the generic test set
-> fine-tune all of GE, and GE's last layer, on the same samples as baselines
-> one table (stdout), report.json and report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetailor.toolkit import atomic
from edgetailor.toolkit.config import load_recipe
from edgetailor.toolkit.data import LabeledImages, load_generic_digits, split_generic
from edgetailor.toolkit.errors import CheckpointError, EdgetailorError
from edgetailor.toolkit.loaders import save_npz
from edgetailor.toolkit.manifest import Manifest
from edgetailor.toolkit.signing import PRIVATE_KEY, PUBLIC_KEY, generate_key, load_public_keys
from edgetailor.toolkit.tables import format_table
from edgetailor.toolkit.users import simulate_users

METHODS = ("GE", "GE+LE+GN", "FT all", "FT last")


def device_cli(*args: str) -> dict:
    """Run ``edgetailor device ...`` in a fresh process; returns its --json
    output plus the process's whole wall time (start-up and bundle checks too)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgetailor.app.cli", "device", *args, "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgetailorError(f"the device process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
                              hint="run the same `edgetailor device personalize` command by hand to see it fail")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - started}


def overhead_of(manifest: Manifest) -> dict:
    """LE's and GN's cost against GE's, as the demos report it."""
    ge, le, gn = manifest.global_expert, manifest.local_expert, manifest.gating_network
    overhead = {"ge_params": ge.params, "ge_macs": ge.macs, "le_gn_params": le.params + gn.params,
                "le_gn_macs": le.macs + gn.macs}
    overhead["params_pct"] = 100.0 * overhead["le_gn_params"] / overhead["ge_params"]
    overhead["macs_pct"] = 100.0 * overhead["le_gn_macs"] / overhead["ge_macs"]
    return overhead


def compare_on_user(bundle_zip: Path, trusted: Path, state: Path, samples: Path, user_test: LabeledImages,
                    generic_test: LabeledImages, baselines: dict[str, Callable[[LabeledImages], float]]) -> dict:
    """One user's row of a demo's table: personalize from ``samples`` in a fresh device process (a fresh
    state), then GE and GE+LE+GN on the user's and the generic test sets, and each fine-tuned baseline
    (``baselines``: "FT all", "FT last" -> its accuracy on a data set)."""
    from edgetailor.device.runtime import DeviceRuntime

    if state.exists():
        shutil.rmtree(state)
    personalized = device_cli("personalize", "--bundle", str(bundle_zip), "--state", str(state),
                              "--samples", str(samples), "--backend", "ort", "--trusted-keys", str(trusted))
    with DeviceRuntime.open(bundle_zip, state, "ort", trusted_keys=trusted) as runtime:
        on_user = runtime.evaluate_dataset(user_test)
        on_generic = runtime.evaluate_dataset(generic_test)
    return {
        "GE user": on_user["ge_only_accuracy"], "GE+LE+GN user": on_user["accuracy"],
        **{f"{name} user": accuracy(user_test) for name, accuracy in baselines.items()},
        "GE generic": on_generic["ge_only_accuracy"], "GE+LE+GN generic": on_generic["accuracy"],
        **{f"{name} generic": accuracy(generic_test) for name, accuracy in baselines.items()},
        "LE share user": on_user["experts"]["LE"] / on_user["n"],
        "LE share generic": on_generic["experts"]["LE"] / on_generic["n"],
        "personalize s": personalized["seconds"], "train s": personalized["train_seconds"],
        "device process s": personalized["process_seconds"], "peak RSS MB": personalized["peak_rss_mb"],
        "torch imported": personalized["torch_imported"]}


def summarize(rows: list[dict]) -> tuple[dict, str]:
    """The mean row (the largest RSS, not the mean) and the table people read."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
            and k not in ("user", "n_train", "n_test")]
    mean = {"user": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    mean["peak RSS MB"] = float(max(r["peak RSS MB"] for r in rows))
    columns = [("user", "user", ""), *[(f"{m} user", f"{m} user", ".3f") for m in METHODS],
               *[(f"{m} generic", f"{m} gen.", ".3f") for m in METHODS],
               ("personalize s", "pers. s", ".2f"), ("peak RSS MB", "RSS MB", ".0f")]
    return mean, format_table([*rows, mean], columns)


def _signer_id(key_dir: Path) -> str:
    return load_public_keys(key_dir / PUBLIC_KEY)[0].id


def _accuracy(model, ckpt, data: LabeledImages) -> float:
    import torch

    with torch.no_grad():
        return float((model(ckpt.normalize(data.images)).argmax(1).numpy() == data.labels).mean())


def plot_report(report: dict, path: Path, ylim: tuple[float, float] = (0.4, 1.0)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = report["users"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.2
    x = np.arange(len(users))
    for ax, (suffix, title) in zip(axes, (("user", "user's test set"), ("generic", "generic test set"))):
        for i, method in enumerate(METHODS):
            ax.bar(x + (i - 1.5) * width, [u[f"{method} {suffix}"] for u in users], width, label=method)
        ax.set_xticks(x, [f"user {u['user']}" for u in users], rotation=30 if len(users) > 6 else 0)
        ax.set_title(f"accuracy on the {title}")
        ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(METHODS), frameon=False)
    o = report["overhead"]
    fig.suptitle(f"edgetailor: GE frozen + LE/GN ({o['params_pct']:.2f} % params, {o['macs_pct']:.2f} % MACs of GE)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path, recipe: str = "default", n_users: int = 5, samples_per_class: int = 10,
             seed: int = 0, echo: Callable[[str], None] = print, model_dir: str | Path | None = None,
             env: Any = None) -> dict:
    """The loop on built-in data; ``model_dir`` runs it with an existing GE
    checkpoint (an expanded learngene, a compressed GE) instead of pretraining one.
    ``env`` (a server-side TrainingEnv) says where GE trains; under torchrun
    the other processes help pretrain and return, rank 0 runs the rest."""
    import click
    import torch

    from edgetailor.export.bundle import export_bundle
    from edgetailor.server_side.checkpoint import GECheckpoint
    from edgetailor.server_side.environment import CPU
    from edgetailor.server_side.finetune import finetune
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.app.progress import ProgressBars

    env = env or CPU
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_recipe(recipe)
    cfg.pretrain.seed = seed
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()

    data = load_generic_digits()
    if model_dir is None:
        echo(f"[1/4] pretraining the Global Expert ({cfg.pretrain.arch}, {cfg.pretrain.epochs} epochs) "
             "on built-in digits")
        bars = ProgressBars(enabled=env.is_main)
        ckpt = pretrain(out / "ge", cfg, data, progress=lambda d, n: bars("pretrain", d, n), overwrite=True, env=env)
        bars.close()
        if not env.is_main:
            return {}
        model_dir = out / "ge"
    else:
        ckpt = GECheckpoint.load(model_dir)
        if ckpt.meta.data.get("sha256") != data.fingerprint():
            raise CheckpointError(f"the GE in {model_dir} was not trained on the built-in digits",
                                  hint="the demo simulates users from the built-in digits; give a GE trained on them")
        # users come from the pool this GE never saw: split as it was split
        seed = ckpt.meta.seed
        echo(f"[1/4] using the Global Expert in {model_dir} ({ckpt.meta.arch})")
    echo(f"  generic test accuracy {ckpt.meta.generic_accuracy:.4f}")

    echo("[2/4] exporting the device bundle, signed")
    key_dir = out / "keys"
    if not (key_dir / PRIVATE_KEY).exists():
        generate_key(key_dir)   # a real publisher keeps this key on the build server, off the devices
    bundle_dir = export_bundle(model_dir, out / "bundle", overwrite=True, signing_key=key_dir / PRIVATE_KEY)
    trusted = key_dir / PUBLIC_KEY
    bundle_zip = bundle_dir.with_name(bundle_dir.name + ".zip")
    manifest = Manifest.from_json((bundle_dir / "manifest.json").read_text())
    echo(f"  signed with {key_dir / PRIVATE_KEY}; each device pins {trusted} and refuses bundles it did not sign")
    echo("  carries " + ", ".join(f"{name} ({sum((bundle_dir / f).stat().st_size for f in entry.files) / 1024:.0f} KiB)"
                                  for name, entry in manifest.formats.items())
         + "; the users below run on onnx (ONNX Runtime)")
    overhead = overhead_of(manifest)

    echo(f"[3/4] simulating {n_users} users ({samples_per_class} samples per class each)")
    split = split_generic(data, seed=seed)
    users = simulate_users(split.user_pool, n_users, seed=seed, train_per_class=samples_per_class)
    (out / "users").mkdir(exist_ok=True)
    generic_path = out / "users" / "generic_test.npz"
    save_npz(split.test, generic_path)

    echo("[4/4] personalizing each user on the device runtime, and the fine-tuning baselines")
    rows = []
    with click.progressbar(users, label="  users", file=sys.stderr) as bar:
        for user in bar:
            train_path = out / "users" / f"user{user.user_id}_train.npz"
            test_path = out / "users" / f"user{user.user_id}_test.npz"
            save_npz(user.train, train_path)
            save_npz(user.test, test_path)
            x, y = ckpt.normalize(user.train.images), torch.as_tensor(user.train.labels)
            tuned = {"FT all": finetune(ckpt.model, x, y, "all", seed=seed),
                     "FT last": finetune(ckpt.model, x, y, "last", seed=seed)}
            baselines = {name: partial(_accuracy, model, ckpt) for name, model in tuned.items()}
            rows.append({"user": user.user_id, "style": user.describe(), "n_train": len(user.train),
                         "n_test": len(user.test),
                         **compare_on_user(bundle_zip, trusted, out / "state" / f"user{user.user_id}", train_path,
                                           user.test, split.test, baselines)})
    mean, table = summarize(rows)
    report = {"model": str(model_dir), "arch": ckpt.meta.arch, "recipe": ckpt.meta.recipe, "seed": seed,
              "samples_per_class": samples_per_class,
              "generic_test_n": len(split.test), "users": rows, "mean": mean, "overhead": overhead,
              "bundle": str(bundle_dir), "signed_by": _signer_id(key_dir),
              "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic.write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plot_report(report, out / "report.png")
    echo("")
    echo(table)
    echo("")
    echo(f"LE+GN overhead: {overhead['le_gn_params']:,} params ({overhead['params_pct']:.2f} % of GE's "
         f"{overhead['ge_params']:,}), {overhead['le_gn_macs']:,} MACs ({overhead['macs_pct']:.2f} % of GE's "
         f"{overhead['ge_macs']:,}); device peak RSS {mean['peak RSS MB']:.0f} MB, torch imported on the device: "
         f"{any(r['torch imported'] for r in rows)}")
    echo(f"report: {out / 'report.json'}, plot: {out / 'report.png'} ({report['wall_seconds']:.0f}s in all)")
    return report
