"""Turn a GE checkpoint into a device bundle.

The bundle holds GE, returning its logits and the intermediate features LE
and GN read, in each chosen format (ONNX, ExecuTorch ``.pte`` lowered to
XNNPACK, TFLite, and optionally a torch.export reference), and LE's and GN's
training programs in each format (``export.trainable``: step programs by
default, the runtimes' own training packages on request), starting from
initial weights shared by every format. The
manifest lists every format with its files and their sha256. Every exported
model is run against its torch source before the bundle is published; a
failed export leaves nothing behind.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgetailor.toolkit import atomic
from edgetailor.toolkit.bundle import Bundle, write_manifest, zip_bundle
from edgetailor.toolkit.config import ExpertConfig, PersonalizeConfig, from_dict
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import CheckpointError, ConfigError, EdgetailorError, ExportError, ModelError
from edgetailor.toolkit.formats import DEFAULT_FORMATS, FORMATS, STEPS, check_extra_training, check_formats
from edgetailor.toolkit.manifest import (FormatEntry, GlobalExpertSpec, Manifest, ReleaseSpec, ReplaySpec,
                                         TrainablePartSpec)
from edgetailor.toolkit.signing import SigningKey, load_signing_key, sign_bundle_dir
from edgetailor.server_side.checkpoint import GECheckpoint
from edgetailor.server_side.cost import count_macs, count_params
from edgetailor.server_side.experts import LE_DESIGNS, LogisticGate, local_expert
from edgetailor.server_side.models import WithFeatures
from edgetailor.export.formats import get_exporter
from edgetailor.export.parts import TrainablePart
from edgetailor.export.personalized import export_personalized_template
from edgetailor.export.trainable import TRAINING_EXPORTERS

PARITY_TOLERANCE = 1e-4

ProgressFn = Callable[[str], None]


def export_ge(ckpt: GECheckpoint, model_dir: Path | None, format_name: str, path: Path) -> None:
    """GE in one deployable format, returning logits and every feature tap,
    checked against torch before it goes into a bundle.

    An fp32 GE must match torch to ``PARITY_TOLERANCE`` on every output. A
    quantized GE ships as the file ``server compress`` wrote for that format
    (the integers are decided there), and must agree with the checkpoint's
    weights on the replay glyphs' answers."""
    exporter = get_exporter(format_name)
    quantized = ckpt.meta.quantized
    taps = [t.name for t in ckpt.model.feature_taps]
    if quantized:
        source_name = ckpt.meta.compression["files"].get(format_name)
        if source_name is None or model_dir is None or not (model_dir / source_name).is_file():
            have = sorted(ckpt.meta.compression["files"])
            raise CheckpointError(f"{model_dir} is a quantized GE without a {format_name} model "
                                  f"(it has: {', '.join(have)})",
                                  hint=f"re-run `edgetailor server compress` with {format_name!r} in [export] "
                                       f"formats, or export the bundle with --formats {','.join(have)}")
        atomic.write_bytes(path, (model_dir / source_name).read_bytes())
    else:
        try:
            exporter.export(ckpt.model, path, ckpt.normalize(ckpt.replay.images[:64]).numpy(), None)
        except EdgetailorError:
            raise
        except Exception as exc:  # a converter's own error on a user's op: name the format and the op
            if not ckpt.meta.arch.startswith("user:"):
                raise           # edgetailor's own families export everywhere: a failure here is a defect
            raise ModelError(f"{ckpt.meta.arch} cannot be exported to {format_name} ({FORMATS[format_name].runtime}): "
                             f"{type(exc).__name__}: {first_lines(exc)}",
                             hint=f"leave {format_name} out with --formats, or replace the op named above with one "
                                  "the runtime has; docs/BRING_YOUR_OWN_MODEL.md lists what each format carries"
                             ) from exc
    # Every replay glyph for the agreement of a quantized GE; a few suffice for fp32 parity.
    example = ckpt.normalize(ckpt.replay.images if quantized else ckpt.replay.images[:8])
    got = exporter.load(path, threads=1, all_outputs=True)(example.numpy())
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
            raise ExportError(f"the {format_name} export of GE output {name!r} differs from torch by {diff:.2e}")


