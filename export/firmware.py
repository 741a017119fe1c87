"""A device bundle as a C project for microcontrollers: ``edgetailor export firmware``.

The firmware (``firmware_examples/``: libedgetailor, a host example, a
Cortex-M4 port) runs the same GE, LE, GN, defaults and seeded order as the
Python device runtime, from constant data compiled into flash. This module
writes that data, ``model/edgetailor_model.{c,h}``, from a bundle, next to
a copy of the C sources, so that OUT builds as it is.

What goes into flash is the bundle's, nothing retrained: GE's layers as
``export.firmware_graph`` compiles them from the bundle's ONNX GE (an int8 GE
keeps its own integers), LE's and GN's initial weights and optimizer, the
personalize defaults, and the replay glyphs in a zero-run code (handwriting
is mostly background: the digits' replay glyphs shrink 2.6-fold), since a
Cortex-M4's flash holds less than the raw glyphs. Every table is checked
before anything is written: the layers against onnxruntime on the replay
glyphs, every coded glyph by decoding it again.

``bundle_id`` is the Python runtime's (``Bundle.bundle_id``), so a
personalization saved on the device is bound to the same bundle as the
phone's would be.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgetailor.toolkit import __version__, atomic
from edgetailor.toolkit.bundle import MANIFEST, Bundle, TrustCheck
from edgetailor.toolkit.config import PersonalizeConfig, from_dict
from edgetailor.toolkit.errors import ExportError, TrustError
from edgetailor.toolkit.manifest import Manifest, TrainablePartSpec
from edgetailor.toolkit.signing import BundleSignature, load_public_keys
from edgetailor.export.firmware_graph import (OP_CONV2D, OP_LINEAR, OP_NAMES, TAP_BOTH, TAP_GN, TAP_LE, TAP_NONE,
                                              CompiledGE, check_against_onnxruntime, compile_ge)

MODEL_DIR = "model"
PROJECT_PARTS = ("libedgetailor", "example", "cortex-m4", "Makefile", "README.md")
BUILD_OUTPUTS = ("__init__.py", "__pycache__", "*.pyc", "build", "*.o", "*.a", "*.d", "*.elf", "*.bin", "*.hex",
                 "*.map", "*.su", "example-host", "model")
NO_OFFSET = 0xFFFFFFFF          # a parameter the LE design does not have
LE_KINDS = {"residual_channel_mix": 1, "residual_lowrank": 2}    # et_le_kind
LINE = 120

ProgressFn = Callable[[str], None]


# ------------------------------------------------------------------ replay code
def encode_glyph(pixels: np.ndarray) -> bytes:
    """One glyph's zero-run code: pairs of [u8 zeros][u8 literal count][the literals] until every pixel is
    covered. A lone zero between ink pixels goes into the literals (one byte, where a new pair costs two)."""
    flat = np.asarray(pixels, np.uint8).reshape(-1).tobytes()
    n, i, out = len(flat), 0, bytearray()
    while i < n:
        zeros = 0
        while i + zeros < n and flat[i + zeros] == 0 and zeros < 255:
            zeros += 1
        i += zeros
        start = i
        while i < n and i - start < 255:
            if flat[i] != 0:
                i += 1
            elif i + 1 < n and flat[i + 1] != 0 and i - start + 2 <= 255:
                i += 2
            else:
                break
        out += bytes((zeros, i - start)) + flat[start:i]
    return bytes(out)


def decode_glyph(data: bytes | memoryview, offset: int, n_pixels: int) -> tuple[np.ndarray, int]:
    """The glyph coded at ``offset``, and the offset just past it (as the firmware decodes it)."""
    out = bytearray()
    while len(out) < n_pixels:
        if offset + 2 > len(data):
            raise ExportError("a replay glyph's code runs past the end of the data")
        zeros, literals = data[offset], data[offset + 1]
        offset += 2
        if len(out) + zeros + literals > n_pixels or offset + literals > len(data):
            raise ExportError("a replay glyph's code covers more pixels than the glyph has")
        out += bytes(zeros) + bytes(data[offset:offset + literals])
        offset += literals
    return np.frombuffer(bytes(out), np.uint8), offset


def encode_replay(glyphs: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Every glyph coded on its own (so the firmware reads any one directly), checked by decoding it again."""
    glyphs = np.asarray(glyphs, np.uint8)
    data, offsets = bytearray(), []
    for glyph in glyphs:
        offsets.append(len(data))
        data += encode_glyph(glyph)
    data = bytes(data)
    ends = [*offsets[1:], len(data)]
    for glyph, start, end in zip(glyphs, offsets, ends):
        decoded, stop = decode_glyph(data, start, glyph.size)
        if stop != end or not np.array_equal(decoded, glyph.reshape(-1)):
            raise ExportError("a replay glyph does not decode to itself", hint="this is a bug in the exporter")
    return data, np.asarray(offsets, np.uint32)


