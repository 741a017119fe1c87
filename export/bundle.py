"""Turn a GE checkpoint into a device bundle.

The bundle holds GE, returning its logits and the intermediate features LE
and GN read, in each chosen format (ONNX, ExecuTorch ``.pte`` lowered to
XNNPACK, TFLite, and optionally a torch.export reference), and LE and GN as
training programs for each training runtime (``export.trainable``). The
manifest lists every format with its files and their sha256. Every exported
model is run against its torch source before the bundle is published; a
failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import toolkit
from toolkit import atomic
from toolkit.bundle import Bundle, write_manifest, zip_bundle
from toolkit.config import ExpertConfig, PersonalizeConfig
from toolkit.errors import CheckpointError, ConfigError
from toolkit.experts import LogisticGate, ResidualHead
from toolkit.models import WithFeatures
from server_side.checkpoint import GECheckpoint
from export.formats import get_format
from export.trainable import MIN_PROGRAM_BATCH, TRAINING_FORMATS, TrainablePart

# onnxruntime-training 1.19 reads ONNX IR version 10 at most; current onnx writes newer.
MAX_IR_VERSION = 10
OPSET = 17
PARITY_TOLERANCE = 1e-4

ProgressFn = Callable[[str], None]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one sample (batch 1),
    plus the parameter-free matmuls that a module declares with
    ``matmul_macs(output)`` (a transformer block's attention).

    Written here rather than pulled from a FLOP-counting package because the
    models are plain conv/linear/attention stacks and the count must be exact
    and dependency-free for the manifest."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output[0].numel() * module.in_features

    def matmul_hook(module: nn.Module, _inputs, output):
        nonlocal total
        total += module.matmul_macs(output[:1])

    handles = []
    for m in model.modules():
        if hasattr(m, "matmul_macs"):
            handles.append(m.register_forward_hook(matmul_hook))
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(*example)
    for h in handles:
        h.remove()
    return int(total)


def _onnx_export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                 output_names: list[str], training: bool) -> None:
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript and
        # keeps parameters as named initializers, which training artifacts need.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET,
                          do_constant_folding=not training,
                          training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL)


def _cap_ir_version(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        atomic.write_bytes(path, model.SerializeToString())


def export_ge(ckpt: GECheckpoint, model_dir: Path, format_name: str, path: Path) -> None:
    """GE in one deployable format, returning logits and every feature tap,
    checked against torch before it goes into a bundle.

    An fp32 GE must match torch to ``PARITY_TOLERANCE`` on every output. A
    quantized GE ships as the file ``server compress`` wrote for that format
    (the integers are decided there), and must agree with the checkpoint's
    weights on the replay glyphs' answers."""
    fmt = get_format(format_name)
    quantized = bool((ckpt.meta.get("compression") or {}).get("quantization"))
    taps = [t.name for t in ckpt.model.feature_taps]
    if quantized:
        source_name = ckpt.meta["compression"]["files"].get(format_name)
        if source_name is None or not (model_dir / source_name).is_file():
            have = sorted(ckpt.meta["compression"]["files"])
            raise CheckpointError(f"{model_dir} is a quantized GE without a {format_name} model "
                                  f"(it has: {', '.join(have)})",
                                  hint=f"re-run `edgetailor server compress` with {format_name!r} in [export] "
                                       f"formats, or export the bundle with --formats {','.join(have)}")
        atomic.write_bytes(path, (model_dir / source_name).read_bytes())
    else:
        fmt.export(ckpt.model, path, ckpt.normalize(ckpt.replay.images[:64]).numpy(), None)
    # Every replay glyph for the agreement of a quantized GE; a few suffice for fp32 parity.
    example = ckpt.normalize(ckpt.replay.images if quantized else ckpt.replay.images[:8])
    got = fmt.load(path, threads=1, all_outputs=True)(example.numpy())
    with torch.no_grad():
        want = [w.numpy() for w in WithFeatures(ckpt.model).eval()(example)]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise CheckpointError(f"the {format_name} GE returns {[g.shape for g in got]}, expected logits and the "
                              f"features {taps} with shapes {[w.shape for w in want]}",
                              hint="re-run `edgetailor server compress`" if quantized else "")
    if quantized:
        agreement = float((got[0].argmax(1) == want[0].argmax(1)).mean())
        if agreement < QUANTIZED_AGREEMENT:
            raise CheckpointError(f"{source_name} agrees with the checkpoint's weights on only {agreement:.1%} of "
                                  "the replay glyphs; the files do not belong together",
                                  hint="re-run `edgetailor server compress`")
        return
    for name, g, w in zip(["logits", *taps], got, want):
        diff = float(np.abs(g - w).max())
        if diff > PARITY_TOLERANCE:
            raise CheckpointError(f"the {format_name} export of GE output {name!r} differs from torch by {diff:.2e}")


