"""``server compress``: run a recipe's stages on a GE checkpoint and write the
compressed GE as a new checkpoint (which ``edgetailor export bundle`` turns
into a device bundle), its exports, and the report against the fp32 GE.

The three sides meet here: the stages run on the server side
(``server_side.compress.pipeline``), every format is exported and measured in
its own runtime (``export.formats``), and personalization is measured with
the device runtime (``compress_report``). Everything a recipe could get wrong
is checked before any training starts, and the output directory is published
only when the whole run succeeded.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from edgetailor.toolkit import __version__, atomic
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import EdgetailorError
from edgetailor.toolkit.formats import FORMATS
from edgetailor.toolkit.users import simulate_users
from edgetailor.export.formats import get_exporter
from edgetailor.server_side.checkpoint import GECheckpoint
from edgetailor.server_side.compress import pruning
from edgetailor.server_side.compress.pipeline import (EchoFn, ProgressFn, compressed_meta, load_generic, notes,
                                                      preflight, run_stages)
from edgetailor.server_side.compress.recipe import CompressRecipe
from edgetailor.server_side.cost import count_params
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.samples import SampleStore, as_store
from edgetailor.app import compress_report as reporting


REPORT_TEST_MAX = 20_000     # test samples each runtime is measured on
REPORT_POOL_MAX = 20_000     # user-pool samples the simulated users are drawn from


def compress(model_dir: str | Path, recipe: CompressRecipe, out: str | Path,
             data: LabeledImages | SampleStore | None = None, n_users: int = 3, overwrite: bool = False,
             progress: ProgressFn | None = None, echo: EchoFn | None = None,
             env: TrainingEnv = CPU) -> dict[str, Any] | None:
    """Compress the GE in ``model_dir`` with ``recipe`` into the checkpoint
    ``out``; returns the report. Under torchrun every process trains the
    stages and rank 0 alone exports, measures and writes (the others return None)."""
    say = echo or (lambda _m: None)
    tick = progress or (lambda *_a: None)
    out = Path(out)
    recipe.validate()
    ckpt = GECheckpoint.load(model_dir)
    if out.exists() and not overwrite and not (env.checkpoints and env.checkpoints.resume):
        raise EdgetailorError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    if Path(model_dir).resolve() == out.resolve():
        raise EdgetailorError("--out must differ from --model: the fp32 GE is the reference of the report")
    preflight(recipe, ckpt)
    started = time.perf_counter()
    store = as_store(data)
    env.begin_run({"command": "compress", "recipe": recipe.to_dict(), "model": ckpt.meta.to_dict(),
                  "data": store.fingerprint(), "toolkit_version": __version__,
                  "processes": env.world_size})
    generic, split = load_generic(ckpt, store, env)
    state = run_stages(recipe, ckpt, generic, tick, say)
    if not env.is_main:
        env.barrier()
        return None

    # Every runtime runs over the test part and users are drawn from the pool: on data of any size, a
    # seeded subset of each keeps the report's time and memory bounded (the built-in digits fit whole).
    test = split.test.at_most(REPORT_TEST_MAX, state.seed).to_images()
    test_x, test_y = generic.normalize(test.images).numpy(), test.labels
    calibration = generic.calibration(recipe.quantized.calibration_samples if recipe.quantized else 64,
                                      state.seed)
    pool = split.user_pool.at_most(REPORT_POOL_MAX, state.seed).to_images()
    users = simulate_users(pool, n_users, seed=state.seed) if n_users else []
    rows: list[dict[str, Any]] = []
    with atomic.staged_dir(out, overwrite=True) as staging, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in recipe.export.formats:
            fmt, exporter = FORMATS[name], get_exporter(name)
            say(f"exporting to {name} ({fmt.runtime})")
            ref_path = Path(tmp) / f"fp32{fmt.suffix}"
            exporter.export(ckpt.model, ref_path, calibration, None)
            files[name] = f"ge{fmt.suffix}"
            exporter.export(state.model, staging / files[name], calibration, state.quant)
            for variant, model, path in (("fp32 GE", ckpt.model, ref_path),
                                         ("compressed", state.model, staging / files[name])):
                rows.append({"variant": variant, "format": name, "runtime": fmt.runtime,
                             "params": count_params(model),
                             "nonzero_params": sum(int((p != 0).sum()) for p in model.parameters()),
                             "flops": pruning.flops(model, generic.example),
                             "flops_nonzero": pruning.flops(model, generic.example, sparse=True),
                             **reporting.measure_file(exporter, path, test_x, test_y)})
        deployed = next(r for r in rows if r["variant"] == "compressed" and r["format"] == "onnx")
        compressed = GECheckpoint(state.model, compressed_meta(ckpt, recipe, state, files,
                                                               deployed["generic_accuracy"], str(model_dir)),
                                  ckpt.replay)
        compressed.save(staging)
        if users:
            say(f"personalizing LE+GN on {len(users)} simulated users, fp32 GE and compressed GE")
            for variant, directory in (("fp32 GE", Path(model_dir)), ("compressed", staging)):
                result = reporting.personalization_accuracy(directory, users, test)
                row = next(r for r in rows if r["variant"] == variant and r["format"] == "onnx")
                row["personalized_user_accuracy"] = result["user_accuracy"]
                row["personalized_generic_accuracy"] = result["generic_accuracy"]
                row["ge_only_user_accuracy"] = result["user_accuracy_ge_only"]
        reporting.relate(rows)
        report = {
            "recipe": recipe.to_dict(), "model": str(model_dir), "out": str(out),
            "stages": state.records, "rows": rows, "users": len(users), "generic_test_n": len(test),
            "not_exported": _not_exported(recipe),
            "notes": notes(recipe, state),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        table = reporting.write(report, staging, f"{recipe.name or 'compression'}: {ckpt.meta.arch}")
    report["table"] = table
    env.barrier()
    if env.checkpoints is not None:
        env.checkpoints.finish(env.is_main)
    return report


def _not_exported(recipe: CompressRecipe) -> dict[str, str]:
    quantized = recipe.quantized is not None
    return {name: (fmt.cannot_carry(quantized) or "not asked for in [export] formats")
            for name, fmt in FORMATS.items() if name not in recipe.export.formats}