# -------------------------------------------------------------------- C text
def c_float(value: float) -> str:
    """A float32 as a C99 hexadecimal constant: exact, so the firmware's value is the bundle's to the bit."""
    f = float(np.float32(value))
    if not math.isfinite(f):
        raise ExportError(f"the model holds a non-finite value ({f}); the firmware cannot",
                          hint="re-train or re-export the GE; its weights diverged")
    if f == 0.0:
        return "-0.0f" if math.copysign(1.0, f) < 0 else "0.0f"
    mantissa, exponent = f.hex().split("p")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}p{exponent}f"


def c_double(value: float) -> str:
    """A float64 as a C99 hexadecimal constant, for the settings Python computes with in double precision."""
    f = float(value)
    if not math.isfinite(f):
        raise ExportError(f"the model holds a non-finite setting ({f})", hint="re-export the bundle")
    if f == 0.0:
        return "-0.0" if math.copysign(1.0, f) < 0 else "0.0"
    mantissa, exponent = f.hex().split("p")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}{'0' if mantissa.endswith('.') else ''}p{exponent}"


def c_int(value: int, bits: int = 32) -> str:
    value = int(value)
    if value == -(1 << (bits - 1)):
        return f"({value + 1} - 1)"          # -2147483648 is the negation of a constant too large for int
    return str(value)


def c_string(text: str) -> str:
    """A C string literal: printable ASCII as itself, every other byte as a three-digit octal escape (a hex
    escape would swallow the hex digits after it), and no trigraphs."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "?" and out and out[-1] in ("?", "\\?"):
            out.append("\\?")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_comment(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in str(text)).replace("*/", "* /")


def c_array(ctype: str, name: str, items: Iterable[str], comment: str = "") -> str:
    """``static const ctype name[] = {...};`` with lines wrapped at LINE characters."""
    lines, line = [], "   "
    count = 0
    for item in items:
        count += 1
        piece = f" {item},"
        if len(line) + len(piece) > LINE:
            lines.append(line)
            line = "   "
        line += piece
    if line.strip():
        lines.append(line)
    head = f"/* {c_comment(comment)} */\n" if comment else ""
    return f"{head}static const {ctype} {name}[{count}] = {{\n" + "\n".join(lines) + "\n};\n"


# --------------------------------------------------------------------- report
@dataclass
class FirmwareReport:
    out: Path
    bundle_id: str
    quantized: bool
    layers: int
    max_activation: int
    replay_count: int
    ge_bytes: int               # layer weights, biases, multipliers and the input table
    replay_bytes: int           # coded glyphs and their offsets
    le_bytes: int               # LE's initial weights
    gn_bytes: int               # GN's initial weights
    replay_raw_bytes: int       # the same glyphs uncoded
    check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def flash_bytes(self) -> int:
        """The model's constant data; the code and the C library come on top."""
        return self.ge_bytes + self.replay_bytes + self.le_bytes + self.gn_bytes

    def rows(self) -> list[dict[str, Any]]:
        """The flash parts, for the CLI's table."""
        return [{"part": "GE (" + ("int8" if self.quantized else "fp32") + f", {self.layers} layers)",
                 "bytes": self.ge_bytes},
                {"part": f"replay ({self.replay_count} glyphs, zero-run coded)", "bytes": self.replay_bytes},
                {"part": "LE initial weights", "bytes": self.le_bytes},
                {"part": "GN initial weights", "bytes": self.gn_bytes},
                {"part": "model data in flash", "bytes": self.flash_bytes}]


# ------------------------------------------------------------------ the bundle
def pinned_keys(paths: Iterable[str | Path]) -> TrustCheck:
    """A ``TrustCheck`` that accepts only bundles signed by one of these keys or a key they endorse (the
    bundle's own statements, revocations first, as a device applies them), with no state to remember them."""
    keys = [key for path in paths for key in load_public_keys(path)]

    def check(manifest: Manifest, signature: BundleSignature | None, source: Path) -> None:
        if signature is None:
            raise TrustError(f"{source} is not signed, and --trusted-keys were given",
                             hint="export the signed bundle (`edgetailor export bundle --signing-key KEY`), or "
                                  "leave out --trusted-keys")
        trusted, revoked = {key.id for key in keys}, set()
        changed = True
        while changed:
            changed = False
            for kind in ("revoke", "endorse"):
                for statement in signature.statements:
                    if statement.kind != kind or statement.issuer not in trusted or statement.issuer in revoked:
                        continue
                    if kind == "revoke" and statement.subject not in revoked:
                        revoked.add(statement.subject)
                        changed = True
                    elif kind == "endorse" and statement.subject not in trusted | revoked:
                        trusted.add(statement.subject)
                        changed = True
        signer = signature.signer_id
        if signer in revoked or signer not in trusted:
            raise TrustError(f"{source} is signed by key {signer[:16]}, which "
                             + ("has been revoked" if signer in revoked else "none of --trusted-keys is or endorses"),
                             hint="give the publisher's current key with --trusted-keys")

    return check


