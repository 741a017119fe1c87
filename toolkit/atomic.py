"""Crash-safe writes: temporary file, fsync, rename.

A process killed half-way through leaves either the old file or the new one,
never a torn mix. Directories are published the same way: built under a
temporary name beside the target, then renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename durable. Windows cannot open a directory (NTFS journals
    renames itself), so there it is a no-op."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """``mode`` (POSIX) is set on the temporary file before any byte is written: a private key is never
    readable by others, not even for a moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; published files get the usual mode (POSIX only)
            os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it is
    fsynced and renamed to ``target`` (replacing it if ``overwrite``); on any
    error it is removed, so a failed run leaves no half-written output."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
