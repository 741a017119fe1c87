"""Turn a GE checkpoint into a device bundle.

The bundle holds GE as an ONNX inference model that returns its logits and
the intermediate features LE and GN read, and LE and GN as ONNX Runtime
on-device training artifacts (training, eval and optimizer models and a
checkpoint). Every exported model is run against its torch source before the
bundle is published; a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
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
from toolkit.errors import CheckpointError
from toolkit.models import WithFeatures
from server_side.checkpoint import GECheckpoint

# onnxruntime-training 1.19 reads ONNX IR version 10 at most; current onnx writes newer.
MAX_IR_VERSION = 10
OPSET = 17
PARITY_TOLERANCE = 1e-4

ProgressFn = Callable[[str], None]


class ResidualHead(nn.Module):
    """The Local Expert: ``logits = base_logits + U @ (V @ features) + b``.

    U and b start at zero, so an untrained LE answers exactly like GE; V is a
    random projection that training refines (as in LoRA). The rank keeps LE
    at ~2 % of GE even on GE's 400 conv features, which correct a user's hand
    better than the later, more class-specific fc features (docs/DESIGN.md).
    ``rank = 0`` is a plain full-rank ``W @ features``."""

    def __init__(self, feature_dim: int, num_classes: int, rank: int = 0):
        super().__init__()
        self.down = nn.Linear(feature_dim, rank, bias=False) if rank else nn.Identity()
        self.up = nn.Linear(rank or feature_dim, num_classes)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, features: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        return base_logits + self.up(self.down(features))


class LogisticGate(nn.Module):
    """The Gating Network: one score s, "this input looks like the user's writing".

    It returns two-class logits ``[0, s]`` (so P(LE) = sigmoid(s)) to train with
    ONNX Runtime's SoftmaxCrossEntropy: its BCEWithLogits block computes
    log(sigmoid) in two steps and returns NaN once the gate grows confident."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.score = nn.Linear(feature_dim, 1)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        score = self.score(features)
        return torch.cat([torch.zeros_like(score), score], dim=1)


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


def export_ge(ckpt: GECheckpoint, path: Path) -> dict[str, int]:
    """GE -> ONNX with outputs logits + every feature tap; checked against torch."""
    import onnxruntime as ort

    model = WithFeatures(ckpt.model).eval()
    taps = ckpt.model.feature_taps
    example = ckpt.normalize(ckpt.replay.images[:8])
    _onnx_export(model, (example,), path, ["image"], ["logits", *(t.name for t in taps)], training=False)
    _cap_ir_version(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": example.numpy()})
    with torch.no_grad():
        want = model(example)
    for name, g, w in zip(["logits", *(t.name for t in taps)], got, want):
        diff = float(np.abs(g - w.numpy()).max())
        if diff > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export of GE output {name!r} differs from torch by {diff:.2e}")
    return {t.name: t.dim for t in taps}


# A quantized GE's ONNX answers like its torch twin (same integer weights) up
# to activation rounding: most argmaxes agree, logits do not to 1e-4.
QUANTIZED_AGREEMENT = 0.95


def copy_quantized_ge(ckpt: GECheckpoint, model_dir: Path, path: Path) -> None:
    """A quantized GE ships as the QDQ model ``server compress`` wrote (the
    integers are decided there); check it still has GE's outputs and answers
    like the checkpoint's weights before it goes into a bundle."""
    import onnxruntime as ort

    source = model_dir / ckpt.meta["compression"]["files"]["onnx"]
    if not source.is_file():
        raise CheckpointError(f"{model_dir} is a quantized GE but its ONNX model {source.name} is missing",
                              hint="re-run `edgetailor server compress`")
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    taps = [t.name for t in ckpt.model.feature_taps]
    if outputs != ["logits", *taps]:
        raise CheckpointError(f"{source} returns {outputs}, expected logits and the features {taps}")
    example = ckpt.normalize(ckpt.replay.images)
    got = session.run(["logits"], {"image": example.numpy()})[0].argmax(1)
    with torch.no_grad():
        want = ckpt.model(example).argmax(1).numpy()
    agreement = float((got == want).mean())
    if agreement < QUANTIZED_AGREEMENT:
        raise CheckpointError(f"{source} agrees with the checkpoint's weights on only {agreement:.1%} of the "
                              "replay glyphs; the files do not belong together",
                              hint="re-run `edgetailor server compress`")
    atomic.write_bytes(path, source.read_bytes())


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


def export_trainable(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                     output: str, loss: str, out_dir: Path) -> dict[str, str]:
    """A tiny torch module -> ONNX Runtime training artifacts in ``out_dir``."""
    import onnx
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    from onnxruntime.training import artifacts

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        forward = Path(tmp) / "forward.onnx"
        _onnx_export(module, example, forward, input_names, [output], training=True)
        graph = onnx.load(str(forward))
        trainable = [init.name for init in graph.graph.initializer]
        with _native_stderr_captured():
            artifacts.generate_artifacts(
                graph, requires_grad=trainable, frozen_params=[], loss=getattr(artifacts.LossType, loss),
                optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out_dir))
    files = {"training_model": "training_model.onnx", "eval_model": "eval_model.onnx",
             "optimizer_model": "optimizer_model.onnx", "checkpoint": "checkpoint"}
    for name in ("training_model", "eval_model", "optimizer_model"):
        _cap_ir_version(out_dir / files[name])
    return {k: f"{out_dir.name}/{v}" for k, v in files.items()}