def open_bundle(bundle_path: str | Path, trusted_keys: Iterable[str | Path] | None) -> tuple[Bundle, list[str]]:
    """The bundle, checked as the device checks it; without keys a signature is verified but its signer is not
    (notes say so)."""
    keys = list(trusted_keys or [])
    bundle = Bundle.open(bundle_path, trust=pinned_keys(keys) if keys else None)
    notes = []
    if bundle.signature is not None and not keys:
        notes.append(f"the bundle is signed by key {bundle.signer_id[:16]}; give --trusted-keys to check that it is "
                     "your publisher's")
    elif bundle.signature is None:
        notes.append("the bundle is not signed: the firmware runs whatever it holds")
    release = bundle.manifest.release
    if release is not None and release.expired():
        notes.append(f"the bundle ({release.name} version {release.version}) expired at {release.expires}; "
                     "devices running the Python runtime refuse it")
    return bundle, notes


def _le_gn(manifest: Manifest, bundle: Bundle) -> dict[str, Any]:
    """LE's and GN's shapes, parameter offsets, initial weights and optimizers, as et_model holds them."""
    le, gn = manifest.local_expert, manifest.gating_network
    n_classes = len(manifest.labels)
    if le.kind not in LE_KINDS:
        raise ExportError(f"the bundle's LE is {le.kind!r}; the firmware runs {', '.join(LE_KINDS)}",
                          hint="re-export the bundle with one of those LE designs")
    if gn.kind != "logistic":
        raise ExportError(f"the bundle's GN is {gn.kind!r}; the firmware runs 'logistic'", hint="re-export the bundle")
    if le.kind == "residual_channel_mix":
        channels, width = int(le.channels or 0), int(le.width or 0)
        if not channels or le.feature_dim % channels:
            raise ExportError(f"LE mixes {channels} channels of a {le.feature_dim}-wide feature")
        positions = le.feature_dim // channels
        expected = {"mix.weight": [width, channels], "mix.bias": [width], "up.weight": [n_classes, positions * width],
                    "up.bias": [n_classes]}
        names = ("mix.weight", "mix.bias", "up.weight", "up.bias")
        shape = {"le_channels": channels, "le_width": width, "le_rank": 0, "le_hidden": positions * width}
    else:
        rank = int(le.rank or 0)
        expected = {"up.weight": [n_classes, rank or le.feature_dim], "up.bias": [n_classes]}
        if rank:
            expected["down.weight"] = [rank, le.feature_dim]
        names = ("down.weight", None, "up.weight", "up.bias")
        shape = {"le_channels": 0, "le_width": 0, "le_rank": rank, "le_hidden": rank or le.feature_dim}
    parts = {}
    for key, spec, want in (("le", le, expected), ("gn", gn, {"score.weight": [1, gn.feature_dim],
                                                               "score.bias": [1]})):
        parts[key] = _flat_parameters(key.upper(), spec, want, bundle)
    le_offsets, le_initial = parts["le"]
    gn_offsets, gn_initial = parts["gn"]
    return {**shape, "le_kind": LE_KINDS[le.kind], "le_initial": le_initial, "gn_initial": gn_initial,
            "le_offsets": [le_offsets[n] if n in le_offsets else NO_OFFSET for n in names],
            "gn_offsets": [gn_offsets["score.weight"], gn_offsets["score.bias"]],
            "le_optimizer": _adamw("LE", le), "gn_optimizer": _adamw("GN", gn),
            "gate_threshold": float(gn.threshold if gn.threshold is not None else 0.5)}


def _flat_parameters(what: str, spec: TrainablePartSpec, expected: dict[str, list[int]],
                     bundle: Bundle) -> tuple[dict[str, int], np.ndarray]:
    if not spec.parameters or not spec.initial_parameters:
        raise ExportError(f"the bundle's {what} has no parameter list or initial weights (a bundle from before 0.2)",
                          hint="re-export it with `edgetailor export bundle`")
    if {k: list(v) for k, v in spec.parameters.items()} != expected:
        raise ExportError(f"the bundle's {what} has parameters {spec.parameters}; the firmware expects {expected}",
                          hint="re-export the bundle with this toolkit")
    offsets, at = {}, 0
    for name in spec.parameter_order:            # sorted by name, as the step programs and the manifest
        offsets[name] = at
        at += int(np.prod(spec.parameters[name]))
    initial = np.load(bundle.path(spec.initial_parameters), allow_pickle=False)
    if initial.dtype != np.float32 or initial.shape != (at,):
        raise ExportError(f"{spec.initial_parameters} holds {initial.dtype} {initial.shape}, not float32 ({at},)",
                          hint="re-export the bundle")
    return offsets, initial


