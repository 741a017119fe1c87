"""The device bundle: a directory (or one .zip of it) with ``manifest.json``,
the model files it lists (each with its sha256 and size) and, when signed,
``signature.json`` over the manifest.

A bundle carries GE (and LE and GN's training programs) in one or more
formats, one per runtime; the manifest (``toolkit.manifest.Manifest``)
lists each format's files with their hashes. Export writes bundles; the
device opens them with ``Bundle.open``, which, in this order: checks every
declared size against ``toolkit.limits`` (zip members, ratio, manifest),
reads the manifest and checks its signature (``toolkit.signing``), asks the
caller's ``TrustCheck`` whether that signer may run here, and only then
unpacks a .zip and re-hashes every file. A damaged shared file (the
manifest, the replay glyphs) refuses the whole bundle; a damaged format's
file only that format, so that the error can name the backends that still
work (``Bundle.require_format``); a signed bundle must match entirely.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import BundleError
from edgetailor.toolkit.limits import Limits, current_limits
from edgetailor.toolkit.manifest import Manifest, ReleaseSpec, check_relative_path, parse_json
from edgetailor.toolkit.signing import (SIGNATURE, BundleSignature, canonical_json, load_signing_key, sign_bundle_dir,
                                        verify_signature)

MANIFEST = "manifest.json"
TEMP_PREFIX = "edgetailor-bundle-"
KEEP_CACHED = 4            # unpacked bundles kept in a state's cache


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
    """Hash every file under ``bundle_dir`` into the manifest (all files with
    their sizes, and each format's own), then validate and write it."""
    files, sizes = {}, {}
    for path in sorted(bundle_dir.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, SIGNATURE):
            name = path.relative_to(bundle_dir).as_posix()
            files[name], sizes[name] = sha256_file(path), path.stat().st_size
    manifest.files, manifest.sizes = files, sizes
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


# What decides whether a bundle's signer is trusted (the device's trust store,
# ``edgetailor.device.trust``): called after the manifest and its signature were
# read and checked, before anything is unpacked; raises TrustError to refuse.
TrustCheck = Callable[[Manifest, "BundleSignature | None", Path], None]


def sign_bundle(bundle_dir: str | Path, signing_key: str | Path, name: str | None = None, version: int | None = None,
                expires: datetime | str | None = None, make_zip: bool | None = None) -> Manifest:
    """Sign an exported bundle directory, re-hashing its files, and rewrite
    ``DIR.zip`` when it exists (or ``make_zip``): for publishers who sign on
    another machine than the one that exports. Giving a new ``name`` or
    ``expires`` without a ``version`` also gives a new version, since devices
    refuse other contents under a version they already accepted."""
    bundle_dir = Path(bundle_dir)
    key = load_signing_key(signing_key)
    with Bundle.open(bundle_dir) as bundle:
        manifest, damaged = bundle.manifest, bundle.damaged
    unlisted = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                      if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
                      and p.relative_to(bundle_dir).as_posix() not in manifest.files)
    if damaged or unlisted:
        problem = "; ".join(damaged.values()) if damaged else f"files the manifest does not list: {unlisted[:5]}"
        raise BundleError(f"refusing to sign {bundle_dir}: {problem}",
                          hint="sign only what export wrote; export the bundle again")
    current = manifest.release
    if current is None or name or version is not None or expires:
        if version is None and current is not None:
            version = max(current.version + 1, ReleaseSpec.make("").version)
        manifest.release = ReleaseSpec.make(name or (current.name if current else bundle_dir.name), version,
                                            expires or (current.expires if current else None))
    write_manifest(bundle_dir, manifest)
    sign_bundle_dir(bundle_dir, key)
    Bundle.open(bundle_dir).close()
    zip_path = bundle_dir.with_name(bundle_dir.name + ".zip")
    if make_zip or (make_zip is None and zip_path.exists()):
        zip_bundle(bundle_dir, zip_path)
    return manifest


