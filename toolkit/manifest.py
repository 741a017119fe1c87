"""The bundle manifest as a typed, versioned object: what a device bundle
holds and how to run it.

Export builds a ``Manifest`` and writes it with ``to_json``; the device reads
it back with ``Manifest.from_json``, which validates it against
``manifest.schema.json`` (the format names and training-file roles filled in
from the format registry) and upgrades older versions in memory. Nothing else
reads manifest JSON by key.

Version 1 (edgetailor 0.1 before the multi-runtime bundles) carried ONNX
only; version 2 lists every format's files with their sha256.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from edgetailor.toolkit import __version__
from edgetailor.toolkit.errors import BundleError
from edgetailor.toolkit.formats import FORMATS, STEPS, TRAINING_FORMATS
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.limits import Limits, current_limits, json_depth

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
IMAGE_SCHEMA_VERSION = 2   # what a glyph bundle is written as, so that clients from before modalities read it
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SCHEMA_V1_PATH = Path(__file__).with_name("manifest-v1.schema.json")
PARTS = ("local_expert", "gating_network")


@lru_cache(maxsize=None)
def manifest_schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON schema of a manifest version; version 2's format names and
    training-file roles come from the format registry."""
    if version == 1:
        return json.loads(SCHEMA_V1_PATH.read_text())
    schema = json.loads(SCHEMA_PATH.read_text())
    schema["$defs"]["format_name"]["enum"] = list(FORMATS)
    schema["$defs"]["training_format_name"]["enum"] = list(TRAINING_FORMATS)
    training = schema["$defs"]["trainable"]["properties"]["training"]
    training["properties"] = {name: {"type": "object", "minProperties": 1,
                                     "propertyNames": {"enum": list(FORMATS[name].training_roles)},
                                     "additionalProperties": {"type": "string"}} for name in TRAINING_FORMATS}
    return schema


@lru_cache(maxsize=None)
def _validator(version: int):
    """One validator per schema version, built without re-checking our own
    schema against the metaschema (``jsonschema.validate`` does that on every
    call, which cost 0.1 s of every device command; the test suite checks the
    schema instead)."""
    import jsonschema  # pure Python, a base dependency

    schema = manifest_schema(version)
    return jsonschema.validators.validator_for(schema)(schema)


def validate_manifest(data: dict[str, Any], where: str = "manifest") -> None:
    import jsonschema

    version = data.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(f"{where} has schema version {version!r}; this toolkit reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}",
                          hint="re-export the bundle with this toolkit version, or install the toolkit that wrote it")
    try:
        error = jsonschema.exceptions.best_match(_validator(version).iter_errors(data))
        if error is not None:
            raise error
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{where} is invalid at {at}: {exc.message}",
                          hint="the bundle is damaged or was not written by edgetailor; re-export it") from None


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest (ONNX GE, ORT training artifacts) in version-2 form."""
    upgraded = json.loads(json.dumps(data))
    ge = upgraded["global_expert"]
    ge["files"] = {"onnx": ge.pop("file")}
    ge["output_order"] = ["logits", *ge["outputs"]["features"]]
    for part in PARTS:
        upgraded[part]["training"] = {"onnx": upgraded[part].pop("artifacts")}
    needed = [ge["files"]["onnx"], *(f for part in PARTS for f in upgraded[part]["training"]["onnx"].values())]
    upgraded["formats"] = {"onnx": {"runtime": FORMATS["onnx"].runtime,
                                    "files": {f: upgraded["files"][f] for f in needed if f in upgraded["files"]}}}
    upgraded["schema_version"] = IMAGE_SCHEMA_VERSION
    return upgraded


def check_input(data: dict[str, Any], where: str) -> None:
    """What the schema cannot say per modality: glyphs are uint8 (1, H, W), windows and clips float32
    (channels, length); and the augmentation's parameters (``toolkit.modalities.check_augment``)."""
    from edgetailor.toolkit.modalities import check_augment

    modality, shape, dtype = data.get("modality", "image"), data["shape"], data["dtype"]
    ok = (len(shape) == 3 and shape[0] == 1 and dtype == "uint8" if modality == "image"
          else len(shape) == 2 and dtype == "float32")
    if not ok:
        raise BundleError(f"{where}: a {modality} input of shape {shape} and dtype {dtype} is not one this "
                          "toolkit reads (glyphs: uint8 [1, H, W]; windows and clips: float32 [channels, length])",
                          hint="the bundle is damaged or was not written by edgetailor; re-export it")
    try:
        check_augment(InputSpec.from_dict(data))
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}",
                          hint="the bundle is damaged or was not written by edgetailor; re-export it") from None


