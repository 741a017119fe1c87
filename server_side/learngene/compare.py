"""``compare``: the family a learngene makes against training each depth from
scratch, as the papers measure it.

For every depth: the learngene-initialised model before and after its short
fine-tune, and a freshly initialised model trained for 1 and for
``scratch.epochs`` epochs with the same loop; then what each way stores to
initialise the whole family (the learngene vs one pretrained model per depth)
and what it costs to train (wall time and FLOPs, the learngene's own
distillation included). Writes report.txt, report.json and report.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from edgetailor.toolkit import atomic
from edgetailor.toolkit.config import from_dict
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.tables import format_table
from edgetailor.toolkit.errors import ConfigError
from edgetailor.server_side.models import build_model
from edgetailor.server_side.cost import count_macs, training_flops
from edgetailor.server_side.learngene import gene
from edgetailor.server_side.learngene.recipe import LearngeneRecipe, TrainSchedule
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.samples import SampleStore, as_store
from edgetailor.server_side.training import GenericData, fit, test_accuracy

ProgressFn = Callable[[str, int, int], None]


def _train(model: torch.nn.Module, data: GenericData, schedule: TrainSchedule, epochs: int) -> dict[str, float]:
    started = time.perf_counter()
    fit(model, data, epochs, schedule.learning_rate, schedule.batch_size, seed=schedule.seed)
    return {"seconds": time.perf_counter() - started, "accuracy": test_accuracy(model, data)}


def compare_family(learngene_dirs: list[str | Path], depths: list[int], out: str | Path,
                   recipe: LearngeneRecipe | None = None, data: LabeledImages | SampleStore | None = None,
                   progress: ProgressFn | None = None, overwrite: bool = False,
                   env: TrainingEnv = CPU) -> dict[str, Any]:
    """Compare the learngenes in ``learngene_dirs`` (one per method, same
    teacher and widths) on ``depths``; the schedules come from ``recipe``
    (default: the first learngene's own)."""
    tick = progress or (lambda *_a: None)
    loaded = [gene.load(d) for d in learngene_dirs]
    if not loaded:
        raise ConfigError("compare needs at least one learngene")
    first_cfg, first_meta = loaded[0][0].cfg, loaded[0][1]
    for learngene, meta in loaded[1:]:
        if learngene.cfg.widths != first_cfg.widths or meta.labels != first_meta.labels:
            raise ConfigError("the learngenes to compare must share widths and labels (one teacher, one family)")
    too_deep = [d for d in depths if not 1 <= d <= min(lg.cfg.max_depth for lg, _ in loaded)]
    if too_deep:
        raise ConfigError(f"depths {too_deep} are outside what these learngenes make",
                          hint=f"choose depths in 1..{min(lg.cfg.max_depth for lg, _ in loaded)}")
    recipe = recipe or from_dict(LearngeneRecipe, first_meta.recipe).validate()
    store = as_store(data)
    env.agree("the generic data (its sha256)", store.fingerprint(),
              hint="give every process the same --data file (same content on every machine)")
    generic, _ = gene.generic_data(first_meta, store, env)
    n_train, num_classes, widths = len(generic.train), len(first_meta.labels), list(first_cfg.widths)
    methods = [meta.method for _, meta in loaded]
    scratch_runs = sorted({1, recipe.scratch.epochs})
    started = time.perf_counter()
    rows = []
    for i, depth in enumerate(depths):
        tick("depths", i, len(depths))
        torch.manual_seed(recipe.scratch.seed + depth)
        shape = build_model("vit", num_classes, widths, depth)
        macs = count_macs(shape, (generic.example,))
        row: dict[str, Any] = {"depth": depth, "params": sum(p.numel() for p in shape.parameters()), "macs": macs}
        for epochs in scratch_runs:
            torch.manual_seed(recipe.scratch.seed + depth)
            result = _train(build_model("vit", num_classes, widths, depth), generic, recipe.scratch, epochs)
            row[f"scratch {epochs}ep"] = result["accuracy"]
            row[f"scratch {epochs}ep s"] = result["seconds"]
            row[f"scratch {epochs}ep flops"] = training_flops(macs, n_train, epochs)
        for (learngene, meta), method in zip(loaded, methods):
            model = learngene.expand(depth)
            row[f"{method} init"] = test_accuracy(model, generic)
            result = _train(model, generic, recipe.expand, recipe.expand.epochs)
            row[f"{method} {recipe.expand.epochs}ep"] = result["accuracy"]
            row[f"{method} {recipe.expand.epochs}ep s"] = result["seconds"]
            row[f"{method} {recipe.expand.epochs}ep flops"] = training_flops(macs, n_train, recipe.expand.epochs)
        rows.append(row)
        tick("depths", i + 1, len(depths))

    best_scratch = f"scratch {recipe.scratch.epochs}ep"
    per_depth_models = sum(r["params"] for r in rows)
    summary = {}
    for (learngene, meta), method in zip(loaded, methods):
        tuned = f"{method} {recipe.expand.epochs}ep"
        summary[method] = {
            "stored_params": learngene.stored_parameters(),
            "stored_vs_model_per_depth": learngene.stored_parameters() / per_depth_models,
            "depths_matching_scratch": sum(r[tuned] >= r[best_scratch] for r in rows),
            "learngene_train_seconds": meta.train_seconds, "learngene_train_flops": meta.train_flops,
            "family_seconds": meta.train_seconds + sum(r[f"{tuned} s"] for r in rows),
            "family_flops": meta.train_flops + sum(r[f"{tuned} flops"] for r in rows),
            "teacher": meta.teacher, "auxiliary": meta.auxiliary,
        }
    summary["scratch"] = {
        "stored_params": per_depth_models, "stored_vs_model_per_depth": 1.0,
        "family_seconds": sum(r[f"{best_scratch} s"] for r in rows),
        "family_flops": sum(r[f"{best_scratch} flops"] for r in rows),
    }
    # The papers' other baseline: pretrain every depth as long as the learngene
    # trained (to comparable accuracy). Not run, since it would take depths x the
    # learngene's time; its FLOPs follow from the MACs.
    pretrain_epochs = first_cfg.epochs
    summary["pretrain per depth"] = {
        "stored_params": per_depth_models, "stored_vs_model_per_depth": 1.0, "epochs": pretrain_epochs,
        "family_seconds": None, "estimated": True,
        "family_flops": sum(training_flops(r["macs"], n_train, pretrain_epochs) for r in rows),
    }
    report = {"learngenes": [str(d) for d in learngene_dirs], "methods": methods, "depths": depths,
              "recipe": recipe.to_dict(), "n_train": n_train, "n_test": len(generic.test),
              "rows": rows, "summary": summary, "wall_seconds": round(time.perf_counter() - started, 1)}
    report["table"] = _table(report)
    out = Path(out)
    if env.is_main:
        with atomic.staged_dir(out, overwrite=overwrite) as staging:
            atomic.write_text(staging / "report.txt", report["table"] + "\n")
            atomic.write_text(staging / "report.json", json.dumps(report, indent=2) + "\n")
            _plot(report, staging / "report.png")
    env.barrier()
    return report


def _table(report: dict[str, Any]) -> str:
    recipe, methods = report["recipe"], report["methods"]
    expand_ep, scratch_ep = recipe["expand"]["epochs"], recipe["scratch"]["epochs"]
    columns = [("depth", "depth", "d"), ("params", "params", ","), ("macs", "MACs", ",")]
    columns += [(f"scratch {e}ep", f"scratch {e}ep", ".4f") for e in sorted({1, scratch_ep})]
    for m in methods:
        columns += [(f"{m} init", f"{m} init", ".4f"), (f"{m} {expand_ep}ep", f"{m} +{expand_ep}ep", ".4f")]
    lines = ["generic test accuracy by depth (learngene-initialised vs from scratch)", "",
             format_table(report["rows"], columns), ""]
    names = {"scratch": f"one model per depth ({scratch_ep} ep each)",
             "pretrain per depth": "one model per depth "
                                   f"({report['summary'].get('pretrain per depth', {}).get('epochs')}"
                                   " ep each, FLOPs estimated, not run)"}
    cost = [{"way": names.get(m, f"learngene {m}"), **{k: v for k, v in s.items() if not isinstance(v, dict)}}
            for m, s in report["summary"].items()]
    lines.append(format_table(cost, [("way", "family initialised by", ""), ("stored_params", "params stored", ","),
                                     ("stored_vs_model_per_depth", "vs per-depth", ".3f"),
                                     ("family_seconds", "train s (all depths)", ".1f"),
                                     ("family_flops", "train FLOPs (all depths)", ".3g")]))
    for m in methods:
        s = report["summary"][m]
        lines.append(f"{m}: +{expand_ep} epoch matches or beats {scratch_ep} epochs from scratch at "
                     f"{s['depths_matching_scratch']} of {len(report['depths'])} depths; learngene distilled in "
                     f"{s['learngene_train_seconds']:.0f}s from a {s['teacher']['arch']} teacher "
                     f"({s['teacher']['generic_accuracy']:.4f}); "
                     f"auxiliary model {s['auxiliary']['generic_accuracy']:.4f}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipe, rows, methods = report["recipe"], report["rows"], report["methods"]
    expand_ep, scratch_ep = recipe["expand"]["epochs"], recipe["scratch"]["epochs"]
    depths = [r["depth"] for r in rows]
    fig, (acc_ax, cost_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for e, style in zip(sorted({1, scratch_ep}), (":", "--")):
        acc_ax.plot(depths, [r[f"scratch {e}ep"] for r in rows], style, color="grey", marker="o",
                    label=f"from scratch, {e} epoch{'s' if e > 1 else ''}")
    for m, color in zip(methods, ("tab:blue", "tab:orange", "tab:green")):
        acc_ax.plot(depths, [r[f"{m} {expand_ep}ep"] for r in rows], "-", color=color, marker="s",
                    label=f"{m.upper()} learngene + {expand_ep} epoch")
        acc_ax.plot(depths, [r[f"{m} init"] for r in rows], "-", color=color, alpha=0.35, marker=".",
                    label=f"{m.upper()} learngene, no fine-tune")
    teacher = report["summary"][methods[0]]["teacher"]
    acc_ax.axhline(teacher["generic_accuracy"], color="black", lw=0.8, label=f"teacher ({teacher['arch']})")
    acc_ax.set(xlabel="depth (transformer blocks)", ylabel="generic test accuracy", ylim=(0, 1.02),
               title="models of every depth")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right")
    ways = list(report["summary"])
    labels = [{"scratch": f"per depth\n{scratch_ep} ep", "pretrain per depth": "per depth\npretrained (est.)"}
              .get(w, w.upper()) for w in ways]
    stored = [report["summary"][w]["stored_params"] / 1e3 for w in ways]
    flops = [report["summary"][w]["family_flops"] / 1e12 for w in ways]
    x = range(len(ways))
    cost_ax.bar([i - 0.2 for i in x], stored, 0.4, label="parameters stored, thousands", color="tab:purple")
    twin = cost_ax.twinx()
    twin.bar([i + 0.2 for i in x], flops, 0.4, label="training TFLOPs, whole family", color="tab:olive")
    cost_ax.set_xticks(list(x), labels)
    cost_ax.set(ylabel="parameters stored (thousands)", title=f"initialising depths {depths[0]}..{depths[-1]}")
    twin.set_ylabel("training TFLOPs (all depths)")
    handles = cost_ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    cost_ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