@dataclass
class Bundle:
    """An opened, verified bundle. ``root`` holds the files: the directory
    itself, or a .zip's extraction (a content-addressed cache folder when
    ``cache_dir`` is given, else a temporary one that ``close`` removes)."""

    root: Path
    manifest: Manifest
    source: Path
    _tmp: Path | None = field(default=None, repr=False)
    # format -> why its files cannot be used (missing, or not matching their hash)
    damaged: dict[str, str] = field(default_factory=dict)
    signature: BundleSignature | None = None
    manifest_digest: str = ""      # sha256 of the canonical manifest: every field, every file's hash

    @classmethod
    def open(cls, path: str | Path, trust: TrustCheck | None = None, cache_dir: str | Path | None = None,
             limits: Limits | None = None) -> "Bundle":
        """Read and check the manifest and its signature, ask ``trust``, then
        unpack (a .zip) and re-hash every file. Every size is checked against
        ``limits`` before the bytes behind it are read."""
        path = Path(path)
        limits = current_limits(limits)
        if not path.exists():
            raise BundleError(f"no bundle at {path}",
                              hint="export one with `edgetailor export bundle --model DIR --out BUNDLE`")
        if path.is_file():
            with _ZipBundle(path, limits) as archive:
                manifest_bytes, signature_bytes = archive.read_small(MANIFEST), archive.read_small(SIGNATURE)
                manifest, digest, signature = cls._read_manifest(manifest_bytes, signature_bytes, path, limits)
                if trust is not None:
                    trust(manifest, signature, path)
                cache = Path(cache_dir) if cache_dir is not None else None
                root, tmp = archive.unpack(cache)
                if tmp is None and cache is not None:
                    try:
                        damaged = cls._verify_files(root, manifest, path, strict=signature is not None, limits=limits)
                    except BundleError:
                        # A cached unpack damaged since (a bad sector, a crash before 0.2 fsynced it): unpack
                        # the zip again once; if that copy fails too, the zip itself is bad.
                        shutil.rmtree(root, ignore_errors=True)
                        root, tmp = archive.unpack(cache)
                    else:
                        return cls(root, manifest, path, None, damaged, signature, digest)
        else:
            manifest, digest, signature = cls._read_manifest(_read_small(path / MANIFEST, limits),
                                                             _read_small(path / SIGNATURE, limits), path, limits)
            if trust is not None:
                trust(manifest, signature, path)
            root, tmp = path, None
        try:
            damaged = cls._verify_files(root, manifest, path, strict=signature is not None, limits=limits)
        except BaseException:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root, manifest, path, tmp, damaged, signature, digest)

    @staticmethod
    def _read_manifest(manifest_bytes: bytes | None, signature_bytes: bytes | None, source: Path,
                       limits: Limits) -> tuple[Manifest, str, BundleSignature | None]:
        """The manifest, its digest (over its canonical form: every field, whatever the formatting) and its
        checked signature."""
        if manifest_bytes is None:
            raise BundleError(f"{source} has no {MANIFEST}", hint="is this an edgetailor bundle? re-export it")
        where = f"{source}/{MANIFEST}"
        signature = None
        if signature_bytes is not None:   # checked first: a signed manifest is parsed only once it is genuine
            doc = parse_json(signature_bytes, f"{source}/{SIGNATURE}", limits)
            signature = verify_signature(manifest_bytes, doc, f"{source}/{SIGNATURE}")
        data = parse_json(manifest_bytes, where, limits)
        manifest = Manifest.from_dict(data, where)
        try:
            digest = hashlib.sha256(canonical_json(data)).hexdigest()
        except (ValueError, UnicodeEncodeError) as exc:   # NaN or 1e400 (not JSON), a lone surrogate
            raise BundleError(f"{where} holds a value with no canonical JSON form: {exc}",
                              hint="the bundle is damaged or was not written by edgetailor; re-export it") from None
        return manifest, digest, signature

    @staticmethod
    def _verify_files(root: Path, manifest: Manifest, source: Path, strict: bool = False,
                      limits: Limits | None = None) -> dict[str, str]:
        """Re-hash every file. Returns the formats whose files are damaged;
        raises if a shared file is, or if every format is, or (``strict``: a
        signed bundle, which must be exactly what its publisher signed) if any is."""
        limits = current_limits(limits)
        limits.check("max_bundle_members", len(manifest.files), f"{source}/{MANIFEST} lists files")
        if manifest.sizes:
            limits.check("max_bundle_bytes", sum(manifest.sizes.values()), f"{source}/{MANIFEST}'s files (bytes)")
        problems = {}
        real_root = root.resolve()
        for name, expected in manifest.files.items():
            file = root / name
            if file.is_symlink() or not file.resolve().is_relative_to(real_root):
                raise BundleError(f"{source}: {name} is a symbolic link or leads outside the bundle",
                                  hint="a bundle holds plain files only; re-export or re-download it")
            if not file.is_file():
                problems[name] = "is missing"
                continue
            size = file.stat().st_size
            if name in manifest.sizes and size != manifest.sizes[name]:
                problems[name] = f"is {size:,} bytes, the manifest says {manifest.sizes[name]:,}"
                continue
            limits.check("max_bundle_bytes", size, f"{source}/{name} (bytes)")
            actual = sha256_file(file)
            if actual != expected:
                problems[name] = (f"does not match its sha256 in the manifest "
                                  f"(expected {expected[:12]}…, found {actual[:12]}…)")
        if strict and problems:
            name, why = next(iter(problems.items()))
            raise BundleError(f"{source}: {name} {why}; a signed bundle must be exactly what its publisher signed",
                              hint="the file was modified, swapped or damaged; get the bundle from its publisher "
                                   "again")
        formats = manifest.formats
        for fmt, entry in formats.items():
            needed = manifest.format_files(fmt)
            unlisted = [f for f in needed if entry.files.get(f) != manifest.files.get(f) or f not in manifest.files]
            if unlisted:
                raise BundleError(f"{source}/{MANIFEST}: format {fmt!r} references files it does not hash "
                                  f"consistently: {', '.join(unlisted)}", hint="the bundle is damaged; re-export it")
        owned = {f for fmt in formats for f in manifest.format_files(fmt)}
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
        """A content id over the whole manifest (every field and every file's hash), whatever the path:
        a personalization is bound to it, so any change to the bundle retires it."""
        return self.manifest_digest[:16]

    @property
    def signer_id(self) -> str | None:
        return self.signature.signer_id if self.signature else None

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