def _build(cls: type, data: dict[str, Any]) -> Any:
    """``cls`` from the keys it knows; the schema has already checked them,
    and keys a later minor version adds are ignored."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def _without_empty(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data`` less ``key`` when it is empty, so that a manifest without it reads as before."""
    return {k: v for k, v in data.items() if k != key or v}


def _without_none(data: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None or k in keep}


@dataclass
class FormatEntry:
    runtime: str
    files: dict[str, str] = field(default_factory=dict)     # path in the bundle -> sha256


@dataclass
class GlobalExpertSpec:
    files: dict[str, str]                  # format -> GE's file
    arch: str
    input_name: str
    outputs: dict[str, Any]                # {"logits": name, "features": {tap: width}}
    output_order: list[str]                # logits, then the taps: how positional outputs map to names
    params: int
    macs: int
    generic_accuracy: float | None = None
    compression: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self), keep=("compression",))


@dataclass
class TrainablePartSpec:
    """LE or GN: its inputs, its training programs per format, its size."""

    kind: str
    feature_tap: str
    feature_dim: int
    inputs: list[str]
    output: str
    training: dict[str, dict[str, str]]    # format -> role -> file
    params: int
    macs: int
    parameters: dict[str, list[int]] | None = None     # name -> shape; absent in version 1
    max_batch: int | None = None           # rows per training step (step programs: exactly this many)
    initial_parameters: str | None = None  # flat float32 .npy in sorted parameter order; step programs start here
    optimizer: dict[str, Any] | None = None    # the AdamW settings the step programs apply
    rank: int | None = None                # LE residual_lowrank only: the correction's rank
    channels: int | None = None            # LE residual_channel_mix only: the feature's channels (channel-major)
    width: int | None = None               # LE residual_channel_mix only: channels after the mix
    threshold: float | None = None         # GN only: LE answers above it

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self))

    def training_files(self, fmt: str, kind: str) -> dict[str, str] | None:
        """{role: file} of one training kind in one format, or None when the part does not carry it whole."""
        files = self.training.get(fmt, {})
        roles = FORMATS[fmt].training_kinds.get(kind, ())
        if not roles or any(r not in files for r in roles):
            return None
        return {r: files[r] for r in roles}

    def training_kinds(self, fmt: str) -> list[str]:
        return [k for k in FORMATS[fmt].training_kinds if self.training_files(fmt, k) is not None]

    @property
    def parameter_order(self) -> list[str]:
        """The order of the parameters in a flat vector (what step programs take): sorted by name."""
        return sorted(self.parameters or {})


@dataclass
class ReplaySpec:
    file: str
    count: int
    # GE's outputs on the replay (logits and LE's and GN's taps) as each format's program computes them,
    # by format: GE is frozen, so a device reads them instead of running GE on every replay sample each
    # time it personalizes (absent in older bundles: the device runs GE then).
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class ReleaseSpec:
    """Which bundle this is and how new: a device refuses a version older than one it accepted for the
    same name (rollback), and a bundle past ``expires``."""

    name: str
    version: int
    expires: str | None = None            # ISO 8601 UTC; absent: never

    @classmethod
    def make(cls, name: str, version: int | None = None, expires: datetime | str | None = None) -> "ReleaseSpec":
        """A release; by default versioned by the UTC time as YYYYMMDDHHMMSS, which grows with every export."""
        if version is None:
            version = int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))
        if isinstance(expires, datetime):
            moment = expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
            expires = moment.astimezone(timezone.utc).isoformat(timespec="seconds")
        return cls(name=name, version=int(version), expires=expires)

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires is None:
            return False
        return (now or datetime.now(timezone.utc)) >= parse_time(self.expires)

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self))


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def check_relative_path(name: Any, where: str) -> str:
    """A path the manifest names must stay inside the bundle: relative, POSIX, no ``..``, no drive."""
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name
            or any(part in ("", ".", "..") for part in name.split("/")) or "\x00" in name):
        raise BundleError(f"{where} names the path {name!r}, which is not a plain relative path inside the bundle",
                          hint="the bundle was tampered with or not written by edgetailor; re-export it")
    return name


