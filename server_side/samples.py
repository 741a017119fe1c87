"""Generic training data as a ``SampleStore``: prepared 28x28 samples that
training reads a batch at a time, so that a dataset need not fit in memory.

A store is either in memory (the built-in digits, a ``LabeledImages`` an API
caller passes) or a file of prepared samples on disk. ``open_samples(path)``
makes the file from an ``.npz``, an MNIST/EMNIST IDX pair or an image folder
in one streamed pass: the source is read a chunk at a time, worker processes
decode and prepare each chunk (``toolkit.preprocess``, as every loader
does), and the samples are appended to a temporary file that is renamed into
a cache once complete. The same pass hashes the samples (the data hash a
checkpoint records and ``--resume`` compares) so nothing is read twice. A
later run on the same unchanged file reuses the cache.

Training then reads rows with positional reads, not a memory map: mapped
pages count towards a process's resident memory, so a map of a 5 GB file
would grow every worker to 5 GB over an epoch; reads keep each process at
its batch.

A store behaves like ``LabeledImages`` where the split and the provenance
need it (``labels``, ``subset``, ``fingerprint``, ``source``) so that
``toolkit.data.split_generic`` splits either kind the same way.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgetailor.toolkit import __version__, atomic
from edgetailor.toolkit.arrayfiles import NpzArchive, idx_shape, iter_idx
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.imaging import CANVAS
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.limits import Limits, current_limits
from edgetailor.toolkit.loaders import (IMAGE_SUFFIXES, check_image_header, read_preprocess_record, decode_image,
                                        idx_labels_path, labelled_files, labels_as_indices, read_label_names)
from edgetailor.toolkit.preprocess import DEFAULT, Preprocessing, prepare_images, raise_refused

ProgressFn = Callable[[int, int], None]

CACHE_FORMAT = 1
CACHE_ENV = "EDGETAILOR_CACHE"
CHUNK_IMAGES = 4096          # images a worker prepares at once (about 3 MB of 28x28 samples)
READ_ROWS = 8192             # rows read at once when a store is scanned in order


def default_cache_dir() -> Path:
    """``$EDGETAILOR_CACHE``, else the platform's user cache (XDG on Linux)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or Path.home() / ".cache"
    return Path(base) / "edgetailor" / "samples"


