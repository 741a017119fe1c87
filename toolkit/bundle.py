"""The device bundle: a directory (or one .zip of it) with ``manifest.json``
and the model files it lists, each with its sha256.

Export writes bundles; the device opens them with ``Bundle.open``, which
checks the schema version, validates the manifest against
``manifest.schema.json`` and re-hashes every file before anything runs, so a
corrupt, truncated or tampered bundle is refused with the file it concerns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import atomic
from toolkit.errors import BundleError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_manifest(manifest: dict[str, Any], where: str = "manifest") -> None:
    import jsonschema  # pure Python, a base dependency

    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where} has schema version {version!r}; this toolkit reads version {SCHEMA_VERSION}",
                          hint="re-export the bundle with this toolkit version, or install the toolkit that wrote it")
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(manifest, schema)
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{where} is invalid at {at}: {exc.message}",
                          hint="the bundle is damaged or was not written by edgetailor; re-export it") from None


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``bundle_dir``, add the list to the manifest, validate and write it."""
    files = {}
    for path in sorted(bundle_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(bundle_dir).as_posix()] = sha256_file(path)
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "files": files}
    validate_manifest(manifest)
    atomic.write_text(bundle_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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
    manifest: dict[str, Any]
    source: Path
    _tmp: Path | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if not path.exists():
            raise BundleError(f"no bundle at {path}", hint="export one with `edgetailor export bundle --model DIR --out BUNDLE`")
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
            cls._verify_files(root, manifest, path)
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root, manifest, path, tmp)

    @staticmethod
    def _read_manifest(root: Path, source: Path) -> dict[str, Any]:
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise BundleError(f"{source} has no {MANIFEST}", hint="is this an edgetailor bundle? re-export it")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{source}/{MANIFEST} is not valid JSON: {exc}", hint="the bundle is damaged; re-export it") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{source}/{MANIFEST} is not a JSON object")
        validate_manifest(manifest, f"{source}/{MANIFEST}")
        return manifest

    @staticmethod
    def _verify_files(root: Path, manifest: dict[str, Any], source: Path) -> None:
        for name, expected in manifest["files"].items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"{source} is missing {name}", hint="copy the whole bundle, or re-export it")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(f"{source}: {name} does not match its sha256 in the manifest "
                                  f"(expected {expected[:12]}…, found {actual[:12]}…)",
                                  hint="the file is corrupt or was modified; re-export or re-download the bundle")
        referenced = [manifest["global_expert"]["file"], manifest["replay"]["file"],
                      *manifest["local_expert"]["artifacts"].values(), *manifest["gating_network"]["artifacts"].values()]
        unlisted = [name for name in referenced if name not in manifest["files"]]
        if unlisted:
            raise BundleError(f"{source}/{MANIFEST} references files it does not hash: {', '.join(unlisted)}")

    @property
    def bundle_id(self) -> str:
        """A content id: the same files give the same id, whatever the path."""
        return hashlib.sha256(json.dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()[:16]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

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