def first_lines(exc: BaseException, lines: int = 3, width: int = 600) -> str:
    """The start of a converter's message: enough to name the op, not its whole stack."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:lines] if line.strip())
    return text[:width] + ("..." if len(text) > width else "")


# A quantized GE's exported model answers like its torch twin (same integer
# weights) up to activation rounding: most argmaxes agree, logits do not to 1e-4.
QUANTIZED_AGREEMENT = 0.95


def trainable_parts(le_module: nn.Module, le_dim: int, gn_dim: int, num_classes: int,
                    personalize: PersonalizeConfig) -> tuple[TrainablePart, TrainablePart]:
    """LE and GN as the device trains them (GN's fresh weights from torch's current seed)."""
    # Rows per step: LE's batches mix user rows with replay, GN's are half and half.
    le_batch = personalize.batch_size + int(round(personalize.batch_size * personalize.replay_weight))
    le = TrainablePart("local_expert", "le", le_module, [le_dim, num_classes],
                       ["features", "base_logits"], "logits", num_classes, le_batch, personalize.le_learning_rate)
    gn = TrainablePart("gating_network", "gn", LogisticGate(gn_dim), [gn_dim], ["features"], "gate_logits", 2,
                       2 * max(1, personalize.batch_size // 2), personalize.gn_learning_rate)
    return le, gn


def bundle_parts(bundle: Bundle) -> dict[str, TrainablePart]:
    """LE and GN of a written bundle, holding its initial weights: to check its programs again."""
    manifest = bundle.manifest
    personalize = from_dict(PersonalizeConfig, manifest.personalize, "personalize")
    le_spec, gn_spec = manifest.local_expert, manifest.gating_network
    le_module = local_expert(le_spec.kind, le_spec.feature_dim, len(manifest.labels), le_spec.rank or 0,
                             le_spec.channels or 0, le_spec.width or 0)
    parts = trainable_parts(le_module, le_spec.feature_dim, gn_spec.feature_dim, len(manifest.labels), personalize)
    for part in parts:
        spec = manifest.part(part.key)
        flat = torch.from_numpy(np.load(bundle.path(spec.initial_parameters)))
        named = dict(part.module.named_parameters())
        sizes = [named[n].numel() for n in part.parameter_order]
        with torch.no_grad():
            for name, values in zip(part.parameter_order, torch.split(flat, sizes)):
                named[name].copy_(values.reshape(named[name].shape))
        part.max_batch = int(spec.max_batch)
    return {part.key: part for part in parts}


REPLAY_BATCH = 32   # replay samples per call when a format's program takes any batch


def write_replay_outputs(ckpt: GECheckpoint, replay: LabeledImages, format_name: str, program: Path,
                         taps: tuple[str, str], out: Path) -> None:
    """GE's logits and LE's and GN's taps (``taps``: their names) on the shipped replay, saved as
    ``logits``, ``le`` and ``gn``, as ``program`` computes them in its own runtime. The device reads
    them (``device.mixture``) instead of running GE on the replay each time it personalizes: GE is
    frozen, so they never change. Read from the program, not from torch, they are what the device's
    GE gives (a quantized GE's too)."""
    names = [t.name for t in ckpt.model.feature_taps]
    runner = get_exporter(format_name).load(program, threads=2, all_outputs=True)
    parts = []
    for start in range(0, len(replay), REPLAY_BATCH):
        outputs = runner(ckpt.normalize(replay.images[start:start + REPLAY_BATCH]).numpy())
        by_name = dict(zip(["logits", *names], outputs))
        parts.append({"logits": by_name["logits"], "le": by_name[taps[0]], "gn": by_name[taps[1]]})
    arrays = {key: np.concatenate([p[key] for p in parts]).astype(np.float32) for key in parts[0]}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, buffer.getvalue())


def balanced_replay(replay: LabeledImages, size: int) -> LabeledImages:
    """The first ``size // classes`` replay glyphs of each class, in their original order.

    Deterministic rather than sampled, so that the same checkpoint and size
    always ship the same glyphs; balanced, so that GE's answers on the replay
    (what keeps LE agreeing with GE on generic input) cover every class. A
    class with fewer glyphs contributes all it has."""
    n_classes = len(replay.label_names)
    if size < n_classes:
        raise ConfigError(f"a replay size of {size} cannot hold one glyph of each of the {n_classes} classes",
                          hint=f"give --replay-size {n_classes} or more (the checkpoint has {len(replay)} replay "
                               "glyphs)")
    per_class = size // n_classes
    chosen = np.concatenate([np.flatnonzero(replay.labels == c)[:per_class] for c in range(n_classes)])
    return replay.subset(np.sort(chosen))


