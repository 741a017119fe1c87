"""The bundle formats, registered once, here: what every side needs to know
about a format without importing its runtime.

A format is one runtime's way of carrying GE, and LE's and GN's training
programs, in a device bundle. Export writes it with the format's exporter
(``edgetailor.export.formats``) and training exporters
(``edgetailor.export.trainable``); a device backend (``edgetailor.device.backends``)
reads it; the manifest schema's format names and training-file roles are
filled in from ``FORMATS`` when the schema is loaded; compression recipes may
export to every format that is not a reference. Adding a format means one
line below, its exporter, and its device backend.

How a format carries training is a *training kind*. The default for every
runtime an app embeds is ``steps``: LE's and GN's whole training step
(forward, gradients, AdamW) written out as a plain inference program, plus a
forward program, so that the runtime's ordinary inference build trains them
(``docs/ARCHITECTURE.md``, "Step programs"). The other kinds are the
runtimes' own training packages, kept for parity checks and old bundles:
onnxruntime-training's artifacts (deprecated by its vendor in 1.20) and
ExecuTorch's experimental training extension.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgetailor.toolkit.errors import ConfigError

# The training kind every runtime an app embeds trains with.
STEPS = "steps"
STEP_ROLES = ("step", "forward")


@dataclass(frozen=True)
class BundleFormat:
    name: str                                # its key in manifests, --formats and recipes
    suffix: str                              # GE's file in a bundle is ge{suffix}
    runtime: str                             # the runtime that runs it, as the manifest records it
    # training kind -> the roles of LE's and GN's files; the first kind is what export writes by default
    training_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    no_quantization: str = ""                # why it cannot carry a quantized GE; "" = it can
    reference: bool = False                  # parity checks and benchmarks only: never written by default

    @property
    def trains(self) -> bool:
        """Whether a bundle carries LE and GN training programs in this format."""
        return bool(self.training_kinds)

    @property
    def default_training(self) -> str | None:
        return next(iter(self.training_kinds), None)

    @property
    def training_roles(self) -> tuple[str, ...]:
        """Every role a training file of this format may have, whatever its kind."""
        return tuple(dict.fromkeys(r for roles in self.training_kinds.values() for r in roles))

    def cannot_carry(self, quantized: bool) -> str | None:
        """Why this format cannot carry such a GE, or None."""
        return self.no_quantization or None if quantized else None


FORMATS: dict[str, BundleFormat] = {f.name: f for f in (
    BundleFormat("onnx", ".onnx", "onnxruntime", training_kinds={
        STEPS: STEP_ROLES,
        "ort-training": ("training_model", "eval_model", "optimizer_model", "checkpoint")}),
    BundleFormat("executorch", ".pte", "executorch", training_kinds={
        STEPS: STEP_ROLES,
        "executorch-training": ("program",)}),
    BundleFormat("tflite", ".tflite", "litert", training_kinds={STEPS: STEP_ROLES},
                 no_quantization="tflite export here is fp32 only: litert-torch's own quantizer would "
                                 "re-quantize the weights and drop the stage's grid (learned rounding, QAT)"),
    BundleFormat("torch", ".pt2", "torch", training_kinds={"autograd": ("program",)},
                 no_quantization="the torch reference format carries fp32 GEs only", reference=True),
)}

# The runtimes apps embed: what `export bundle` writes unless --formats says
# otherwise, and what a compression recipe may export the compressed GE to.
DEFAULT_FORMATS = tuple(name for name, f in FORMATS.items() if not f.reference)
TRAINING_FORMATS = tuple(name for name, f in FORMATS.items() if f.trains)
# Training kinds other than a format's default: written only when asked for (export --extra-training).
EXTRA_TRAINING = {kind: name for name, f in FORMATS.items() for kind in list(f.training_kinds)[1:]}


def get_format(name: str) -> BundleFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}", hint=f"formats: {', '.join(FORMATS)}") from None


def check_formats(formats: list[str] | tuple[str, ...], quantized: bool = False) -> list[str]:
    """Validate a --formats list before any work; returns it in registry order."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown bundle format(s) {', '.join(map(repr, unknown))}",
                          hint=f"formats: {', '.join(FORMATS)}")
    chosen = [f for f in FORMATS if f in formats]
    if not chosen:
        raise ConfigError("no bundle format chosen", hint=f"name one or more of: {', '.join(FORMATS)}")
    if not any(f in TRAINING_FORMATS for f in chosen):
        raise ConfigError(f"formats {', '.join(chosen)} can run GE but not train LE and GN",
                          hint=f"add one of: {', '.join(TRAINING_FORMATS)} (onnx is the usual choice)")
    if quantized:
        refused = {f: FORMATS[f].cannot_carry(True) for f in chosen}
        refused = {f: why for f, why in refused.items() if why}
        if refused:
            raise ConfigError("this GE is quantized: " + "; ".join(f"{f}: {why}" for f, why in refused.items()),
                              hint=f"leave out {', '.join(refused)} from --formats")
    return chosen


def check_extra_training(kinds: list[str] | tuple[str, ...], formats: list[str]) -> list[str]:
    """Validate an --extra-training list against the chosen formats."""
    unknown = [k for k in kinds if k not in EXTRA_TRAINING]
    if unknown:
        raise ConfigError(f"unknown training kind(s) {', '.join(map(repr, unknown))}",
                          hint=f"extra training kinds: {', '.join(EXTRA_TRAINING) or 'none'}")
    missing = [k for k in kinds if EXTRA_TRAINING[k] not in formats]
    if missing:
        raise ConfigError(f"{', '.join(missing)} needs format(s) {', '.join(EXTRA_TRAINING[k] for k in missing)}",
                          hint="add them to --formats")
    return list(dict.fromkeys(kinds))