# A quantized GE's exported model answers like its torch twin (same integer
# weights) up to activation rounding: most argmaxes agree, logits do not to 1e-4.
QUANTIZED_AGREEMENT = 0.95


def _compression_summary(compression: dict | None) -> dict | None:
    """What the bundle says about how its GE was compressed."""
    if not compression:
        return None
    return {"recipe": compression["recipe"].get("name"), "stages": [s["kind"] for s in compression["stages"]],
            "sparse": compression["sparse"], "quantization": compression["quantization"]}


@contextlib.contextmanager
def _native_stderr_captured():
    """generate_artifacts' C++ graph passes log every transformer at info level
    to fd 2, ignoring the logger severity; keep it off the user's terminal and
    show it only if the export fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Formats a bundle can carry, and what ``export bundle`` writes by default:
# the three runtimes mobile apps embed. "torch" adds the reference backend's
# programs (for parity checks and benchmarks; no phone runs them).
BUNDLE_FORMATS = ("onnx", "executorch", "tflite", "torch")
DEFAULT_FORMATS = ("onnx", "executorch", "tflite")
RUNTIMES = {"onnx": "onnxruntime", "executorch": "executorch", "tflite": "litert", "torch": "torch"}


def check_formats(formats: list[str] | tuple[str, ...], quantized: bool = False) -> list[str]:
    """Validate a --formats list before any work; returns it in canonical order."""
    unknown = [f for f in formats if f not in BUNDLE_FORMATS]
    if unknown:
        raise ConfigError(f"unknown bundle format(s) {', '.join(map(repr, unknown))}",
                          hint=f"formats: {', '.join(BUNDLE_FORMATS)}")
    chosen = [f for f in BUNDLE_FORMATS if f in formats]
    if not chosen:
        raise ConfigError("no bundle format chosen", hint=f"name one or more of: {', '.join(BUNDLE_FORMATS)}")
    if not any(f in TRAINING_FORMATS for f in chosen):
        raise ConfigError(f"formats {', '.join(chosen)} can run GE but not train LE and GN",
                          hint=f"add one of: {', '.join(TRAINING_FORMATS)} (onnx is the usual choice)")
    if quantized:
        refused = {f: get_format(f).cannot_carry(True) for f in chosen}
        refused = {f: why for f, why in refused.items() if why}
        if refused:
            raise ConfigError("this GE is quantized: " + "; ".join(f"{f}: {why}" for f, why in refused.items()),
                              hint=f"leave out {', '.join(refused)} from --formats")
    return chosen


def export_bundle(model_dir: str | Path, out: str | Path, experts: ExpertConfig | None = None,
                  personalize: PersonalizeConfig | None = None, make_zip: bool = True,
                  overwrite: bool = False, progress: ProgressFn | None = None,
                  formats: list[str] | tuple[str, ...] | None = None) -> Path:
    """Write the bundle directory ``out`` (and ``out.zip``); returns the directory.

    ``experts``/``personalize`` default to the recipe the GE was trained with.
    ``formats`` chooses the runtimes the bundle carries (``BUNDLE_FORMATS``);
    by default ``DEFAULT_FORMATS``, less those a quantized GE has no model for.
    """
    say = progress or (lambda _msg: None)
    model_dir = Path(model_dir)
    ckpt = GECheckpoint.load(model_dir)
    quantized = bool((ckpt.meta.get("compression") or {}).get("quantization"))
    if formats is None:
        formats = [f for f in DEFAULT_FORMATS if not quantized or f in ckpt.meta["compression"]["files"]]
        if len(formats) < len(DEFAULT_FORMATS):
            say(f"quantized GE: carrying {', '.join(formats)} (the formats `server compress` wrote)")
    formats = check_formats(formats, quantized)
    recipe = ckpt.meta.get("recipe", {})
    experts = experts or ExpertConfig(**recipe.get("experts", {}))
    personalize = personalize or PersonalizeConfig(**recipe.get("personalize", {}))
    experts.validate()
    personalize.validate()
    experts.resolve_taps(ckpt.model)
    taps = {t.name: t.dim for t in ckpt.model.feature_taps}
    out = Path(out)
    num_classes = len(ckpt.labels)
    le_dim, gn_dim = taps[experts.le_feature_tap], taps[experts.gn_feature_tap]
    torch.manual_seed(ckpt.meta.get("seed", 0))
    max_batch = max(MIN_PROGRAM_BATCH, int(math.ceil(personalize.batch_size * (1 + personalize.replay_weight))))
    parts = [
        TrainablePart("local_expert", "le", ResidualHead(le_dim, num_classes, experts.le_rank), [le_dim, num_classes],
                      ["features", "base_logits"], "logits", num_classes, max_batch),
        TrainablePart("gating_network", "gn", LogisticGate(gn_dim), [gn_dim], ["features"], "gate_logits", 2,
                      max_batch),
    ]
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        ge_files, training = {}, {part.key: {} for part in parts}
        for name in formats:
            ge_files[name] = f"ge{get_format(name).suffix}"
            say(f"exporting GE to {name} ({RUNTIMES[name]})" + (", quantized" if quantized else ""))
            export_ge(ckpt, model_dir, name, staging / ge_files[name])
            if name in TRAINING_FORMATS:
                say(f"building LE and GN training programs for {RUNTIMES[name]}")
                for part in parts:
                    training[part.key][name] = TRAINING_FORMATS[name].export(part, staging / part.directory)
        replay = io.BytesIO()
        np.savez_compressed(replay, x=ckpt.replay.images, y=ckpt.replay.labels)
        atomic.write_bytes(staging / "replay.npz", replay.getvalue())
        le, gn = parts[0].module, parts[1].module
        manifest = {
            "toolkit_version": toolkit.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": {k: ckpt.meta["input"][k] for k in ("shape", "dtype", "scale", "mean", "std", "ink", "preprocess")},
            "labels": ckpt.labels,
            "formats": {name: {"runtime": RUNTIMES[name], "files": {}} for name in formats},
            "global_expert": {
                "files": ge_files, "arch": ckpt.meta["arch"], "input_name": "image",
                "outputs": {"logits": "logits", "features": taps},
                "output_order": ["logits", *taps],
                "params": count_params(ckpt.model),
                "macs": count_macs(ckpt.model, (ckpt.normalize(ckpt.replay.images[:1]),)),
                "generic_accuracy": ckpt.meta.get("generic_accuracy"),
                "compression": _compression_summary(ckpt.meta.get("compression")),
                "training": {k: ckpt.meta.get(k) for k in ("data", "seed", "created", "toolkit_version")},
            },
            "local_expert": {
                "kind": "residual_lowrank", "rank": experts.le_rank,
                "feature_tap": experts.le_feature_tap, "feature_dim": le_dim,
                "inputs": parts[0].input_names, "output": "logits", "training": training["local_expert"],
                "parameters": parts[0].parameters(), "max_batch": max_batch,
                "params": count_params(le),
                "macs": count_macs(le, (torch.zeros(1, le_dim), torch.zeros(1, num_classes))),
            },
            "gating_network": {
                "kind": "logistic", "feature_tap": experts.gn_feature_tap, "feature_dim": gn_dim,
                "inputs": parts[1].input_names, "output": "gate_logits", "training": training["gating_network"],
                "parameters": parts[1].parameters(), "max_batch": max_batch,
                "params": count_params(gn), "macs": count_macs(gn, (torch.zeros(1, gn_dim),)),
                "threshold": experts.gate_threshold,
            },
            "replay": {"file": "replay.npz", "count": len(ckpt.replay)},
            "personalize": asdict(personalize),
        }
        write_manifest(staging, manifest)
        Bundle.open(staging).close()  # the bundle we publish must pass the device's own checks
    if make_zip:
        say("writing the single-file zip")
        zip_bundle(out, out.with_name(out.name + ".zip"))
    return out