def _compression_summary(compression: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the bundle says about how its GE was compressed."""
    if not compression:
        return None
    return {"recipe": compression["recipe"].get("name"), "stages": [s["kind"] for s in compression["stages"]],
            "sparse": compression["sparse"], "quantization": compression["quantization"]}


def export_bundle(model_dir: str | Path, out: str | Path, experts: ExpertConfig | None = None,
                  personalize: PersonalizeConfig | None = None, make_zip: bool = True,
                  overwrite: bool = False, progress: ProgressFn | None = None,
                  formats: list[str] | tuple[str, ...] | None = None,
                  extra_training: list[str] | tuple[str, ...] = (), signing_key: str | Path | None = None,
                  name: str | None = None, version: int | None = None,
                  expires: datetime | None = None, replay_size: int | None = None) -> Path:
    """Write the bundle directory ``out`` (and ``out.zip``); returns the directory.

    ``experts``/``personalize`` default to the recipe the GE was trained with.
    ``formats`` chooses the runtimes the bundle carries (``toolkit.formats.FORMATS``);
    by default ``DEFAULT_FORMATS``, less those a quantized GE has no model for.
    ``extra_training`` adds training kinds besides each format's step programs
    (``toolkit.formats.EXTRA_TRAINING``: ort-training, executorch-training).

    ``signing_key`` (a ``signing.key`` or its directory) signs the manifest,
    and its directory's key statements (rotations, revocations) ride along.
    ``name`` and ``version`` say which bundle this is, so that a device
    refuses an older version of the same name: by default the output folder's
    name and the UTC time as YYYYMMDDHHMMSS, which grows with every export.
    ``expires`` makes devices refuse the bundle after that moment.
    ``replay_size`` ships a class-balanced subset of the checkpoint's replay
    glyphs (``balanced_replay``) instead of all of them, for devices whose flash
    cannot hold them; the checks of the exported GE still run on all of them.
    """
    key = load_signing_key(signing_key) if signing_key is not None else None   # a bad key fails before any work
    model_dir = Path(model_dir)
    return write_bundle(GECheckpoint.load(model_dir), out, model_dir, experts, personalize, make_zip, overwrite,
                        progress, formats, extra_training, key, name, version, expires, replay_size)


def write_bundle(ckpt: GECheckpoint, out: str | Path, model_dir: Path | None = None,
                 experts: ExpertConfig | None = None, personalize: PersonalizeConfig | None = None,
                 make_zip: bool = True, overwrite: bool = False, progress: ProgressFn | None = None,
                 formats: list[str] | tuple[str, ...] | None = None, extra_training: list[str] | tuple[str, ...] = (),
                 key: SigningKey | None = None, name: str | None = None, version: int | None = None,
                 expires: datetime | None = None, replay_size: int | None = None) -> Path:
    """``export_bundle`` of a GE already in memory: a loaded checkpoint, or a
    user's model wrapped by ``export.user_model.bundle_from_model``.
    ``model_dir`` is where a quantized GE's compressed files lie."""
    say = progress or (lambda _msg: None)
    release = ReleaseSpec.make(name or Path(out).name, version, expires)
    meta = ckpt.meta
    shipped_replay = ckpt.replay if replay_size is None else balanced_replay(ckpt.replay, replay_size)
    if formats is None:
        formats = [f for f in DEFAULT_FORMATS if not meta.quantized or f in meta.compression["files"]]
        if len(formats) < len(DEFAULT_FORMATS):
            say(f"quantized GE: carrying {', '.join(formats)} (the formats `server compress` wrote)")
    formats = check_formats(formats, meta.quantized)
    extra_training = check_extra_training(extra_training, formats)
    experts = experts or meta.expert_config
    personalize = personalize or meta.personalize_config
    experts.validate()
    personalize.validate()
    experts.resolve_taps(ckpt.model)
    taps = {t.name: t.dim for t in ckpt.model.feature_taps}
    out = Path(out)
    num_classes = len(ckpt.labels)
    le_dim, gn_dim = taps[experts.le_feature_tap], taps[experts.gn_feature_tap]
    le_kind = LE_DESIGNS[experts.le_design_on(ckpt.model)]
    le_channels = {t.name: t.channels for t in ckpt.model.feature_taps}[experts.le_feature_tap]
    le_shape = ({"rank": experts.le_rank} if le_kind == "residual_lowrank"
                else {"channels": le_channels, "width": experts.le_width})
    torch.manual_seed(meta.seed)
    le_module = local_expert(le_kind, le_dim, num_classes, **le_shape)
    le_part, gn_part = trainable_parts(le_module, le_dim, gn_dim, num_classes, personalize)
    with atomic.staged_dir(out, overwrite=overwrite) as staging:
        ge_files, training = {}, {part.key: {} for part in (le_part, gn_part)}
        for name in formats:
            fmt = FORMATS[name]
            ge_files[name] = f"ge{fmt.suffix}"
            say(f"exporting GE to {name} ({fmt.runtime})" + (", quantized" if meta.quantized else ""))
            export_ge(ckpt, model_dir, name, staging / ge_files[name])
            kinds = [k for k in fmt.training_kinds if k == fmt.default_training or k in extra_training]
            for kind in kinds:
                what = "step programs" if kind == STEPS else f"{kind} programs"
                say(f"building LE and GN {what} for {fmt.runtime}, checked against torch")
                for part in (le_part, gn_part):
                    files = TRAINING_EXPORTERS[(name, kind)].export(part, staging / part.directory)
                    training[part.key].setdefault(name, {}).update(files)
        personalized = {}
        examples = ckpt.normalize(ckpt.replay.images[:48]).numpy()
        for name in formats:
            if FORMATS[name].reference:
                continue
            say(f"building the {name} personalized-model template (GE + LE + GN + routing)")
            files = export_personalized_template(
                name, ckpt.model, staging / ge_files[name], {p.key: p for p in (le_part, gn_part)},
                experts.le_feature_tap, experts.gn_feature_tap, list(taps), taps, examples,
                staging / "personalized", meta.quantized)
            if files is None:
                say(f"  skipped: a quantized GE's {name} program cannot be converted again")
            else:
                personalized[name] = files
        for part in (le_part, gn_part):
            buffer = io.BytesIO()
            np.save(buffer, part.flat_parameters().numpy().astype(np.float32))
            atomic.write_bytes(staging / part.directory / "initial.npy", buffer.getvalue())
        replay = io.BytesIO()
        np.savez_compressed(replay, x=shipped_replay.images, y=shipped_replay.labels)
        atomic.write_bytes(staging / "replay.npz", replay.getvalue())
        replay_outputs = {}
        for name in formats:
            say(f"computing GE's {name} outputs on the {len(shipped_replay)} replay samples")
            replay_outputs[name] = f"replay/outputs{FORMATS[name].suffix}.npz"
            write_replay_outputs(ckpt, shipped_replay, name, staging / ge_files[name],
                                 (experts.le_feature_tap, experts.gn_feature_tap), staging / replay_outputs[name])
        le, gn = le_part.module, gn_part.module
        manifest = Manifest(
            input=meta.input, labels=ckpt.labels,
            formats={name: FormatEntry(FORMATS[name].runtime) for name in formats},
            global_expert=GlobalExpertSpec(
                files=ge_files, arch=meta.arch, input_name="image",
                outputs={"logits": "logits", "features": taps}, output_order=["logits", *taps],
                params=count_params(ckpt.model),
                macs=count_macs(ckpt.model, (ckpt.normalize(ckpt.replay.images[:1]),)),
                generic_accuracy=meta.generic_accuracy, compression=_compression_summary(meta.compression),
                training={"data": meta.data, "seed": meta.seed, "created": meta.created,
                          "toolkit_version": meta.toolkit_version}),
            local_expert=TrainablePartSpec(
                kind=le_kind, **le_shape, feature_tap=experts.le_feature_tap,
                feature_dim=le_dim, inputs=le_part.input_names, output="logits",
                training=training["local_expert"], parameters=le_part.parameters(), max_batch=le_part.max_batch,
                initial_parameters="le/initial.npy", optimizer=le_part.optimizer.to_dict(),
                params=count_params(le), macs=count_macs(le, (torch.zeros(1, le_dim), torch.zeros(1, num_classes)))),
            gating_network=TrainablePartSpec(
                kind="logistic", feature_tap=experts.gn_feature_tap, feature_dim=gn_dim,
                inputs=gn_part.input_names, output="gate_logits", training=training["gating_network"],
                parameters=gn_part.parameters(), max_batch=gn_part.max_batch, params=count_params(gn),
                initial_parameters="gn/initial.npy", optimizer=gn_part.optimizer.to_dict(),
                macs=count_macs(gn, (torch.zeros(1, gn_dim),)), threshold=experts.gate_threshold),
            replay=ReplaySpec(file="replay.npz", count=len(shipped_replay), outputs=replay_outputs),
            personalize=asdict(personalize), personalized_model=personalized,
            release=release,
        )
        write_manifest(staging, manifest)
        if key is not None:
            say(f"signing the manifest with key {key.public.id[:16]}")
            sign_bundle_dir(staging, key)
        Bundle.open(staging).close()  # the bundle we publish must pass the device's own checks
    if make_zip:
        say("writing the single-file zip")
        zip_bundle(out, out.with_name(out.name + ".zip"))
    return out