def _adamw(what: str, spec: TrainablePartSpec) -> dict[str, float]:
    opt = spec.optimizer or {}
    if opt.get("name") != "adamw":
        raise ExportError(f"the bundle's {what} trains with {opt.get('name')!r}; the firmware runs AdamW",
                          hint="re-export the bundle with this toolkit")
    beta1, beta2 = opt["betas"]
    return {"beta1": float(beta1), "beta2": float(beta2), "eps": float(opt["eps"]),
            "weight_decay": float(opt.get("weight_decay", 0.0))}


def _defaults(manifest: Manifest) -> dict[str, Any]:
    cfg = from_dict(PersonalizeConfig, manifest.personalize, "personalize")
    ints = {k: int(getattr(cfg, k)) for k in ("le_epochs", "le_max_steps", "batch_size", "augment_copies",
                                               "augment_until", "gn_steps")}
    for key, value in ints.items():
        if not 0 <= value <= 0xFFFFFFFF:
            raise ExportError(f"personalize.{key} = {value} does not fit the firmware's uint32")
    if not 0 <= int(cfg.seed) < (1 << 64):
        raise ExportError(f"personalize.seed = {cfg.seed} does not fit the firmware's uint64")
    return {**ints, **{k: float(getattr(cfg, k)) for k in ("le_learning_rate", "gn_learning_rate", "replay_weight",
                                                            "gate_generic_share")}, "seed": int(cfg.seed)}


def _replay(manifest: Manifest, bundle: Bundle, in_hw: tuple[int, int]) -> np.ndarray:
    with np.load(bundle.path(manifest.replay.file), allow_pickle=False) as archive:
        glyphs = archive["x"]
    if glyphs.dtype != np.uint8 or glyphs.ndim != 3 or glyphs.shape[1:] != in_hw:
        raise ExportError(f"{manifest.replay.file} holds {glyphs.dtype} {glyphs.shape}, not uint8 glyphs of "
                          f"{in_hw[0]}x{in_hw[1]}", hint="re-export the bundle")
    return glyphs


# -------------------------------------------------------------- the C sources
def firmware_sources() -> Path:
    """The C library and examples: ``edgetailor/firmware`` in an installed wheel, ``firmware_examples/`` in a
    checkout."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("edgetailor.firmware")
    except ImportError:
        spec = None
    candidates = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(Path(__file__).resolve().parents[1] / "firmware_examples")
    for candidate in candidates:
        if (candidate / "libedgetailor" / "include" / "edgetailor.h").is_file():
            return candidate
    raise ExportError("the firmware's C sources (libedgetailor) are not installed with this edgetailor",
                      hint="reinstall edgetailor (`pip install edgetailor[server]`) or run from a checkout")


def _copy_project(into: Path) -> list[str]:
    source = firmware_sources()
    copied = []
    for part in PROJECT_PARTS:
        path = source / part
        if path.is_dir():
            shutil.copytree(path, into / part, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
        elif path.is_file():
            shutil.copy2(path, into / part)
        else:
            continue
        copied.append(part)
    return copied


# ------------------------------------------------------------------ the writer
def _layer_arrays(ge: CompiledGE) -> tuple[list[str], list[dict[str, str]]]:
    """Each layer's constant arrays, and the names its initializer points at."""
    blocks, refs = [], []
    for i, layer in enumerate(ge.layers):
        stem = f"l{i}_{OP_NAMES[layer.op]}"
        ref = {"weight": "NULL", "bias": "NULL", "weight_q": "NULL", "bias_q": "NULL", "multiplier": "NULL"}
        if layer.op in (OP_CONV2D, OP_LINEAR):
            where = f"layer {i}: {layer.node}"
            if ge.quantized:
                blocks.append(c_array("int8_t", f"{stem}_weight_q", map(str, layer.weight_q.reshape(-1)),
                                      f"{where}, int8 weights {list(layer.weight_q.shape)}"))
                blocks.append(c_array("int32_t", f"{stem}_bias_q", (c_int(v) for v in layer.bias_q),
                                      f"{where}, int32 bias on the grid in_scale * weight_scale[c]"))
                blocks.append(c_array("float", f"{stem}_multiplier", map(c_float, layer.multiplier),
                                      f"{where}, in_scale * weight_scale[c] / out_scale"))
                ref.update(weight_q=f"{stem}_weight_q", bias_q=f"{stem}_bias_q", multiplier=f"{stem}_multiplier")
            else:
                blocks.append(c_array("float", f"{stem}_weight", map(c_float, layer.weight.reshape(-1)),
                                      f"{where}, weights {list(layer.weight.shape)}"))
                blocks.append(c_array("float", f"{stem}_bias", map(c_float, layer.bias), f"{where}, bias"))
                ref.update(weight=f"{stem}_weight", bias=f"{stem}_bias")
        refs.append(ref)
    return blocks, refs


