"""The device bundle: a directory (or one .zip of it) with ``manifest.json``
and the model files it lists, each with its sha256.

A bundle carries GE (and LE and GN's training programs) in one or more
formats, one per runtime; the manifest (``toolkit.manifest.Manifest``)
lists each format's files with their hashes. Export writes bundles; the
device opens them with ``Bundle.open``, which reads and validates the
manifest and re-hashes every file before anything runs. A damaged shared
file (the manifest, the replay glyphs) refuses the whole bundle; a damaged
format's file only that format, so that the error can name the backends that
still work (``Bundle.require_format``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import BundleError
from edgetailor.toolkit.manifest import Manifest

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tflite_output_position(detail: dict) -> int:
    """Where a TFLite GE output belongs in ``global_expert.output_order``.
    litert-torch names outputs ``..._output_<i>_...`` in the order the torch
    module returns them; the interpreter lists them by tensor index."""
    match = re.search(r"output_(\d+)", detail["name"])
    return int(match.group(1)) if match else 1 << 30


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file under ``bundle_dir`` into the manifest (all files, and
    each format's own), then validate and write it."""
    files = {}
    for path in sorted(bundle_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(bundle_dir).as_posix()] = sha256_file(path)
    manifest.files = files
    for name, entry in manifest.formats.items():
        entry.files = {f: files[f] for f in manifest.format_files(name)}
    atomic.write_text(bundle_dir / MANIFEST, manifest.to_json())
    return manifest


def zip_bundle(bundle_dir: Path, zip_path: Path) -> Path:
    """One-file form of a bundle, written atomically."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".tmp",
                                     delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(bundle_dir.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(bundle_dir).as_posix())
        atomic.write_bytes(zip_path, tmp_path.read_bytes())
    finally:
        tmp_path.unlink(missing_ok=True)
    return zip_path


@dataclass
class Bundle:
    """An opened, verified bundle. ``root`` holds the files (a temporary
    extraction for a .zip, removed by ``close``)."""

    root: Path
    manifest: Manifest
    source: Path
    _tmp: Path | None = field(default=None, repr=False)
    # format -> why its files cannot be used (missing, or not matching their hash)
    damaged: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if not path.exists():
            raise BundleError(f"no bundle at {path}",
                              hint="export one with `edgetailor export bundle --model DIR --out BUNDLE`")
        tmp = None
        root = path
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise BundleError(f"{path} is neither a bundle directory nor a .zip bundle")
            tmp = Path(tempfile.mkdtemp(prefix="edgetailor-bundle-"))
            try:
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        if member.startswith("/") or ".." in Path(member).parts:
                            raise BundleError(f"{path} holds an unsafe path {member!r}; refusing to extract it")
                    archive.extractall(tmp)
            except (zipfile.BadZipFile, OSError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise BundleError(f"{path} is a corrupt zip: {exc}", hint="copy or export the bundle again") from None
            except BundleError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            root = tmp
        try:
            manifest = cls._read_manifest(root, path)
            damaged = cls._verify_files(root, manifest, path)
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root, manifest, path, tmp, damaged)

    @staticmethod
    def _read_manifest(root: Path, source: Path) -> Manifest:
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise BundleError(f"{source} has no {MANIFEST}", hint="is this an edgetailor bundle? re-export it")
        try:
            text = manifest_path.read_text()
        except UnicodeDecodeError as exc:
            raise BundleError(f"{source}/{MANIFEST} is not valid JSON: {exc}",
                              hint="the bundle is damaged; re-export it") from None
        return Manifest.from_json(text, f"{source}/{MANIFEST}")

    @staticmethod
    def _verify_files(root: Path, manifest: Manifest, source: Path) -> dict[str, str]:
        """Re-hash every file. Returns the formats whose files are damaged;
        raises if a shared file is, or if every format is."""
        problems = {}
        for name, expected in manifest.files.items():
            file = root / name
            if not file.is_file():
                problems[name] = "is missing"
                continue
            actual = sha256_file(file)
            if actual != expected:
                problems[name] = (f"does not match its sha256 in the manifest "
                                  f"(expected {expected[:12]}…, found {actual[:12]}…)")
        formats = manifest.formats
        for fmt, entry in formats.items():
            needed = manifest.format_files(fmt)
            unlisted = [f for f in needed if entry.files.get(f) != manifest.files.get(f) or f not in manifest.files]
            if unlisted:
                raise BundleError(f"{source}/{MANIFEST}: format {fmt!r} references files it does not hash "
                                  f"consistently: {', '.join(unlisted)}", hint="the bundle is damaged; re-export it")
        owned = {f for fmt in formats for f in manifest.format_files(fmt)}
        if manifest.replay.file not in manifest.files:
            raise BundleError(f"{source}/{MANIFEST} references files it does not hash: {manifest.replay.file}")
        shared = {name: why for name, why in problems.items() if name not in owned}
        if shared:
            name, why = next(iter(shared.items()))
            raise BundleError(f"{source}: {name} {why}",
                              hint="the file is corrupt, modified or missing; re-export or re-download the bundle")
        damaged = {}
        for fmt in formats:
            bad = [f"{f} {problems[f]}" for f in manifest.format_files(fmt) if f in problems]
            if bad:
                damaged[fmt] = "; ".join(bad)
        if damaged and len(damaged) == len(formats):
            raise BundleError(f"{source}: " + "; ".join(damaged.values()),
                              hint="the file is corrupt, modified or missing; re-export or re-download the bundle")
        return damaged

    @property
    def formats(self) -> list[str]:
        """The formats this bundle carries (damaged or not)."""
        return list(self.manifest.formats)

    @property
    def usable_formats(self) -> list[str]:
        return [f for f in self.formats if f not in self.damaged]

    def require_format(self, name: str, backends_for: dict[str, list[str]] | None = None) -> None:
        """Refuse a format the bundle lacks or whose files are damaged, naming what would work.

        ``backends_for`` maps a format to the device backends that run it, so
        that the error can name backends rather than formats."""
        def alternatives() -> str:
            usable = self.usable_formats
            if backends_for:
                names = [b for f, bs in backends_for.items() if f in usable for b in bs]  # caller's order
                return f"backends that would work with it: {', '.join(names) or 'none'}"
            return f"usable formats: {', '.join(usable) or 'none'}"

        if name not in self.manifest.formats:
            raise BundleError(f"{self.source} has no {name} files (it carries: {', '.join(self.formats)})",
                              hint=f"{alternatives()}; or re-export with "
                                   f"`edgetailor export bundle --formats {','.join([*self.formats, name])}`")
        if name in self.damaged:
            raise BundleError(f"{self.source}: {self.damaged[name]}",
                              hint=f"its {name} files are corrupt or were modified; {alternatives()}; "
                                   "or re-export / re-download the bundle")

    @property
    def bundle_id(self) -> str:
        """A content id: the same files give the same id, whatever the path."""
        return hashlib.sha256(json.dumps(self.manifest.files, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    def path(self, name: str) -> Path:
        return self.root / name

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
