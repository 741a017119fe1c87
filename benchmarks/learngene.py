"""Benchmark of the learngene workflow against issue 4's targets.

    python benchmarks/learngene.py [--out benchmarks/results/learngene] [--users 5]

1. pretrains the teacher GE (the `wide` LeNet-5 recipe, 3.7 M parameters);
2. distils a TLEG and an SWS learngene from it (the shipped learngene recipe);
3. compares, for depths 2..8, each learngene + 1 epoch against the same depth
   trained from scratch for 1 and 10 epochs, with parameters stored and
   training cost (`edgetailor server learngene compare`);
4. expands the TLEG learngene for the `budget-phone` device profile and runs
   the whole customization loop with it as GE (bundle, torch-free device
   personalization of simulated users, the end-to-end targets of issue 2).

Prints the comparison and a target table; writes OUT/targets.json, the
comparison's OUT/compare/report.{txt,json,png} and the loop's
OUT/loop/report.{json,png}; the models it trains are left in OUT/work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetailor.toolkit import atomic  # noqa: E402
from edgetailor.toolkit.tables import format_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learngene")
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--teacher-recipe", default="wide")
    parser.add_argument("--profile", default="budget-phone")
    args = parser.parse_args()

    import torch

    from benchmarks.e2e_loop import targets as loop_targets
    from edgetailor.server_side.learngene.compare import compare_family
    from edgetailor.app.learngene import expand_for_device
    from edgetailor.server_side.learngene.recipe import load_learngene_recipe, load_profile
    from edgetailor.server_side.learngene.train import train_learngene
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.app.demo import run_demo

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out, work = args.out, args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def stamp(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    stamp(f"pretraining the teacher ({args.teacher_recipe} recipe)")
    teacher = pretrain(work / "teacher", load_recipe(args.teacher_recipe), overwrite=True)
    stamp(f"  teacher generic accuracy {teacher.meta.generic_accuracy:.4f}")
    learngenes = []
    for method in ("tleg", "sws"):
        recipe = load_learngene_recipe(None)
        recipe.learngene.method = method
        stamp(f"distilling the {method.upper()} learngene ({recipe.learngene.epochs} epochs)")
        _, meta = train_learngene(work / "teacher", recipe, work / method, overwrite=True)
        stamp(f"  auxiliary model {meta.auxiliary['generic_accuracy']:.4f}, {meta.stored_params:,} params stored")
        learngenes.append(work / method)

    stamp("comparing depths 2..8 against training from scratch")
    report = compare_family(learngenes, list(range(2, 9)), out / "compare", overwrite=True)
    print(report["table"])

    profile = load_profile(args.profile)
    stamp(f"expanding TLEG for the {profile.name} profile and running the customization loop")
    ge = expand_for_device(work / "tleg", work / "ge-learngene", profile=profile, overwrite=True)
    stamp(f"  depth {ge.meta.depth}, generic accuracy {ge.meta.generic_accuracy:.4f}")
    loop = run_demo(out / "loop", n_users=args.users, model_dir=work / "ge-learngene")

    expand_ep, scratch_ep = report["recipe"]["expand"]["epochs"], report["recipe"]["scratch"]["epochs"]
    rows = []
    for method in report["methods"]:
        for r in report["rows"]:
            ours, theirs = r[f"{method} {expand_ep}ep"], r[f"scratch {scratch_ep}ep"]
            rows.append({"target": f"{method} depth {r['depth']}: +{expand_ep} ep vs {scratch_ep} ep from scratch",
                         "goal": ">= scratch", "measured": f"{ours:.4f} vs {theirs:.4f}",
                         "met": "yes" if ours >= theirs else "NO"})
        ratio = report["summary"][method]["stored_vs_model_per_depth"]
        rows.append({"target": f"{method}: params stored / one model per depth", "goal": "<= 0.200",
                     "measured": f"{ratio:.3f}", "met": "yes" if ratio <= 0.2 else "NO"})
        s, scratch = report["summary"][method], report["summary"]["scratch"]
        rows.append({"target": f"{method}: family training FLOPs / per-depth scratch", "goal": "-",
                     "measured": f"{s['family_flops'] / scratch['family_flops']:.2f}", "met": "-"})
    for row in loop_targets(loop):
        rows.append({"target": f"loop with learngene GE (depth {ge.meta.depth}): {row['target']}",
                     "goal": row["goal"], "measured": f"{row['measured']:.3f}", "met": row["met"]})
    rows.append({"target": "stretch: KIND (SVD learngene/tailor split)", "goal": "on the table",
                 "measured": "not built", "met": "NO"})
    print()
    print(format_table(rows, [("target", "target", ""), ("goal", "goal", ""), ("measured", "measured", ""),
                              ("met", "met", "")]))
    result = {"benchmark": "learngene", "cpu_count": os.cpu_count(), "teacher_recipe": args.teacher_recipe,
              "teacher_generic_accuracy": teacher.meta.generic_accuracy, "profile": profile.name,
              "expanded_depth": ge.meta.depth, "expanded_generic_accuracy": ge.meta.generic_accuracy,
              "targets": rows, "compare": {k: v for k, v in report.items() if k != "table"},
              "loop": {"mean": loop["mean"], "overhead": loop["overhead"]},
              "wall_seconds": round(time.perf_counter() - started, 1)}
    atomic.write_text(out / "targets.json", json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {out / 'targets.json'}, {out / 'compare' / 'report.png'}, {out / 'loop' / 'report.png'} "
          f"({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