def _tap_code(tap: int) -> str:
    return {TAP_NONE: "-1", TAP_LE: "ET_TAP_LE", TAP_GN: "ET_TAP_GN", TAP_BOTH: "2 /* ET_TAP_LE and ET_TAP_GN */"}[tap]


def _layer_table(ge: CompiledGE, refs: list[dict[str, str]]) -> str:
    ops = {1: "ET_OP_CONV2D", 2: "ET_OP_RELU", 3: "ET_OP_MAXPOOL", 4: "ET_OP_FLATTEN", 5: "ET_OP_LINEAR"}
    rows = []
    for layer, ref in zip(ge.layers, refs):
        quant = (layer.in_quant, layer.out_quant) if ge.quantized else (None, None)
        fields = [
            f".op = {ops[layer.op]}", f".kernel_h = {layer.kernel[0]}", f".kernel_w = {layer.kernel[1]}",
            f".stride_h = {layer.stride[0]}", f".stride_w = {layer.stride[1]}", f".pad_top = {layer.pads[0]}",
            f".pad_left = {layer.pads[1]}", f".tap = {_tap_code(layer.tap)}",
            f".in_c = {layer.in_shape[0]}", f".in_h = {layer.in_shape[1]}", f".in_w = {layer.in_shape[2]}",
            f".out_c = {layer.out_shape[0]}", f".out_h = {layer.out_shape[1]}", f".out_w = {layer.out_shape[2]}",
            *(f".{k} = {v}" for k, v in ref.items()),
            f".out_scale = {c_float(quant[1].scale) if quant[1] else '0.0f'}",
            f".in_zero_point = {quant[0].zero_point if quant[0] else 0}",
            f".out_zero_point = {quant[1].zero_point if quant[1] else 0}",
        ]
        rows.append(f"    /* {c_comment(layer.node)} */\n    {{" + _wrap(fields, 8) + "},")
    return "static const et_layer layers[] = {\n" + "\n".join(rows) + "\n};\n"


def _wrap(fields: list[str], indent: int) -> str:
    lines, line = [], ""
    for item in fields:
        piece = f"{item}, "
        if line and len(line) + len(piece) + indent > LINE:
            lines.append(line.rstrip())
            line = " " * indent
        line += piece
    lines.append(line.rstrip().rstrip(","))
    return "\n".join(lines)