@dataclass
class SampleStore:
    """Prepared uint8 samples (N, H, W) with integer labels, in memory or in
    a file, possibly a view (``index``) of a larger one."""

    labels_all: np.ndarray
    label_names: list[str]
    source: str
    sha256: str
    shape: tuple[int, int] = (CANVAS, CANVAS)
    images: np.ndarray | None = None       # in memory: all rows
    path: Path | None = None               # on disk: rows of H*W bytes, back to back
    index: np.ndarray | None = None        # a view: rows of the whole store, in this order
    prepared_with: dict | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._handle = None
        self._pid = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # DataLoader workers get the store pickled: the open file stays behind and is reopened there.
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @classmethod
    def from_images(cls, data: LabeledImages) -> "SampleStore":
        images = np.ascontiguousarray(data.images)
        if images.dtype != np.uint8:
            raise SampleError(f"generic samples must be uint8 images, got {images.dtype}")
        return cls(np.asarray(data.labels, np.int64), list(data.label_names), data.source, data.fingerprint(),
                   images.shape[1:], images=images, prepared_with=data.prepared_with, notes=list(data.notes))

    # what split_generic and provenance use, as on LabeledImages
    @property
    def labels(self) -> np.ndarray:
        return self.labels_all if self.index is None else self.labels_all[self.index]

    def __len__(self) -> int:
        return len(self.labels_all) if self.index is None else len(self.index)

    def fingerprint(self) -> str:
        """The sha256 of the whole store's samples and labels (as ``LabeledImages.fingerprint``)."""
        return self.sha256

    def subset(self, index: np.ndarray) -> "SampleStore":
        index = np.asarray(index, np.int64)
        rows = index if self.index is None else self.index[index]
        return SampleStore(self.labels_all, self.label_names, self.source, self.sha256, self.shape, self.images,
                           self.path, rows, self.prepared_with, self.notes)

    def at_most(self, count: int, seed: int = 0) -> "SampleStore":
        """This view, or a seeded random ``count`` of it (in store order): for
        reports whose cost grows with the data, such as every runtime over the
        test part, on data of any size."""
        if len(self) <= count:
            return self
        return self.subset(np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False)))

    # reading
    def read(self, positions: np.ndarray) -> np.ndarray:
        """The samples at ``positions`` (of this view), uint8 (len, H, W), in that order."""
        positions = np.asarray(positions, np.int64)
        rows = positions if self.index is None else self.index[positions]
        if self.images is not None:
            return self.images[rows]
        return self._read_rows(rows)

    def chunks(self, size: int = READ_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(samples, labels) in order, ``size`` at a time."""
        labels = self.labels
        for start in range(0, len(self), size):
            positions = np.arange(start, min(start + size, len(self)))
            yield self.read(positions), labels[positions]

    def to_images(self) -> LabeledImages:
        """This view in memory (for small ones: the replay, calibration)."""
        return LabeledImages(self.read(np.arange(len(self))), self.labels, list(self.label_names), self.source,
                             self.prepared_with)

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        row_bytes = int(np.prod(self.shape))
        out = np.empty((len(rows), *self.shape), np.uint8)
        flat = out.reshape(len(rows), row_bytes)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # runs of consecutive rows are read at once: an in-order scan is a few large reads
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        with self._lock:
            handle = self._open()
            for run in np.split(np.arange(len(rows)), breaks):
                if not len(run):
                    continue
                first, count = int(sorted_rows[run[0]]), len(run)
                data = _pread(handle, first * row_bytes, count * row_bytes)
                if len(data) != count * row_bytes:
                    raise DataFormatError(f"{self.path} is shorter than its {len(self.labels_all):,} samples",
                                          hint="the sample cache is damaged: delete it and run again")
                flat[order[run]] = np.frombuffer(data, np.uint8).reshape(count, row_bytes)
        return out

    def _open(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        return self._handle


def _pread(handle, offset: int, size: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(handle.fileno(), size, offset)
    handle.seek(offset)          # Windows: no pread; callers hold the store's lock
    return handle.read(size)


def input_spec_of(train: SampleStore | LabeledImages, preprocess: dict | None = None) -> InputSpec:
    """GE's input normalisation from its training samples, in one streamed
    pass (float64 sums), so that a store of any size costs one chunk."""
    store = train if isinstance(train, SampleStore) else SampleStore.from_images(train)
    total = total_sq = 0.0
    count = 0
    for images, _ in store.chunks():
        scaled = images.astype(np.float64) / 255.0
        total += float(scaled.sum())
        total_sq += float(np.square(scaled).sum())
        count += scaled.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return InputSpec(shape=[1, *store.shape], scale=1.0 / 255.0, mean=mean, std=std,
                     preprocess=preprocess or store.prepared_with or DEFAULT.to_dict())


# ------------------------------------------------------------ preparing a file

@dataclass(frozen=True)
class _Source:
    """A data file or folder read a chunk of raw images at a time."""

    path: Path
    kind: str                         # "npz" | "idx" | "folder"
    count: int
    label_names: list[str]
    labels: np.ndarray                # one per raw image
    made_by: dict | None = None       # the preprocessing an .npz records (save_npz)
    files: tuple = ()                 # folder: the image files, in label order
    transpose: bool = False           # EMNIST stores images transposed

    def stamp(self) -> list:
        """What identifies this source's content cheaply: paths, sizes and modification times."""
        paths = [f for f, _ in self.files] if self.kind == "folder" else [self.path]
        if self.kind == "idx":
            paths.append(idx_labels_path(self.path))
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _open_source(path: Path, limits: Limits) -> _Source:
    if path.is_dir():
        files, names, _ = labelled_files(path, IMAGE_SUFFIXES, True, limits, "images")
        if not files:
            raise DataFormatError(f"no PNG/JPEG images under {path}",
                                  hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")
        return _Source(path, "folder", len(files), names, np.array([lab for _, lab in files], np.int64),
                       files=tuple(files))
    if path.suffix == ".npz":
        with NpzArchive(path, limits) as npz:
            if "x" not in npz or "y" not in npz:
                raise DataFormatError(f"{path} holds {npz.names}, not 'x' and 'y'",
                                      hint="save with np.savez(path, x=images, y=labels)")
            header = npz.streamed_header("x")
            n = check_image_header(path, header, limits)
            names = read_label_names(path, npz) if "label_names" in npz else None
            y = np.concatenate(list(npz.iter_rows("y", 1 << 20)) or [np.zeros(0, np.int64)])
            if y.shape != (n,):
                raise DataFormatError(f"{path}: y must have shape ({n},), one label per image, got {y.shape}")
            y, names = labels_as_indices(path, y, names, limits)
            made_by = read_preprocess_record(path, npz, limits) if "preprocess" in npz else None
        return _Source(path, "npz", n, names, y, made_by)
    if "idx3" in path.name:
        dims, dtype = idx_shape(path, limits)
        if len(dims) != 3 or dtype != np.uint8:
            raise DataFormatError(f"{path}: expected (N, H, W) uint8 images, got {dims} {dtype}",
                                  hint="an IDX images file has type code 08 (unsigned byte) and 3 dimensions")
        labels_path = idx_labels_path(path)
        if not labels_path.exists():
            raise DataFormatError(f"no labels file beside {path}", hint=f"expected {labels_path}")
        labels = np.concatenate(list(iter_idx(labels_path, 1 << 20, limits)) or [np.zeros(0, np.int64)])
        if labels.shape != (dims[0],) or labels.dtype.kind not in "iu":
            raise DataFormatError(f"{labels_path} holds {labels.shape} {labels.dtype} labels for {dims[0]} images",
                                  hint="an IDX labels file holds one integer per image")
        labels, names = labels_as_indices(labels_path, labels, None, limits)
        return _Source(path, "idx", dims[0], names, labels, transpose="emnist" in path.name.lower())
    raise DataFormatError(f"cannot tell the format of {path}",
                          hint="give a .npz with x and y, an MNIST/EMNIST '*-images-idx3-ubyte[.gz]' file "
                               "(labels file beside it) or a folder with one sub-folder per label")


def _raw_chunks(source: _Source, limits: Limits) -> Iterator[tuple[int, object]]:
    """(first raw index, a chunk of raw images or of image files), in order."""
    if source.kind == "folder":
        for start in range(0, source.count, CHUNK_IMAGES):
            yield start, [str(f) for f, _ in source.files[start:start + CHUNK_IMAGES]]
        return
    if source.kind == "npz":
        with NpzArchive(source.path, limits) as npz:
            start = 0
            for chunk in npz.iter_rows("x", CHUNK_IMAGES):
                yield start, chunk
                start += len(chunk)
        return
    start = 0
    for chunk in iter_idx(source.path, CHUNK_IMAGES, limits):
        yield start, np.ascontiguousarray(chunk.transpose(0, 2, 1)) if source.transpose else chunk
        start += len(chunk)


def _prepare_chunk(raw, preprocessing: dict, made_by: dict | None, limits: Limits):
    """One chunk -> (samples, kept indices, refused [(index, why)]); runs in a worker process."""
    from edgetailor.toolkit.preprocess import from_spec

    prep = from_spec(preprocessing)
    refused = []
    if isinstance(raw, list):            # image files: decode them here, in the worker
        decoded, where = [], []
        for i, file in enumerate(raw):
            try:
                decoded.append(decode_image(file, limits))
                where.append(i)
            except DataFormatError as exc:
                refused.append((i, exc.message))
        if not decoded:
            return np.zeros((0, CANVAS, CANVAS), np.uint8), np.zeros(0, np.int64), refused
        result = prepare_images(decoded, prep, skip_bad=True)
        kept = np.array([where[k] for k in result.kept], np.int64)
        refused += [(where[i], why) for i, why in result.refused]
        return result.images, kept, sorted(refused)
    if made_by == preprocessing and raw.dtype == np.uint8 and raw.shape[1:] == (CANVAS, CANVAS):
        return raw, np.arange(len(raw)), []          # samples save_npz wrote after this preprocessing
    result = prepare_images(raw, prep, skip_bad=True)
    return result.images, np.asarray(result.kept, np.int64), list(result.refused)


def open_samples(path: str | Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False,
                 cache_dir: str | Path | None = None, workers: int = 0, progress: ProgressFn | None = None,
                 limits: Limits | None = None) -> SampleStore:
    """The labelled images at ``path`` (the formats ``toolkit.loaders``
    reads) as a store of prepared samples on disk, made once and cached.

    ``workers`` processes decode and prepare chunks side by side (0: in this
    process). Bad images stop the pass with one error naming them, or are
    left out with ``skip_bad`` and listed in ``notes``."""
    path, limits = Path(path), current_limits(limits)
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --data path")
    source = _open_source(path, limits)
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, source.stamp(), preprocessing.to_dict(), skip_bad,
                                     source.transpose], sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / key
    if not (target / "meta.json").exists():
        _check_room(folder, source.count)
        try:
            _write_store(source, preprocessing, skip_bad, target, workers, progress, limits)
        except OSError as exc:       # a disk that fills up mid-way: the staged folder is gone already
            raise DataFormatError(f"cannot write the sample cache {target}: {exc.strerror or exc}",
                                  hint=f"free disk space there, or set {CACHE_ENV} to a folder on a disk with "
                                       "room; nothing was kept") from None
    return load_store(target)


def _check_room(folder: Path, count: int) -> None:
    """Refuse before any work when the cache's disk cannot hold the samples."""
    need = count * CANVAS * CANVAS + count * 8
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataFormatError(f"the sample cache {folder} needs {need / 2**20:,.1f} MB for {count:,} images; its "
                              f"disk has {free / 2**20:,.1f} MB free",
                              hint=f"free disk space there, or set {CACHE_ENV} to a folder on a disk with room")


def load_store(folder: Path) -> SampleStore:
    """A store ``open_samples`` wrote (its ``meta.json``, ``labels.npy`` and ``samples.u8``)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        size = (folder / "samples.u8").stat().st_size
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"the sample cache {folder} is damaged: {exc}",
                              hint=f"delete {folder} and run again") from None
    shape = tuple(meta["shape"])
    if meta.get("format") != CACHE_FORMAT or size != len(labels) * shape[0] * shape[1]:
        raise DataFormatError(f"the sample cache {folder} is damaged or from another edgetailor",
                              hint=f"delete {folder} and run again")
    return SampleStore(labels.astype(np.int64), meta["label_names"], meta["source"], meta["sha256"], shape,
                       path=folder / "samples.u8", prepared_with=meta["prepared_with"], notes=meta["notes"])


def _write_store(source: _Source, preprocessing: Preprocessing, skip_bad: bool, target: Path, workers: int,
                 progress: ProgressFn | None, limits: Limits) -> None:
    spec = preprocessing.to_dict()
    digest = hashlib.sha256()
    kept_labels: list[np.ndarray] = []
    refused: list[tuple[int, str]] = []
    done = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged_dir(target, overwrite=True) as staging:
        with open(staging / "samples.u8", "wb") as out:
            def take(start: int, result) -> None:
                nonlocal done
                images, kept, chunk_refused = result
                out.write(np.ascontiguousarray(images).tobytes())
                digest.update(np.ascontiguousarray(images).tobytes())
                kept_labels.append(source.labels[start + kept])
                refused.extend((start + i, why) for i, why in chunk_refused)
                done += len(kept) + len(chunk_refused)
                if progress:
                    progress(done, source.count)

            if workers > 0:
                # at most 2 chunks per worker in flight: memory stays a few chunks, whatever the file's size
                # forkserver, not fork: the caller may have threads (torch's, a runtime's) that fork would copy mid-lock
                methods = multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
                with ProcessPoolExecutor(workers, mp_context=context) as pool:
                    pending: list = []
                    for start, raw in _raw_chunks(source, limits):
                        pending.append((start, pool.submit(_prepare_chunk, raw, spec, source.made_by, limits)))
                        if len(pending) >= 2 * workers:
                            first, future = pending.pop(0)
                            take(first, future.result())
                    for first, future in pending:
                        take(first, future.result())
            else:
                for start, raw in _raw_chunks(source, limits):
                    take(start, _prepare_chunk(raw, spec, source.made_by, limits))
            out.flush()
            os.fsync(out.fileno())
        if refused and not skip_bad:
            names = [str(f.relative_to(source.path)) for f, _ in source.files] if source.kind == "folder" else None
            raise_refused(refused, source.count, names)
        labels = np.concatenate(kept_labels) if kept_labels else np.zeros(0, np.int64)
        if not len(labels):
            raise SampleError(f"no usable images in {source.path}", hint="check the data: every image was refused")
        digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
        np.save(staging / "labels.npy", labels.astype(np.int64))
        what = "files" if source.kind == "folder" else "images"
        notes = [f"left out {len(refused)} of {source.count} {what} (first: {refused[0][1]})"] if refused else []
        meta = {"format": CACHE_FORMAT, "toolkit_version": __version__, "source": str(source.path),
                "label_names": list(source.label_names), "shape": [CANVAS, CANVAS], "sha256": digest.hexdigest(),
                "prepared_with": spec, "notes": notes, "n": int(len(labels))}
        atomic.write_text(staging / "meta.json", json.dumps(meta, indent=1) + "\n")


def as_store(data: LabeledImages | SampleStore | None) -> SampleStore:
    """Any generic data as a store; None: the built-in digits."""
    if isinstance(data, SampleStore):
        return data
    if data is None:
        from edgetailor.toolkit.data import load_generic_digits

        data = load_generic_digits()
    return SampleStore.from_images(data)