def export_bundle(model_dir: str | Path, out: str | Path, experts: ExpertConfig | None = None,
                  personalize: PersonalizeConfig | None = None, make_zip: bool = True,
                  overwrite: bool = False, progress: ProgressFn | None = None) -> Path:
    """Write the bundle directory ``out`` (and ``out.zip``); returns the directory.

    ``experts``/``personalize`` default to the recipe the GE was trained with.
    """
    say = progress or (lambda _msg: None)
    ckpt = GECheckpoint.load(model_dir)
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
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        compression = ckpt.meta.get("compression")
        if compression and compression.get("quantization"):
            say("adding the quantized GE (ONNX QDQ)")
            copy_quantized_ge(ckpt, Path(model_dir), staging / "ge.onnx")
        else:
            say("exporting GE to ONNX")
            export_ge(ckpt, staging / "ge.onnx")
        say("building LE training artifacts")
        torch.manual_seed(ckpt.meta.get("seed", 0))
        le = ResidualHead(le_dim, num_classes, experts.le_rank)
        le_files = export_trainable(le, (torch.zeros(2, le_dim), torch.zeros(2, num_classes)),
                                    ["features", "base_logits"], "logits", "CrossEntropyLoss", staging / "le")
        say("building GN training artifacts")
        gn = LogisticGate(gn_dim)
        gn_files = export_trainable(gn, (torch.zeros(2, gn_dim),), ["features"], "gate_logits",
                                    "CrossEntropyLoss", staging / "gn")
        replay = io.BytesIO()
        np.savez_compressed(replay, x=ckpt.replay.images, y=ckpt.replay.labels)
        atomic.write_bytes(staging / "replay.npz", replay.getvalue())
        manifest = {
            "toolkit_version": toolkit.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": {k: ckpt.meta["input"][k] for k in ("shape", "dtype", "scale", "mean", "std", "ink", "preprocess")},
            "labels": ckpt.labels,
            "global_expert": {
                "file": "ge.onnx", "arch": ckpt.meta["arch"], "input_name": "image",
                "outputs": {"logits": "logits", "features": taps},
                "params": count_params(ckpt.model),
                "macs": count_macs(ckpt.model, (ckpt.normalize(ckpt.replay.images[:1]),)),
                "generic_accuracy": ckpt.meta.get("generic_accuracy"),
                "compression": _compression_summary(ckpt.meta.get("compression")),
                "training": {k: ckpt.meta.get(k) for k in ("data", "seed", "created", "toolkit_version")},
            },
            "local_expert": {
                "kind": "residual_lowrank", "rank": experts.le_rank,
                "feature_tap": experts.le_feature_tap, "feature_dim": le_dim,
                "inputs": ["features", "base_logits"], "output": "logits", "artifacts": le_files,
                "params": count_params(le),
                "macs": count_macs(le, (torch.zeros(1, le_dim), torch.zeros(1, num_classes))),
            },
            "gating_network": {
                "kind": "logistic", "feature_tap": experts.gn_feature_tap, "feature_dim": gn_dim,
                "inputs": ["features"], "output": "gate_logits", "artifacts": gn_files,
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