def write_model_sources(model_dir: Path, ge: CompiledGE, manifest: Manifest, bundle_id: str, manifest_sha256: str,
                        parts: dict[str, Any], defaults: dict[str, Any], replay_data: bytes,
                        replay_offsets: np.ndarray, max_samples: int, sizes: dict[str, int]) -> None:
    """``edgetailor_model.h`` (macros, the size table) and ``edgetailor_model.c`` (``et_model_data``)."""
    n_classes = len(manifest.labels)
    le_dim, gn_dim = ge.tap_dim(TAP_LE), ge.tap_dim(TAP_GN)
    release = manifest.release
    label_list = ", ".join(manifest.labels)
    header = f"""/*
 * The model of bundle {bundle_id}, written by `edgetailor export firmware` (edgetailor {__version__}).
 * Do not edit: export it again from the bundle.
 *
 *   bundle     {c_comment(release.name if release else '(unnamed)')} version {release.version if release else '-'}
 *   manifest   sha256 {manifest_sha256}
 *   GE         {manifest.global_expert.arch}, {'int8' if ge.quantized else 'fp32'}, {len(ge.layers)} layers
 *   labels     {c_comment(label_list[:200])}
 *
 *   flash (bytes)
 *     GE weights, biases, multipliers, input table  {sizes['ge']:>9,}
 *     replay glyphs (zero-run coded) + offsets      {sizes['replay']:>9,}  ({sizes['replay_raw']:,} uncoded)
 *     LE initial weights                            {sizes['le']:>9,}
 *     GN initial weights                            {sizes['gn']:>9,}
 *     model data in all                             {sizes['flash']:>9,}  (the code comes on top)
 */
#ifndef EDGETAILOR_MODEL_H
#define EDGETAILOR_MODEL_H

#include "edgetailor.h"

#define ET_MODEL_BUNDLE_ID {c_string(bundle_id)}
#define ET_MODEL_IN_H {ge.in_hw[0]}
#define ET_MODEL_IN_W {ge.in_hw[1]}
#define ET_MODEL_CLASSES {n_classes}
#define ET_MODEL_QUANTIZED {int(ge.quantized)}
/* elements of the largest layer input plus its output */
#define ET_MODEL_MAX_ACTIVATION {ge.max_activation}
#define ET_MODEL_LE_PARAMS {parts['le_initial'].size}
#define ET_MODEL_GN_PARAMS {parts['gn_initial'].size}
#define ET_MODEL_LE_DIM {le_dim}
#define ET_MODEL_GN_DIM {gn_dim}
/* the width of LE's hidden vector, up.weight's input: positions * width (channel mix), rank (low rank), or
 * the feature's width (rank 0) */
#define ET_MODEL_LE_HIDDEN {parts['le_hidden']}
#define ET_MODEL_REPLAY {len(replay_offsets)}
#define ET_MODEL_AUGMENT_COPIES {defaults['augment_copies']}
/* the most samples one personalization takes (`edgetailor export firmware --max-samples`) */
#ifndef ET_MAX_SAMPLES
#define ET_MAX_SAMPLES {max_samples}
#endif
/* the arena a personalization of ET_MAX_SAMPLES samples needs, a second personalization included (an upper
 * bound, edgetailor.h) */
#ifndef ET_ARENA_BYTES
#define ET_ARENA_BYTES \\
    ET_PERSONALIZE_ARENA_BOUND(ET_MODEL_IN_H, ET_MODEL_IN_W, ET_MODEL_MAX_ACTIVATION, ET_MODEL_QUANTIZED, \\
                               ET_MODEL_CLASSES, ET_MODEL_LE_DIM, ET_MODEL_GN_DIM, ET_MODEL_LE_HIDDEN, \\
                               ET_MODEL_LE_PARAMS, ET_MODEL_GN_PARAMS, ET_MODEL_REPLAY, \\
                               (ET_MAX_SAMPLES) * (ET_MODEL_AUGMENT_COPIES + 1u))
#endif

extern const et_model et_model_data;

#endif /* EDGETAILOR_MODEL_H */
"""
    blocks, refs = _layer_arrays(ge)
    if ge.quantized:
        blocks.append(c_array("uint8_t", "input_q_lut", map(str, ge.input_q_lut),
                              "pixel value -> GE's quantized input: QuantizeLinear(InputSpec.normalize(p))"))
    else:
        blocks.append(c_array("float", "input_lut", map(c_float, ge.input_lut),
                              "pixel value -> GE's input, as InputSpec.normalize"))
    blocks.append(c_array("float", "le_initial", map(c_float, parts["le_initial"]),
                          "LE's initial parameters, flat, sorted by name"))
    blocks.append(c_array("float", "gn_initial", map(c_float, parts["gn_initial"]),
                          "GN's initial parameters, flat, sorted by name"))
    has_replay = len(replay_offsets) > 0
    if has_replay:
        blocks.append(c_array("uint8_t", "replay_data", map(str, replay_data),
                              "replay glyphs: per glyph, [u8 zeros][u8 literal count][literals] until "
                              f"{ge.in_hw[0]}x{ge.in_hw[1]} pixels are covered"))
        blocks.append(c_array("uint32_t", "replay_offsets", (f"{v}u" for v in replay_offsets),
                              "each glyph's first byte in replay_data"))
    labels = "static const char *const labels[] = {\n" + "\n".join(
        f"    {c_string(label)}," for label in manifest.labels) + "\n};\n"

    def quant_pair(tap: int) -> tuple[str, str]:
        quant = ge.tap_quant(tap) if ge.quantized else None
        return (c_float(quant.scale), str(quant.zero_point)) if quant else ("0.0f", "0")

    le_scale, le_zp = quant_pair(TAP_LE)
    gn_scale, gn_zp = quant_pair(TAP_GN)
    logits_quant = ge.layers[-1].out_quant if ge.quantized else None

    def adamw(opt: dict[str, float]) -> str:
        # doubles: the step programs bake in float32(1 - beta) computed from the double, not 1 - float32(beta)
        return "{" + ", ".join(f".{k} = {c_double(v)}" for k, v in opt.items()) + "}"

    d = defaults
    off = parts["le_offsets"]
    body = [
        ".abi_version = ET_ABI_VERSION",
        ".bundle_id = ET_MODEL_BUNDLE_ID",
        f".manifest_sha256 = {c_string(manifest_sha256)}",
        ".quantized = ET_MODEL_QUANTIZED",
        ".in_h = ET_MODEL_IN_H", ".in_w = ET_MODEL_IN_W",
        f".input_lut = {'NULL' if ge.quantized else 'input_lut'}",
        f".input_q_lut = {'input_q_lut' if ge.quantized else 'NULL'}",
        f".n_layers = {len(ge.layers)}", ".layers = layers",
        ".n_classes = ET_MODEL_CLASSES", ".labels = labels",
        f".logits_scale = {c_float(logits_quant.scale) if logits_quant else '0.0f'}",
        f".logits_zero_point = {logits_quant.zero_point if logits_quant else 0}",
        ".tap_dim = {ET_MODEL_LE_DIM, ET_MODEL_GN_DIM}",
        f".tap_scale = {{{le_scale}, {gn_scale}}}",
        f".tap_zero_point = {{{le_zp}, {gn_zp}}}",
        ".max_activation = ET_MODEL_MAX_ACTIVATION",
        f".le_kind = {'ET_LE_CHANNEL_MIX' if parts['le_kind'] == 1 else 'ET_LE_LOWRANK'}",
        f".le_channels = {parts['le_channels']}", f".le_width = {parts['le_width']}",
        f".le_rank = {parts['le_rank']}",
        ".le_params = ET_MODEL_LE_PARAMS",
        *(f".le_off_{name} = {'0xFFFFFFFFu' if v == NO_OFFSET else f'{v}u'}"
          for name, v in zip(("a_weight", "a_bias", "up_weight", "up_bias"), off)),
        ".le_initial = le_initial",
        f".le_optimizer = {adamw(parts['le_optimizer'])}",
        ".gn_params = ET_MODEL_GN_PARAMS",
        f".gn_off_weight = {parts['gn_offsets'][0]}u", f".gn_off_bias = {parts['gn_offsets'][1]}u",
        ".gn_initial = gn_initial",
        f".gn_optimizer = {adamw(parts['gn_optimizer'])}",
        f".gate_threshold = {c_float(parts['gate_threshold'])}",
        ".defaults = {" + ", ".join(
            [*(f".{k} = {d[k]}u" for k in ("le_epochs", "le_max_steps", "batch_size", "augment_copies",
                                            "augment_until", "gn_steps")),
             *(f".{k} = {c_float(d[k])}" for k in ("le_learning_rate", "gn_learning_rate")),
             *(f".{k} = {c_double(d[k])}" for k in ("replay_weight", "gate_generic_share")),
             f".seed = UINT64_C({d['seed']})"]) + "}",
        ".replay_count = ET_MODEL_REPLAY",
        f".replay_bytes = {len(replay_data)}u",
        f".replay_data = {'replay_data' if has_replay else 'NULL'}",
        f".replay_offsets = {'replay_offsets' if has_replay else 'NULL'}",
    ]
    source = (f"/* The model of bundle {bundle_id}, written by `edgetailor export firmware`; see edgetailor_model.h.\n"
              " * Floats are C99 hexadecimal constants: exactly the bundle's float32 values. */\n"
              '#include "edgetailor_model.h"\n\n'
              + "\n".join(blocks) + "\n" + _layer_table(ge, refs) + "\n" + labels
              + "\n/* tap: -1 none, ET_TAP_LE, ET_TAP_GN, or 2 when LE and GN read the same layer's output */\n"
              "const et_model et_model_data = {\n" + "".join(f"    {_long(item)},\n" for item in body) + "};\n")
    atomic.write_text(model_dir / "edgetailor_model.h", header)
    atomic.write_text(model_dir / "edgetailor_model.c", source)


