"""Measuring a GE variant the way it ships: file size, FLOPs, accuracy and
latency in the runtime it was exported to, and accuracy after personalization
on the device runtime; plus the table and plot of a run."""

from __future__ import annotations

import json
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edgetailor.toolkit import atomic
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.formats import FORMATS
from edgetailor.toolkit.tables import format_table
from edgetailor.device.runtime import DeviceRuntime
from edgetailor.export.bundle import export_bundle
from edgetailor.export.formats import GEExporter

LATENCY_RUNS = 300


def latency_us(run, sample: np.ndarray, runs: int = LATENCY_RUNS) -> float:
    """Median wall time of one batch-1 inference, after a warm-up."""
    for _ in range(max(20, runs // 10)):
        run(sample)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(sample)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def measure_file(exporter: GEExporter, path: Path, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    """Size, accuracy and batch-1 single-thread latency of an exported model in its runtime."""
    run = exporter.load(path, threads=1)
    logits = run(test_x)
    data = path.read_bytes()
    return {"file_bytes": len(data), "deflate_bytes": len(zlib.compress(data, 9)),
            "generic_accuracy": float((logits.argmax(1) == test_y).mean()),
            "latency_us": latency_us(run, test_x[:1])}


def personalization_accuracy(model_dir: Path, users: list, generic_test: LabeledImages) -> dict[str, float]:
    """Export a bundle from ``model_dir`` and personalize LE+GN on each
    simulated user with the device runtime (ONNX Runtime training), as a phone
    would; mean accuracy on the users' held-out samples and on generic data."""
    user_acc, generic_acc, ge_user_acc = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(model_dir, Path(tmp) / "bundle", make_zip=False)
        for user in users:
            with DeviceRuntime.open(bundle, Path(tmp) / f"state{user.user_id}") as runtime:
                runtime.add_dataset(user.train)
                runtime.personalize()
                on_user = runtime.evaluate_dataset(user.test)
                on_generic = runtime.evaluate_dataset(generic_test)
            user_acc.append(on_user["accuracy"])
            ge_user_acc.append(on_user["ge_only_accuracy"])
            generic_acc.append(on_generic["accuracy"])
    return {"user_accuracy": float(np.mean(user_acc)), "user_accuracy_ge_only": float(np.mean(ge_user_acc)),
            "generic_accuracy": float(np.mean(generic_acc)), "users": len(users)}


COLUMNS = [("variant", "variant", ""), ("format", "format", ""), ("params", "params", ","),
           ("nonzero_params", "nonzero", ","), ("file_kb", "file KB", ".1f"), ("deflate_kb", "zip KB", ".1f"),
           ("size_x", "smaller x", ".2f"), ("mflops", "MFLOPs", ".3f"), ("flops_ratio", "FLOPs x", ".2f"),
           ("generic_accuracy", "generic acc", ".4f"), ("accuracy_drop_pt", "drop pt", "+.2f"),
           ("latency_us", "latency us", ".1f"), ("latency_ratio", "latency x", ".2f"),
           ("personalized_user_accuracy", "pers. user", ".4f"),
           ("personalized_generic_accuracy", "pers. generic", ".4f")]


def relate(rows: list[dict[str, Any]]) -> None:
    """Add each row's ratios against the fp32 GE row of the same format."""
    reference = {r["format"]: r for r in rows if r["variant"] == "fp32 GE"}
    for row in rows:
        base = reference.get(row["format"])
        row["file_kb"] = row["file_bytes"] / 1024
        row["deflate_kb"] = row["deflate_bytes"] / 1024
        row["mflops"] = row["flops"] / 1e6
        if base is None:
            continue
        row["size_x"] = base["file_bytes"] / row["file_bytes"]
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["accuracy_drop_pt"] = 100 * (base["generic_accuracy"] - row["generic_accuracy"])
        row["latency_ratio"] = row["latency_us"] / base["latency_us"]


def format_rows(rows: list[dict[str, Any]]) -> str:
    return format_table(rows, COLUMNS)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against file size and against latency, one point per variant and format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {name: "os^vDPX*"[i % 8] for i, name in enumerate(FORMATS)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "fp32 GE", v))
    palette = plt.cm.tab10 if len(variants) <= 10 else plt.cm.tab20
    colours = {v: palette(i % palette.N) for i, v in enumerate(variants)}
    for ax, key, label in ((axes[0], "file_kb", "file size on disk (KB)"),
                           (axes[1], "latency_us", "latency, batch 1, 1 thread (µs)")):
        for row in rows:
            ax.scatter(row[key], 100 * row["generic_accuracy"], marker=markers.get(row["format"], "o"),
                       color=colours[row["variant"]], s=50, edgecolors="black", linewidths=0.4)
        ax.set_xlabel(label)
        ax.set_ylabel("generic test accuracy (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[v], label=v) for v in variants]
    handles += [plt.Line2D([], [], marker=m, linestyle="", markerfacecolor="none", markeredgecolor="black",
                           label=f) for f, m in markers.items() if any(r["format"] == f for r in rows)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path, title: str) -> str:
    """report.json, report.txt (the table) and report.png in ``out_dir``; returns the table."""
    table = format_rows(report["rows"])
    atomic.write_text(out_dir / "report.json", json.dumps(report, indent=2, default=_jsonable) + "\n")
    atomic.write_text(out_dir / "report.txt", table + "\n")
    plot(report["rows"], out_dir / "report.png", title)
    return table


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
