"""Benchmark of the build server at scale (issue 18's targets).

    python benchmarks/server_scale.py [--large 500000] [--scaling-size 100000] [--quick]
                                      [--parts builtin,resume,large,models,gpu] [--out benchmarks/results/server_scale]

Every run is the CLI a user runs (`edgetailor server pretrain`, under
torchrun for several processes), in a process of its own:

1. builtin: the default recipe on the built-in digits, 1 process on 1 core
   against `torchrun --nproc-per-node 2` on 2 cores (gloo, 1 thread each):
   images/s, final generic accuracy, time to --target accuracy, scaling
   efficiency (speed-up / processes). The same on a --scaling-size set made
   by the simulator (`server simulate-data`), --scaling-epochs epochs.
2. resume: the 1-process run again, saving its state every
   --checkpoint-every seconds, killed with SIGKILL half an interval after a
   save (at about half way), then `--resume`: final accuracy against the uninterrupted run, and the
   training time lost (kill time less the last saved state's time) against
   the checkpoint interval.
3. large: pretraining on --large simulated images (and on a tenth of that),
   one epoch on all cores: peak RSS of the main process and of the whole
   process tree (data preparation and loader workers included), polled from
   /proc every 0.1 s. The data preparation (one pass, cached) is timed apart.
4. models: the wide LeNet-5 and the ViT, a few epochs on 2 CPU cores: the
   baseline of the GPU target.
5. gpu (when torch sees CUDA): the same two models and the default recipe on
   the GPU, and their speed-up over the 2-core CPU.

Prints one table per part and the targets; writes OUT/server_scale.json and
each run's log and checkpoint metadata under OUT/runs/. Linux (taskset, /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetailor.toolkit import atomic  # noqa: E402
from edgetailor.toolkit.tables import format_table  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------- measuring

def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


class MemoryWatch:
    """Peak RSS of the process tree under ``pid`` (sum over processes) and of
    its largest single process, polled from /proc."""

    def __init__(self, pid: int):
        self.pid, self.tree_peak, self.process_peak = pid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            sizes = [_rss_mb(p) for p in _tree(self.pid)]
            self.tree_peak = max(self.tree_peak, sum(sizes))
            self.process_peak = max(self.process_peak, max(sizes, default=0.0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "edgetailor", *args]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return [torchrun, "--nproc-per-node", str(processes), "--master-port", str(_free_port()), "-m", "edgetailor",
            *args]


# The data preparation alone, as `server pretrain --data` runs it (a worker process per core).
PREPARE = ("import os; from edgetailor.server_side.samples import open_samples; "
           "open_samples({data!r}, workers=min(8, os.cpu_count() or 1))")


def run(name: str, runs: Path, args: list[str], processes: int = 1, cores: str | None = None,
        threads: int | None = None, kill_after: float | None = None, state: Path | None = None,
        python: str | None = None, cache: Path | None = None) -> dict:
    """Run one CLI command (or ``python`` code); returns its wall time, peaks
    and (when it wrote one) its checkpoint's metadata. ``kill_after``: SIGKILL
    the whole tree that many seconds after ``state`` (its training state)
    first appears. ``cache``: the sample cache to use (EDGETAILOR_CACHE)."""
    log = runs / f"{name}.log"
    env = {**os.environ, **({"EDGETAILOR_CACHE": str(cache)} if cache else {})}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", python] if python else command(args, processes)
    if cores and shutil.which("taskset"):
        cmd = ["taskset", "-c", cores, *cmd]
    print(f"  {name}: {' '.join(args) if args else 'preparing the data'}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        watch = MemoryWatch(proc.pid)
        killed_at = None
        if kill_after is not None:
            while proc.poll() is None and not (state and state.exists()):
                time.sleep(0.05)
            deadline = time.perf_counter() + kill_after
            while proc.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                killed_at = time.time()
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        watch.stop()
    result = {"name": name, "wall_s": round(time.perf_counter() - started, 2), "returncode": proc.returncode,
              "peak_rss_mb": round(watch.process_peak), "peak_tree_rss_mb": round(watch.tree_peak),
              "log": str(log)}
    if killed_at is not None:
        result["killed_at"] = killed_at
        return result
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}); its log {log} ends:\n{log.read_text()[-3000:]}")
    if python:
        return result
    out_dir = Path(args[args.index("--out") + 1])
    meta = json.loads((out_dir / "model.json").read_text())
    shutil.copy(out_dir / "model.json", runs / f"{name}.model.json")
    training = meta["training"]
    result.update(accuracy=meta["generic_accuracy"], images_per_s=training["images_per_second"],
                  train_s=training["seconds"], history=training["history"], device=training["device"],
                  processes=training["processes"], precision=training["precision"])
    return result


def time_to(target: float, history: list[dict]) -> float | None:
    """Training seconds at the first evaluated epoch whose accuracy reached ``target``."""
    return next((h["seconds"] for h in history if h["accuracy"] >= target), None)


# ---------------------------------------------------------------- the parts

def simulated(work: Path, count: int) -> Path:
    """A simulated set of ``count`` images, made once and kept in ``work``."""
    folder = work / f"simulated-{count}"
    images = folder / "train-images-idx3-ubyte"
    if not images.exists():
        print(f"  simulating {count:,} generic images ...", flush=True)
        subprocess.run(command(["server", "simulate-data", "--out", str(folder), "--images", str(count),
                                "--overwrite"]), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return images


def scaling_pair(tag: str, runs: Path, work: Path, base: list[str], target: float | None) -> list[dict]:
    """1 process on 1 core against 2 processes on 2 cores, 1 thread each."""
    rows = []
    for processes, cores in ((1, "0"), (2, "0,1")):
        name = f"{tag}-{processes}proc"
        result = run(name, runs, ["server", "pretrain", "--out", str(work / name), "--overwrite",
                                  "--device", "cpu", *base], processes, cores, threads=1)
        result["time_to_target_s"] = time_to(target, result["history"]) if target else None
        rows.append(result)
    one, two = rows
    two["speedup"] = round(two["images_per_s"] / one["images_per_s"], 2)
    two["efficiency"] = round(two["speedup"] / 2, 2)
    two["accuracy_gap_points"] = round(100 * (two["accuracy"] - one["accuracy"]), 2)
    return rows


def part_builtin(args, runs: Path, work: Path) -> dict:
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    builtin = scaling_pair("builtin", runs, work, ["--evaluate-every", "5", *epochs], args.target)
    data = simulated(work, args.scaling_size)
    # the data is prepared into the sample cache once, outside the timed runs
    large = scaling_pair(f"simulated{args.scaling_size // 1000}k", runs, work,
                         ["--data", str(data), "--epochs", str(args.scaling_epochs), "--evaluate-every", "1"],
                         args.large_target)
    return {"builtin": builtin, "simulated": large}


def part_resume(args, runs: Path, work: Path, whole: dict | None) -> dict:
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    base = ["server", "pretrain", "--device", "cpu", "--evaluate-every", "5", *epochs]
    if whole is None:
        whole = run("resume-whole", runs, [*base, "--out", str(work / "resume-whole"), "--overwrite"],
                    cores="0", threads=1)
    out = work / "resume-killed"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".training"), ignore_errors=True)
    state = out.with_name(out.name + ".training") / "fit-00.pt"
    every = args.checkpoint_every
    killed = run("resume-killed", runs, [*base, "--out", str(out), "--checkpoint-every", f"{every}s"],
                 cores="0", threads=1, kill_after=min(1.5 * every, max(0.0, whole["train_s"] / 2 - every)),
                 state=state)
    if "killed_at" not in killed:
        raise SystemExit("the run to kill finished first: give it more --epochs")
    lost = killed["killed_at"] - state.stat().st_mtime
    resumed = run("resume-resumed", runs, [*base, "--out", str(out), "--checkpoint-every", f"{every}s", "--resume"],
                  cores="0", threads=1)
    same = (out / "model.pt").read_bytes() == (work / whole["name"] / "model.pt").read_bytes() \
        if (work / whole["name"] / "model.pt").exists() else None
    return {"whole": whole, "killed_after_s": killed["wall_s"], "lost_s": round(lost, 2),
            "checkpoint_every_s": every, "resumed": resumed,
            "accuracy_gap_points": round(100 * (resumed["accuracy"] - whole["accuracy"]), 2),
            "same_weights": same}


def part_large(args, runs: Path, work: Path) -> dict:
    rows = []
    for count in (args.large // 10, args.large):
        data = simulated(work, count)
        cache = work / f"cache-large-{count}"          # a fresh cache: the preparation is measured, not reused
        shutil.rmtree(cache, ignore_errors=True)
        prepared = run(f"prepare-{count // 1000}k", runs, [], python=PREPARE.format(data=str(data)), cache=cache)
        trained = run(f"large-{count // 1000}k", runs, ["server", "pretrain", "--data", str(data), "--epochs", "1",
                                                        "--evaluate-every", "1", "--out", str(work / f"large-{count}"),
                                                        "--overwrite", "--device", "cpu"], cache=cache)
        shutil.rmtree(cache, ignore_errors=True)
        trained.update(images=count, prepare_s=prepared["wall_s"],
                       prepare_peak_tree_rss_mb=prepared["peak_tree_rss_mb"],
                       time_to_target_s=time_to(args.large_target, trained["history"]))
        rows.append(trained)
    return {"rows": rows}


def part_models(args, runs: Path, work: Path, device: str) -> list[dict]:
    rows = []
    for recipe in ("wide", "vit", "default"):
        epochs = args.model_epochs * (10 if device == "cuda" else 1)
        result = run(f"{recipe}-{device}", runs, ["server", "pretrain", "--recipe", recipe, "--epochs", str(epochs),
                                                  "--out", str(work / f"{recipe}-{device}"), "--overwrite",
                                                  "--device", device])
        result["recipe"] = recipe
        rows.append(result)
    return rows


# ---------------------------------------------------------------- report

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_scale")
    parser.add_argument("--parts", default="builtin,resume,large,models,gpu")
    parser.add_argument("--large", type=int, default=500_000, help="images in the large simulated set")
    parser.add_argument("--scaling-size", type=int, default=100_000,
                        help="images in the simulated set of the 1-vs-2-process runs")
    parser.add_argument("--scaling-epochs", type=int, default=5, help="epochs of the simulated set's 1-vs-2 runs")
    parser.add_argument("--epochs", type=int, default=0, help="override the default recipe's epochs (0: keep)")
    parser.add_argument("--model-epochs", type=int, default=3, help="epochs of the wide/ViT throughput runs")
    parser.add_argument("--target", type=float, default=0.95, help="target generic accuracy, built-in digits")
    parser.add_argument("--large-target", type=float, default=0.95, help="target accuracy, simulated sets")
    parser.add_argument("--checkpoint-every", type=float, default=4.0,
                        help="seconds, for the resume part (it is killed half an interval after a save)")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the benchmark itself")
    args = parser.parse_args()
    if args.quick:
        args.large, args.scaling_size, args.epochs, args.model_epochs, args.scaling_epochs = 20_000, 10_000, 20, 1, 2
        args.checkpoint_every = 2.0
    parts = set(args.parts.split(","))
    out, work = args.out, args.out / "work"
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGETAILOR_CACHE", str(work / "cache"))

    import torch

    cuda = torch.cuda.is_available()
    report: dict = {"cores": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "args": vars(args) | {"out": str(out)}}
    if "builtin" in parts:
        print("[builtin] 1 process on 1 core vs torchrun 2 processes on 2 cores", flush=True)
        report["scaling"] = part_builtin(args, runs, work)
    if "resume" in parts:
        print("[resume] kill -9 at half way, then --resume", flush=True)
        whole = report.get("scaling", {}).get("builtin", [None])[0]
        report["resume"] = part_resume(args, runs, work, whole)
    if "large" in parts:
        print(f"[large] one epoch on {args.large // 10:,} and {args.large:,} simulated images", flush=True)
        report["large"] = part_large(args, runs, work)
    if "models" in parts:
        print("[models] wide LeNet-5, ViT and the default LeNet-5 on the 2-core CPU", flush=True)
        report["models_cpu"] = part_models(args, runs, work, "cpu")
    if "gpu" in parts and cuda:
        print(f"[gpu] the same on {report['gpu']}", flush=True)
        report["models_gpu"] = part_models(args, runs, work, "cuda")

    targets = print_report(report)
    report["targets"] = targets
    atomic.write_text(out / "server_scale.json", json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out / 'server_scale.json'}")
    return 0


def print_report(report: dict) -> list[dict]:
    targets: list[dict] = []
    if "scaling" in report:
        rows = [{**r, "set": tag} for tag, pair in report["scaling"].items() for r in pair]
        print("\n" + format_table(rows, [("set", "data", "<"), ("processes", "processes", "d"),
                                         ("images_per_s", "images/s", ",.0f"), ("speedup", "speed-up", ".2f"),
                                         ("efficiency", "efficiency", ".2f"), ("accuracy", "accuracy", ".4f"),
                                         ("time_to_target_s", "to target (s)", ".1f"), ("train_s", "train (s)", ".1f"),
                                         ("wall_s", "wall (s)", ".1f")]))
        for tag, (_, two) in report["scaling"].items():
            targets.append({"target": f"torchrun 2 CPU processes, {tag}: accuracy within 0.5 points",
                            "measured": f"{two['accuracy_gap_points']:+.2f} points",
                            "met": abs(two["accuracy_gap_points"]) <= 0.5})
            targets.append({"target": f"torchrun 2 CPU processes, {tag}: >= 1.6x the images/s of 1",
                            "measured": f"{two['speedup']:.2f}x", "met": two["speedup"] >= 1.6})
    if "resume" in report:
        r = report["resume"]
        print(f"\nresume: killed after {r['killed_after_s']:.1f}s, {r['lost_s']:.1f}s of training lost "
              f"(interval {r['checkpoint_every_s']:.0f}s); accuracy {r['whole']['accuracy']:.4f} uninterrupted, "
              f"{r['resumed']['accuracy']:.4f} resumed; same weights: {r['same_weights']}")
        targets.append({"target": "kill -9, --resume: accuracy within 0.3 points",
                        "measured": f"{r['accuracy_gap_points']:+.2f} points",
                        "met": abs(r["accuracy_gap_points"]) <= 0.3})
        targets.append({"target": "kill -9, --resume: at most one checkpoint interval lost",
                        "measured": f"{r['lost_s']:.1f}s of {r['checkpoint_every_s']:.0f}s",
                        "met": r["lost_s"] <= r["checkpoint_every_s"] * 1.1 + 1})
    if "large" in report:
        rows = report["large"]["rows"]
        print("\n" + format_table(rows, [("images", "images", ",d"), ("prepare_s", "prepare (s)", ".1f"),
                                         ("prepare_peak_tree_rss_mb", "prepare RSS tree (MB)", ",d"),
                                         ("images_per_s", "images/s", ",.0f"), ("accuracy", "accuracy", ".4f"),
                                         ("time_to_target_s", "to target (s)", ".1f"),
                                         ("peak_rss_mb", "peak RSS (MB)", ",d"),
                                         ("peak_tree_rss_mb", "tree RSS (MB)", ",d")]))
        largest = rows[-1]
        peak = max(largest["peak_rss_mb"], largest["prepare_peak_tree_rss_mb"])
        targets.append({"target": f"pretraining on {largest['images']:,} images: peak RSS <= 2 GB",
                        "measured": f"{largest['peak_rss_mb']:,} MB main process, {largest['peak_tree_rss_mb']:,} MB "
                                    f"tree ({largest['prepare_peak_tree_rss_mb']:,} MB preparing)",
                        "met": peak <= 2048 and largest["peak_tree_rss_mb"] <= 2048})
    cpu = {r["recipe"]: r for r in report.get("models_cpu", [])}
    if cpu:
        rows = [{**r, "where": "cpu"} for r in report["models_cpu"]]
        for r in report.get("models_gpu", []):
            speedup = round(r["images_per_s"] / cpu[r["recipe"]]["images_per_s"], 1)
            rows.append({**r, "where": "gpu", "speedup": speedup})
        print("\n" + format_table(rows, [("recipe", "recipe", "<"), ("where", "device", "<"),
                                         ("precision", "precision", "<"), ("images_per_s", "images/s", ",.0f"),
                                         ("speedup", "vs 2-core CPU", ".1f"), ("accuracy", "accuracy", ".4f")]))
        for r in rows:
            if r["where"] == "gpu" and r["recipe"] in ("wide", "vit"):
                targets.append({"target": f"GPU: >= 20x the 2-core CPU images/s, {r['recipe']}",
                                "measured": f"{r['speedup']:.1f}x", "met": r["speedup"] >= 20})
        if not report.get("models_gpu"):
            targets.append({"target": "GPU: >= 20x the 2-core CPU images/s (wide, vit)",
                            "measured": "no CUDA GPU on this machine", "met": None})
    print("\n" + format_table([{**t, "met": {True: "yes", False: "NO", None: "n/a"}[t["met"]]} for t in targets],
                              [("target", "target", "<"), ("measured", "measured", "<"), ("met", "met", "<")]))
    return targets


if __name__ == "__main__":
    sys.exit(main())