def _long(item: str) -> str:
    """One initializer, wrapped after its commas when it is longer than a line."""
    if len(item) + 4 <= LINE:
        return item
    head, _, rest = item.partition("{")
    return head + "{\n        " + _wrap([p.strip() for p in rest.rstrip("}").split(",")], 8) + "}"


def export_firmware(bundle_path: str | Path, out: str | Path, int8: bool | None = None,
                    trusted_keys: Iterable[str | Path] | None = None, max_samples: int = 200,
                    overwrite: bool = False, progress: ProgressFn | None = None) -> FirmwareReport:
    """Write the C project OUT: the firmware's sources and ``model/`` made from the bundle.

    ``int8``: None follows the bundle (a QDQ GE runs on the int8 kernels, an fp32 one on the float kernels);
    True or False insists, and refuses a bundle whose GE is the other kind. ``max_samples`` bounds the samples
    one on-device personalization takes (ET_MAX_SAMPLES). Nothing is written unless every check passes."""
    import onnx

    say = progress or (lambda _msg: None)
    out = Path(out)
    if max_samples < 1:
        raise ExportError(f"--max-samples must be at least 1, got {max_samples}", hint="give a positive count")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    bundle, notes = open_bundle(bundle_path, trusted_keys)
    with bundle:
        manifest = bundle.manifest
        if not manifest.input.is_image:
            raise ExportError(f"{bundle_path} reads {manifest.input.modality} input {tuple(manifest.input.shape)}; "
                              "the firmware runs glyph bundles only (28x28 images, its affine augmentation)",
                              hint="personalize this bundle with the Python runtime (edgetailor device)")
        if "onnx" not in manifest.global_expert.files:
            raise ExportError(f"{bundle_path} carries no ONNX GE (formats: {', '.join(bundle.formats)}); the "
                              "firmware is made from it", hint="re-export the bundle with `--formats onnx`")
        bundle.require_format("onnx")
        ge_file = bundle.path(manifest.global_expert.files["onnx"])
        manifest_bytes = bundle.path(MANIFEST).read_bytes()
        say(f"compiling GE's ONNX graph ({manifest.global_expert.arch}) into the firmware's layers")
        taps = {TAP_LE: manifest.local_expert.feature_tap, TAP_GN: manifest.gating_network.feature_tap}
        ge = compile_ge(onnx.load(str(ge_file)), manifest.input, manifest.global_expert.outputs["logits"], taps,
                        where=f"{bundle_path}:{manifest.global_expert.files['onnx']}")
        if int8 is True and not ge.quantized:
            raise ExportError(f"{bundle_path}'s GE is fp32, and --int8 was asked for",
                              hint="make an int8 GE with `edgetailor server compress --recipe int8` and export its "
                                   "bundle (`edgetailor export bundle --model COMPRESSED --formats onnx`), or leave "
                                   "out --int8")
        if int8 is False and ge.quantized:
            raise ExportError(f"{bundle_path}'s GE is quantized (int8), and --fp32 was asked for; the firmware runs "
                              "a quantized GE's own integers and does not dequantize it",
                              hint="leave out --fp32, or export the bundle of the fp32 GE the int8 one was "
                                   "compressed from")
        for code, spec in ((TAP_LE, manifest.local_expert), (TAP_GN, manifest.gating_network)):
            if ge.tap_dim(code) != spec.feature_dim:
                raise ExportError(f"GE's feature {spec.feature_tap!r} has {ge.tap_dim(code)} values; the manifest "
                                  f"says {spec.feature_dim}", hint="re-export the bundle")
        if ge.n_classes != len(manifest.labels):
            raise ExportError(f"GE has {ge.n_classes} outputs for {len(manifest.labels)} labels",
                              hint="re-export the bundle")
        parts = _le_gn(manifest, bundle)
        defaults = _defaults(manifest)
        glyphs = _replay(manifest, bundle, ge.in_hw)
        if len(glyphs) < 3:   # GN holds a third out to calibrate the gate (et_personalize refuses fewer)
            raise ExportError(f"the bundle carries {len(glyphs)} replay glyphs; the firmware needs at least 3",
                              hint="re-export the bundle with a larger --replay-size")
        say(f"checking the layers against onnxruntime on {len(glyphs)} replay glyphs")
        check = check_against_onnxruntime(ge, ge_file, manifest.input, manifest.global_expert.outputs["logits"],
                                          taps, glyphs)
        say(f"coding {len(glyphs)} replay glyphs")
        replay_data, replay_offsets = encode_replay(glyphs)
        bundle_id = bundle.bundle_id
    sizes = {"ge": ge.weight_bytes(), "replay": len(replay_data) + replay_offsets.nbytes,
             "replay_raw": int(glyphs.nbytes), "le": parts["le_initial"].nbytes, "gn": parts["gn_initial"].nbytes}
    sizes["flash"] = sizes["ge"] + sizes["replay"] + sizes["le"] + sizes["gn"]
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    report = FirmwareReport(out, bundle_id, ge.quantized, len(ge.layers), ge.max_activation, len(glyphs),
                            sizes["ge"], sizes["replay"], sizes["le"], sizes["gn"], sizes["replay_raw"], check, notes)
    summary = {
        "bundle": {"id": bundle_id, "source": str(bundle_path), "manifest_sha256": manifest_sha256,
                   "release": manifest.release.to_dict() if manifest.release else None,
                   "signer": bundle.signer_id},
        "toolkit_version": __version__, "quantized": ge.quantized,
        "input": {"height": ge.in_hw[0], "width": ge.in_hw[1],
                  **({"scale": ge.input_quant.scale, "zero_point": ge.input_quant.zero_point}
                     if ge.input_quant else {})},
        "labels": list(manifest.labels),
        "layers": [layer.describe() for layer in ge.layers],
        "taps": {"le": {"feature": taps[TAP_LE], "layer": ge.tap_layers[TAP_LE], "dim": ge.tap_dim(TAP_LE)},
                 "gn": {"feature": taps[TAP_GN], "layer": ge.tap_layers[TAP_GN], "dim": ge.tap_dim(TAP_GN)}},
        "max_activation": ge.max_activation, "max_samples": max_samples,
        "le": {"kind": manifest.local_expert.kind, "params": int(parts["le_initial"].size)},
        "gn": {"kind": manifest.gating_network.kind, "params": int(parts["gn_initial"].size),
               "threshold": parts["gate_threshold"]},
        "replay": {"count": len(glyphs), "coded_bytes": len(replay_data), "raw_bytes": sizes["replay_raw"]},
        "bytes": {"ge": sizes["ge"], "replay": sizes["replay"], "le": sizes["le"], "gn": sizes["gn"],
                  "flash_estimate": sizes["flash"]},
        "check": check,
    }
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        copied = _copy_project(staging)
        say(f"copied the firmware sources ({', '.join(copied)})")
        model_dir = staging / MODEL_DIR
        model_dir.mkdir()
        write_model_sources(model_dir, ge, manifest, bundle_id, manifest_sha256, parts, defaults, replay_data,
                            replay_offsets, max_samples, sizes)
        atomic.write_text(model_dir / "model.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return report