def _read_small(path: Path, limits: Limits) -> bytes | None:
    """A manifest-sized file of a bundle directory, or None when absent; its size is checked before reading."""
    if not path.is_file():
        return None
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link", hint="a bundle holds plain files only; re-export it")
    limits.check("max_manifest_bytes", path.stat().st_size, f"{path} (bytes)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None


_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, KeyError,
            UnicodeDecodeError)


class _ZipBundle:
    """A .zip bundle, checked member by member against the limits from its
    central directory before any member is inflated, and unpacked with every
    member's length enforced as it is written (a header can lie)."""

    def __init__(self, path: Path, limits: Limits):
        self.path, self.limits = path, limits
        try:
            self.archive = zipfile.ZipFile(path)
            self.infos = self.archive.infolist()
        except _CORRUPT + (OSError,) as exc:
            raise BundleError(f"{path} is neither a bundle directory nor a readable .zip bundle: {exc}",
                              hint="copy or export the bundle again") from None
        try:
            self._check_members()
        except BaseException:
            self.archive.close()
            raise

    def _check_members(self) -> None:
        limits, path = self.limits, self.path
        limits.check("max_bundle_members", len(self.infos), f"{path} holds members")
        limits.check("max_bundle_bytes", sum(i.file_size for i in self.infos), f"{path} unpacks to (bytes)")
        seen = set()
        for info in self.infos:
            name = info.filename.rstrip("/") if info.is_dir() else info.filename
            check_relative_path(name, f"{path} (a zip member)")
            if name in seen:
                raise BundleError(f"{path} holds {name!r} twice", hint="the zip was tampered with; export it again")
            seen.add(name)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{path}: member {name!r} is a symbolic link",
                                  hint="a bundle holds plain files only; export it again")
            if info.file_size > (1 << 20):
                ratio = info.file_size / max(info.compress_size, 1)
                limits.check("max_compression_ratio", round(ratio, 1), f"{path}: member {name} inflates")

    def read_small(self, name: str) -> bytes | None:
        """A manifest-sized member, or None when absent."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            return None
        self.limits.check("max_manifest_bytes", info.file_size, f"{self.path}/{name} (bytes)")
        try:
            with self.archive.open(info) as member:
                return member.read(self.limits.max_manifest_bytes + 1)
        except _CORRUPT + (OSError,) as exc:
            raise BundleError(f"{self.path} is a corrupt zip ({name}: {exc})",
                              hint="copy or export the bundle again") from None

    def unpack(self, cache_dir: Path | None) -> tuple[Path, Path | None]:
        """Unpack into ``cache_dir/<zip sha256>`` (reused while the zip is unchanged; returns no temp) or,
        without a cache, into a temporary folder the caller removes. A folder
        being written is named after its process, so the next start removes
        what a killed process left behind."""
        target = staging = None
        if cache_dir is not None:
            target = cache_dir / sha256_file(self.path)[:32]
            if (target / ".complete").is_file():
                _touch(target)
                return target, None
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                sweep_leftovers(cache_dir, ".partial-")
                staging = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=cache_dir))
            except OSError:
                target = None     # a read-only or full state: unpack into a temporary folder instead
        if staging is None:
            sweep_leftovers(Path(tempfile.gettempdir()), TEMP_PREFIX)
            staging = self._mkdtemp(Path(tempfile.gettempdir()), f"{TEMP_PREFIX}{os.getpid()}-")
        try:
            self._extract_to(staging)
            if target is None:
                return staging, staging
            atomic.fsync_tree(staging)      # the files are on disk before the folder says it is complete
            (staging / ".complete").write_text("")
            try:
                os.replace(staging, target)
            except OSError:      # another process published the same zip first
                shutil.rmtree(staging, ignore_errors=True)
            evict_cached(cache_dir, keep=target)
            return target, None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _mkdtemp(self, parent: Path, prefix: str) -> Path:
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as exc:
            raise _unpack_error(self.path, parent, exc) from None

    def _extract_to(self, root: Path) -> None:
        for info in self.infos:
            if info.is_dir():
                continue
            out = root / info.filename
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with self.archive.open(info) as member, open(out, "wb") as handle:
                    while block := member.read(1 << 20):
                        written += len(block)
                        if written > info.file_size:
                            raise BundleError(f"{self.path}: member {info.filename} inflates past the "
                                              f"{info.file_size:,} bytes its header declares",
                                              hint="the zip was tampered with; export it again")
                        handle.write(block)
            except BundleError:
                raise
            except OSError as exc:
                raise _unpack_error(self.path, root, exc) from None
            except _CORRUPT as exc:
                raise BundleError(f"{self.path} is a corrupt zip ({info.filename}: {exc})",
                                  hint="copy or export the bundle again") from None

    def __enter__(self) -> "_ZipBundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.archive.close()


def _unpack_error(source: Path, where: Path, exc: OSError) -> BundleError:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        return BundleError(f"no space left to unpack {source} into {where}: {exc.strerror}",
                           hint="free some disk space (or point TMPDIR elsewhere) and try again; nothing was "
                                "changed")
    return BundleError(f"cannot unpack {source} into {where}: {exc}",
                       hint="check that the folder is writable; nothing was changed")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True      # no cheap check on Windows; leftovers there go by age (sweep_leftovers)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(parent: Path, prefix: str, max_age_s: float = 86400.0) -> None:
    """Remove unpack folders ``<prefix><pid>-*`` whose process is gone (killed mid-unpack); on Windows, where
    that cannot be checked cheaply, those older than a day."""
    import time

    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return
    for entry in entries:
        try:
            pid = int(entry.name[len(prefix):].split("-", 1)[0])
            stale = (not _pid_alive(pid) if os.name != "nt"
                     else time.time() - entry.stat().st_mtime > max_age_s)
        except (ValueError, OSError):
            continue
        if stale and pid != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass     # a read-only state still opens its cached bundle


def evict_cached(cache_dir: Path, keep: Path) -> None:
    """Keep the ``KEEP_CACHED`` most recently used unpacked bundles."""
    try:
        cached = sorted((p for p in cache_dir.iterdir() if (p / ".complete").is_file() and p != keep),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in cached[KEEP_CACHED - 1:]:
        shutil.rmtree(old, ignore_errors=True)
