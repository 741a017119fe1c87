"""The bundle formats, registered once, here: what every side needs to know
about a format without importing its runtime.

A format is one runtime's way of carrying GE (and, if the runtime trains, LE
and GN's training programs) in a device bundle. Export writes it with the
format's exporter (``edgetailor.export.formats``) and training programs
(``edgetailor.export.trainable``); a device backend (``edgetailor.device.backends``)
reads it; the manifest schema's format names and training-file roles are
filled in from ``FORMATS`` when the schema is loaded; compression recipes may
export to every format that is not a reference. Adding a format means one
line below, its exporter, and its device backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetailor.toolkit.errors import ConfigError


@dataclass(frozen=True)
class BundleFormat:
    name: str                                # its key in manifests, --formats and recipes
    suffix: str                              # GE's file in a bundle is ge{suffix}
    runtime: str                             # the runtime that runs it, as the manifest records it
    training_files: tuple[str, ...] = ()     # roles of LE's and GN's training files; () = GE inference only
    no_quantization: str = ""                # why it cannot carry a quantized GE; "" = it can
    reference: bool = False                  # parity checks and benchmarks only: never written by default

    @property
    def trains(self) -> bool:
        """Whether a bundle carries LE and GN training programs in this format."""
        return bool(self.training_files)

    def cannot_carry(self, quantized: bool) -> str | None:
        """Why this format cannot carry such a GE, or None."""
        return self.no_quantization or None if quantized else None


FORMATS: dict[str, BundleFormat] = {f.name: f for f in (
    BundleFormat("onnx", ".onnx", "onnxruntime",
                 training_files=("training_model", "eval_model", "optimizer_model", "checkpoint")),
    BundleFormat("executorch", ".pte", "executorch", training_files=("program",)),
    BundleFormat("tflite", ".tflite", "litert",
                 no_quantization="tflite export here is fp32 only: litert-torch's own quantizer would "
                                 "re-quantize the weights and drop the stage's grid (learned rounding, QAT)"),
    BundleFormat("torch", ".pt2", "torch", training_files=("program",),
                 no_quantization="the torch reference format carries fp32 GEs only", reference=True),
)}

# The runtimes apps embed: what `export bundle` writes unless --formats says
# otherwise, and what a compression recipe may export the compressed GE to.
DEFAULT_FORMATS = tuple(name for name, f in FORMATS.items() if not f.reference)
TRAINING_FORMATS = tuple(name for name, f in FORMATS.items() if f.trains)


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