@dataclass
class Manifest:
    VERSION: ClassVar[int] = SCHEMA_VERSION

    input: InputSpec
    labels: list[str]
    formats: dict[str, FormatEntry]
    global_expert: GlobalExpertSpec
    local_expert: TrainablePartSpec
    gating_network: TrainablePartSpec
    replay: ReplaySpec
    personalize: dict[str, Any]            # the PersonalizeConfig the bundle ships as the device's defaults
    files: dict[str, str] = field(default_factory=dict)    # every file but the manifest -> sha256
    sizes: dict[str, int] = field(default_factory=dict)    # every file but the manifest -> bytes (absent before 0.2)
    release: ReleaseSpec | None = None     # name, version, expiry (absent before 0.2)
    # format -> {"program", "patches"}: GE + LE + GN + routing as one program to fill with trained weights
    personalized_model: dict[str, dict[str, str]] = field(default_factory=dict)
    toolkit_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: int | None = None      # as read (1 upgraded in memory); written: ``written_version``

    @property
    def written_version(self) -> int:
        """2 for glyph bundles, so that clients from before modalities still read
        them; 3 for any other input, so that those clients refuse it rather than
        read a sensor window as an image."""
        return IMAGE_SCHEMA_VERSION if self.input.is_image else SCHEMA_VERSION

    def part(self, key: str) -> TrainablePartSpec:
        """``local_expert`` or ``gating_network``."""
        if key not in PARTS:
            raise KeyError(f"no trainable part {key!r}; parts: {', '.join(PARTS)}")
        return getattr(self, key)

    def format_files(self, name: str) -> list[str]:
        """The files a format needs: its GE, GE's outputs on the replay, LE's and GN's programs, its
        personalized-model template. A damaged one disables that format alone."""
        files = [self.global_expert.files[name], *([self.replay.outputs[name]] if name in self.replay.outputs else [])]
        for part in PARTS:
            files += list(self.part(part).training.get(name, {}).values())
        return files + list(self.personalized_model.get(name, {}).values())

    def referenced_files(self) -> list[str]:
        """Every path the manifest names, besides the ``files`` map's keys."""
        names = [self.replay.file, *self.replay.outputs.values(), *self.global_expert.files.values()]
        for key in PARTS:
            part = self.part(key)
            names += [f for roles in part.training.values() for f in roles.values()]
            names += [part.initial_parameters] if part.initial_parameters else []
        names += [f for entry in self.formats.values() for f in entry.files]
        return names + [f for template in self.personalized_model.values() for f in template.values()]

    def check_paths(self, where: str) -> None:
        for name in [*self.files, *self.sizes, *self.referenced_files()]:
            check_relative_path(name, where)
        unhashed = sorted(set(self.referenced_files()) - set(self.files))
        if unhashed:
            raise BundleError(f"{where} references files it does not hash: {', '.join(unhashed[:5])}",
                              hint="the bundle is damaged or was not written by edgetailor; re-export it")
        if self.sizes and set(self.sizes) != set(self.files):
            raise BundleError(f"{where} lists sizes for other files than it hashes",
                              hint="the bundle is damaged or was not written by edgetailor; re-export it")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.written_version, "toolkit_version": self.toolkit_version,
            "created": self.created, "input": self.input.to_dict(), "labels": list(self.labels),
            "formats": {name: dataclasses.asdict(entry) for name, entry in self.formats.items()},
            "global_expert": self.global_expert.to_dict(),
            "local_expert": self.local_expert.to_dict(), "gating_network": self.gating_network.to_dict(),
            "replay": _without_empty(dataclasses.asdict(self.replay), "outputs"), "personalize": dict(self.personalize),
            "files": dict(self.files),
            **({"sizes": dict(self.sizes)} if self.sizes else {}),
            **({"release": self.release.to_dict()} if self.release else {}),
            **({"personalized_model": self.personalized_model} if self.personalized_model else {}),
        }

    def to_json(self) -> str:
        """Validated, then written: a manifest that fails the schema is never published."""
        data = self.to_dict()
        validate_manifest(data)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError(f"{where} is not a JSON object")
        validate_manifest(data, where)
        if data["schema_version"] == 1:
            data = upgrade_v1(data)
        modality = data["input"].get("modality", "image")
        check_input(data["input"], where)
        if (modality == "image") != (data["schema_version"] < SCHEMA_VERSION):
            raise BundleError(f"{where} is schema version {data['schema_version']} with input modality "
                              f"{modality!r}; version {SCHEMA_VERSION} is for inputs other than images, and only "
                              "for them",
                              hint="the bundle is damaged or was not written by edgetailor; re-export it")
        missing = [name for name in data["formats"] if name not in data["global_expert"]["files"]]
        if missing:
            raise BundleError(f"{where} lists format(s) {', '.join(missing)} without a GE file",
                              hint="the bundle is damaged or was not written by edgetailor; re-export it")
        manifest = cls(
            input=InputSpec.from_dict(data["input"]), labels=list(data["labels"]),
            formats={name: _build(FormatEntry, entry) for name, entry in data["formats"].items()},
            global_expert=_build(GlobalExpertSpec, data["global_expert"]),
            local_expert=_build(TrainablePartSpec, data["local_expert"]),
            gating_network=_build(TrainablePartSpec, data["gating_network"]),
            replay=_build(ReplaySpec, data["replay"]), personalize=dict(data["personalize"]),
            files=dict(data["files"]), toolkit_version=data["toolkit_version"], created=data["created"],
            schema_version=data["schema_version"], personalized_model=dict(data.get("personalized_model", {})),
            sizes=dict(data.get("sizes", {})),
            release=_build(ReleaseSpec, data["release"]) if "release" in data else None)
        manifest.check_paths(where)
        if manifest.release and manifest.release.expires:
            try:
                parse_time(manifest.release.expires)
            except ValueError:
                raise BundleError(f"{where}: release.expires {manifest.release.expires!r} is not an ISO 8601 time",
                                  hint="re-export the bundle") from None
        for key in PARTS:
            part = manifest.part(key)
            for fmt in part.training:
                if not part.training_kinds(fmt):
                    kinds = "; ".join(f"{k}: {', '.join(r)}" for k, r in FORMATS[fmt].training_kinds.items())
                    raise BundleError(f"{where}: {key}'s {fmt} training files ({', '.join(part.training[fmt])}) "
                                      f"make up no whole training kind ({kinds})",
                                      hint="the bundle is damaged or was not written by edgetailor; re-export it")
            if STEPS in {k for fmt in part.training for k in part.training_kinds(fmt)}:
                if not (part.parameters and part.max_batch and part.initial_parameters and part.optimizer):
                    raise BundleError(f"{where}: {key} has step programs but no parameters, max_batch, "
                                      "initial_parameters or optimizer",
                                      hint="the bundle is damaged or was not written by edgetailor; re-export it")
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest", limits: Limits | None = None) -> "Manifest":
        return cls.from_dict(parse_json(text, where, limits), where)


def parse_json(text: str | bytes, where: str, limits: Limits | None = None) -> Any:
    """JSON the device reads from a bundle, refused before parsing when it nests deeper than the limit
    (``json.loads`` recurses once per level)."""
    limits = current_limits(limits)
    limits.check("max_manifest_bytes", len(text), f"{where} (bytes)")
    limits.check("max_json_depth", json_depth(text), f"{where} nests")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:      # ValueError: also a number of over 4,300 digits
        raise BundleError(f"{where} is not valid JSON: {exc}", hint="the bundle is damaged; re-export it") from None
