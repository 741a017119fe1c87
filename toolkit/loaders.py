"""Loaders for real glyphs on local paths; nothing is downloaded.

``load_samples(path)`` reads labelled glyphs and picks the format from the path:
- a ``.npz`` file holding ``x`` (N, H, W) uint8 and ``y`` (N,) int (optional
  ``label_names``);
- MNIST/EMNIST IDX files, gzipped or not: the images file
  (``*-images-idx3-ubyte[.gz]`` or ``*-images.idx3-ubyte``) with its labels
  file beside it. EMNIST stores images transposed; files whose name says
  ``emnist`` are transposed back;
- an image folder with one sub-folder per label holding PNG/JPEG files of
  any size, in nested folders too (needs Pillow to decode).
``load_images(path)`` reads the same containers without labels, for
prediction: an ``.npz`` with only ``x``, an IDX images file alone, a folder
of images with or without sub-folders.

Every image, whatever the container, goes through the same preprocessing
(``toolkit.preprocess``; by default the bundle's), so the same image gives
the same sample from each. Decoded files are taken as a person sees them:
EXIF rotation applied, transparency composited onto white, 16-bit scaled.
Blank and unreadable images are refused, all counted in one error, or left
out with ``skip_bad``. An ``.npz`` written by ``save_npz`` from prepared
samples records its preprocessing and is read back as it is.

The files may come from anyone, so every size a file declares is checked
against ``toolkit.limits`` before it is allocated (``toolkit.arrayfiles``
for the array containers, the image header here), and every failure is an
EdgetailorError that names the file: DataFormatError, SampleError, or
LimitError naming the limit.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgetailor.toolkit.arrayfiles import NpyHeader, NpzArchive, read_idx  # noqa: F401 (read_idx: part of this API)
from edgetailor.toolkit.data import DIGIT_LABELS, LabeledImages
from edgetailor.toolkit.errors import DataFormatError, LimitError, SampleError
from edgetailor.toolkit.imaging import CANVAS
from edgetailor.toolkit.limits import Limits, current_limits, json_depth
from edgetailor.toolkit.preprocess import DEFAULT, Preprocessing, prepare_images, raise_refused

IMAGE_SUFFIXES = {".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm"}
UNLABELLED = ["unlabelled"]      # the one label name of what load_images returns
PREPROCESS_RECORD_MAX = 1 << 16  # save_npz writes a few hundred bytes of JSON
# Decoded images of a folder are prepared in batches of about this many pixels (32 MB as
# float64), so a folder of photos costs one batch of memory, not all of them at once.
FOLDER_BATCH_PIXELS = 1 << 22
FORMATS_HINT = ("give a .npz with x and y, an MNIST/EMNIST '*-images-idx3-ubyte[.gz]' file "
                "(labels file beside it) or a folder with one sub-folder per label")


def load_samples(path: str | Path, label_names: list[str] | None = None,
                 preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False,
                 limits: Limits | None = None) -> LabeledImages:
    """Read labelled glyphs from ``path`` (see the module doc for formats) as
    samples made by ``preprocessing`` (a device passes its bundle's).

    ``label_names`` maps the file's labels onto a bundle's label order; for
    integer-labelled files the default is the digits 0-9.
    """
    data = _load(Path(path), preprocessing, skip_bad, current_limits(limits), labelled=True)
    if label_names is not None:
        data = relabel(data, label_names)
    return data


def load_images(path: str | Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False,
                limits: Limits | None = None) -> LabeledImages:
    """Read glyphs to predict from ``path``: labels are neither needed nor
    read, so that a file without them (or with damaged ones) still predicts.
    Accepts an ``.npz`` with ``x`` (``y`` is ignored), an IDX images file
    without its labels file, or a folder of images, flat or in sub-folders
    (in path order). Every label is 0, named ``"unlabelled"``."""
    return _load(Path(path), preprocessing, skip_bad, current_limits(limits), labelled=False)


def _load(path: Path, preprocessing: Preprocessing, skip_bad: bool, limits: Limits, labelled: bool) -> LabeledImages:
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --samples path")
    if path.is_dir():
        return load_image_folder(path, preprocessing, skip_bad, limits, labelled=labelled)
    if path.suffix == ".npz":
        return load_npz(path, preprocessing, skip_bad, limits, labelled=labelled)
    if "idx3" in path.name:
        return load_idx_pair(path, preprocessing=preprocessing, skip_bad=skip_bad, limits=limits, labelled=labelled)
    raise DataFormatError(f"cannot tell the format of {path}", hint=FORMATS_HINT)


def relabel(data: LabeledImages, label_names: list[str]) -> LabeledImages:
    """Express ``data``'s labels as indices into ``label_names``; unknown ones are an error."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({data.label_names[label] if 0 <= label < len(data.label_names) else str(label)
                      for label in data.labels} - set(index))
    if unknown:
        raise SampleError(
            f"label(s) {', '.join(map(repr, unknown))} in {data.source or 'the samples'} are not known to the bundle",
            hint=f"the bundle knows: {', '.join(label_names)}")
    labels = np.array([index[data.label_names[label]] for label in data.labels], dtype=np.int64)
    return LabeledImages(data.images, labels, list(label_names), data.source, data.prepared_with, data.notes)


def prepared(images, labels: np.ndarray, names: list[str], source: str, preprocessing: Preprocessing,
             skip_bad: bool, where: list[str] | None = None, notes: list[str] | None = None) -> LabeledImages:
    """Raw images -> LabeledImages of samples; the images left out are named in ``notes``."""
    result = prepare_images(images, preprocessing, names=where, skip_bad=skip_bad)
    notes = list(notes or [])
    for i, why in result.refused:
        notes.append(f"left out {where[i] if where else f'image {i}'}: {why}")
    return LabeledImages(result.images, np.asarray(labels)[result.kept], names, source,
                         preprocessing.to_dict(), notes)


# .npz -----------------------------------------------------------------------

def load_npz(path: str | Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False,
             limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
    """An ``.npz`` of ``x`` and (when ``labelled``) ``y``. Every member's
    shape is checked from its header before it is read; an ``x`` whose
    shape could mean two things is refused rather than guessed."""
    path, limits = Path(path), current_limits(limits)
    with NpzArchive(path, limits) as npz:
        x, y, names = read_labelled_npz(npz, path, labelled, "image",
                                        lambda header: check_image_header(path, header, limits), limits)
        made_by = read_preprocess_record(path, npz, limits) if "preprocess" in npz else None
    if made_by == preprocessing.to_dict() and x.dtype == np.uint8 and x.shape[1:] == (CANVAS, CANVAS):
        # samples saved by save_npz after this same preprocessing: already made
        return LabeledImages(x, y, names, str(path), made_by)
    return prepared(x, y, names, str(path), preprocessing, skip_bad)


def read_labelled_npz(npz: NpzArchive, path: Path, labelled: bool, what: str, check_x: Callable[[NpyHeader], int],
                      limits: Limits) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``x``, label indices and label names from an open ``.npz`` of ``x`` and (when ``labelled``) ``y``
    and optional ``label_names``; every loader of samples (images, windows, clips) reads them so.
    Each member's shape is checked from its header before it is read: ``check_x`` refuses an ``x`` of
    the wrong layout for a ``what`` and returns N. Unlabelled: every input labelled 0."""
    wanted = ("x", "y") if labelled else ("x",)
    if any(name not in npz for name in wanted):
        raise DataFormatError(f"{path} holds {npz.names}, not {' and '.join(map(repr, wanted))}",
                              hint=f"save with np.savez(path, x={what}s, y=labels)" if labelled
                              else f"save with np.savez(path, x={what}s)")
    n = check_x(npz.header("x"))
    if labelled and npz.header("y").shape != (n,):
        raise DataFormatError(f"{path}: y must have shape ({n},), one label per {what}, got {npz.header('y').shape}")
    names = read_label_names(path, npz) if labelled and "label_names" in npz else None
    x = npz.read("x")
    if not labelled:
        return x, np.zeros(n, np.int64), list(UNLABELLED)
    y, names = labels_as_indices(path, npz.read("y"), names, limits)
    return x, y, names


def check_image_header(path: Path, header: NpyHeader, limits: Limits) -> int:
    """Refuse an ``x`` of the wrong layout, dtype or size from its header alone; returns N."""
    shape, dtype = header.shape, header.dtype
    if len(shape) == 3 and shape[2] in (3, 4):
        raise DataFormatError(
            f"{path}: x has shape {shape}, which could be one {shape[0]}x{shape[1]} colour image "
            f"or {shape[0]} grey images {shape[2]} pixels wide",
            hint="for one colour image save x[None] (shape (1, H, W, C)); grey glyphs 3-4 pixels wide are not read")
    if len(shape) == 3:
        pixels = shape[1] * shape[2]
    elif len(shape) == 4 and shape[3] in (3, 4):
        pixels = shape[1] * shape[2]    # (N, H, W, 3|4): colour
    elif len(shape) == 4 and shape[1] == 1:
        pixels = shape[2] * shape[3]    # (N, 1, H, W): GE's input layout
    else:
        raise DataFormatError(f"{path}: x must have shape (N, H, W) or (N, H, W, 3|4), got {shape}",
                              hint="save grey images as (N, H, W) and colour ones as (N, H, W, 3) or (N, H, W, 4)")
    if dtype not in (np.uint8, np.uint16) and not np.issubdtype(dtype, np.floating):
        raise DataFormatError(f"{path}: x must be uint8 (0-255), uint16 or float in [0, 1], got {dtype}",
                              hint="convert with (x * 255).round().astype(np.uint8) if it is float in [0, 1]")
    limits.check("max_image_pixels", pixels, f"{path}: x's pixels per image (of {shape})")
    return shape[0]


def read_label_names(path: Path, npz: NpzArchive) -> list[str]:
    header = npz.header("label_names")
    if len(header.shape) != 1 or header.dtype.kind not in "US":
        raise DataFormatError(f"{path}: label_names must be a 1-D array of strings, "
                              f"got shape {header.shape} {header.dtype}",
                              hint="save with label_names=np.array(['a', 'b', ...])")
    return _strings(path, "label_names", npz.read("label_names").tolist())


def read_preprocess_record(path: Path, npz: NpzArchive, limits: Limits) -> dict | None:
    """The preprocessing save_npz recorded: JSON in a 0-d string array."""
    header = npz.header("preprocess")
    if header.shape != () or header.dtype.kind not in "US" or header.nbytes > PREPROCESS_RECORD_MAX:
        raise DataFormatError(f"{path}: preprocess must be one JSON string (a 0-d string array of at most "
                              f"{PREPROCESS_RECORD_MAX:,} bytes), got shape {header.shape} {header.dtype}",
                              hint="leave preprocess out, or write the file with save_npz")
    (text,) = _strings(path, "preprocess", [npz.read("preprocess").item()])
    limits.check("max_json_depth", json_depth(text), f"{path}: the preprocess record's JSON nesting depth")
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise DataFormatError(f"{path}: preprocess is not valid JSON: {exc}",
                              hint="leave preprocess out, or write the file with save_npz") from None


def _strings(path: Path, member: str, values: list) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: {member} holds bytes that are not UTF-8 text: {exc}",
                              hint=f"save {member} as str, e.g. np.array(['a', 'b'])") from None


def labels_as_indices(path: Path, y: np.ndarray, names: list[str] | None,
                      limits: Limits) -> tuple[np.ndarray, list[str]]:
    """``y`` as indices into label names: integer labels index ``names``
    (default: the digits, or 0..max); other labels are named by their text.
    A label's value is checked before a table of that length is made."""
    if np.issubdtype(y.dtype, np.integer):
        _check_label_values(path, y, limits)
        if names is None:
            top = int(y.max()) if y.size else -1
            names = list(DIGIT_LABELS) if top < 10 else [str(i) for i in range(top + 1)]
        y = y.astype(np.int64)
    elif names is not None:
        raise DataFormatError(f"{path}: y must hold integer indices into label_names, got {y.dtype}",
                              hint="save y as integers, or leave label_names out to name labels by their text")
    else:
        table, y = np.unique(np.array([str(v) for v in y], dtype=str), return_inverse=True)
        names = table.tolist()
    if y.size and y.max() >= len(names):
        raise DataFormatError(f"{path}: labels must index label_names (0..{len(names) - 1}), got {y.min()}..{y.max()}",
                              hint="give one name per label value in label_names")
    return y.astype(np.int64).reshape(-1), names


def _check_label_values(path: Path, labels: np.ndarray, limits: Limits) -> None:
    """Integer labels are indices into a table of names: refuse negative ones
    and any over ``max_label_value`` before such a table is built."""
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataFormatError(f"{path}: labels must be >= 0 (indices into the label names), got {low}",
                              hint="number the labels from 0")
    limits.check("max_label_value", high, f"{path}: the largest label value")


# IDX ------------------------------------------------------------------------

def idx_labels_path(images_path: Path) -> Path:
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if a in images_path.name:
            return images_path.with_name(images_path.name.replace(a, b))
    raise DataFormatError(f"{images_path} does not look like an IDX images file",
                          hint="MNIST/EMNIST images files are named '*-images-idx3-ubyte[.gz]'")


def load_idx_pair(images_path: str | Path, transpose: bool | None = None, preprocessing: Preprocessing = DEFAULT,
                  skip_bad: bool = False, limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
    """An IDX images file and (when ``labelled``) the labels file beside it."""
    images_path, limits = Path(images_path), current_limits(limits)
    images = read_idx(images_path, limits)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}",
                              hint="an IDX images file has type code 08 (unsigned byte) and 3 dimensions")
    labels_path = idx_labels_path(images_path) if labelled else None
    if labels_path is not None and not labels_path.exists():
        raise DataFormatError(f"no labels file beside {images_path}", hint=f"expected {labels_path}")
    if labels_path is not None:
        labels = read_idx(labels_path, limits)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise DataFormatError(f"{labels_path} holds {labels.shape} {labels.dtype} labels for {len(images)} images",
                                  hint="an IDX labels file holds one integer per image")
        _check_label_values(labels_path, labels, limits)
        labels = labels.astype(np.int64)
        top = int(labels.max()) if labels.size else -1
        names = list(DIGIT_LABELS) if top < 10 else [str(i) for i in range(top + 1)]
    else:
        labels, names = np.zeros(len(images), np.int64), list(UNLABELLED)
    if transpose if transpose is not None else "emnist" in images_path.name.lower():
        images = images.transpose(0, 2, 1)
    return prepared(np.ascontiguousarray(images), labels, names, str(images_path), preprocessing, skip_bad)


# image files ----------------------------------------------------------------

_PILLOW_GLOBAL = threading.Lock()


@contextmanager
def _pillow_limit(image_module, pixels: int | None) -> Iterator[None]:
    """Pillow's own bomb check reads one module global (``MAX_IMAGE_PIXELS``)
    inside ``Image.open`` and while decoding. While the header is read it is
    off, so that our limit, which names itself and can be raised, fires first;
    while decoding it is our limit, so Pillow's per-frame and per-tile checks
    agree with it. The global is restored after, under a lock."""
    with _PILLOW_GLOBAL:
        saved = image_module.MAX_IMAGE_PIXELS
        image_module.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            image_module.MAX_IMAGE_PIXELS = saved


def decode_image(path: str | Path, limits: Limits | None = None) -> np.ndarray:
    """A PNG/JPEG/... file as a person sees it: grey float64 in [0, 1].

    EXIF orientation applied (phones store photos sideways); palette and
    transparency composited onto white, so ink drawn only in the alpha
    channel shows; 16-bit greys scaled from 65535; the first frame of an
    animation. The size in the header is checked against
    ``max_image_pixels`` before a pixel is decoded. Raises DataFormatError
    when the file cannot be decoded, LimitError when it is too large."""
    path, limits = Path(path), current_limits(limits)
    try:
        from PIL import Image, ImageOps  # optional: only image folders need a decoder
    except ImportError:
        raise DataFormatError("reading PNG/JPEG folders needs Pillow",
                              hint="pip install pillow, or convert the samples to .npz") from None
    try:
        with _pillow_limit(Image, None):
            img = Image.open(path)  # the header only
        with img:
            width, height = img.size
            limits.check("max_image_pixels", width * height, f"{path}: the image's pixels ({width}x{height})")
            with _pillow_limit(Image, limits.max_image_pixels):
                img.seek(0)
                return _as_seen(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataFormatError(f"cannot decode image {path}: {exc}",
                              hint="the file is corrupt or not an image; re-save it as PNG") from None
    except Image.DecompressionBombError as exc:  # a frame or tile larger than the image it belongs to
        raise LimitError(f"{path}: {exc}", hint="the file is probably hostile; re-save it as PNG") from None


def _as_seen(img) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if values.max() <= 1.0 else 255.0 if values.max() <= 255 else 65535.0
        return np.clip(values / top, 0.0, 1.0)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64) / 255.0
        grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        alpha = rgba[..., 3]
        composited = grey * alpha + (1.0 - alpha)
        if np.ptp(composited) < 0.05 < np.ptp(alpha):
            # light ink drawn only through alpha: on white it vanishes, so show the alpha as ink
            return 1.0 - alpha
        return composited
    return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def _files_under(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in path order (as ``sorted(folder.rglob("*"))``),
    hidden ones skipped, symlinked folders not followed. Iterative: a hostile
    tree may nest deeper than Python's recursion limit."""
    stack = [folder]
    while stack:
        current = stack.pop()
        if current != folder and (current.is_symlink() or not current.is_dir()):
            yield current
            continue
        try:
            with os.scandir(current) as entries:
                names = sorted(entry.name for entry in entries if not entry.name.startswith("."))
        except OSError as exc:
            raise DataFormatError(f"cannot list folder {current}: {exc}", hint="check its permissions") from None
        stack.extend(current / name for name in reversed(names))


def labelled_files(root: Path, suffixes: set[str], labelled: bool, limits: Limits,
                   what: str) -> tuple[list[tuple[Path, int]], list[str], list[str]]:
    """The files under ``root`` whose suffix is one of ``suffixes``, each with its label (the index of
    its top-level sub-folder, nested folders belonging to it; 0 when not ``labelled``), the label names,
    and a note naming the files left out for their suffix. Every folder loader lists files this way."""
    if labelled:
        label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not label_dirs:
            raise DataFormatError(f"{root} has no sub-folders",
                                  hint=f"put each label's {what} in a sub-folder named after the label")
        tops, names = [(folder, label) for label, folder in enumerate(label_dirs)], [p.name for p in label_dirs]
    else:
        tops, names = [(root, 0)], list(UNLABELLED)
    files, ignored = [], []
    for top, label in tops:
        for file in _files_under(top):
            if not file.is_file():
                continue
            if file.suffix.lower() not in suffixes:
                ignored.append(str(file.relative_to(root)))
                continue
            files.append((file, label))
            limits.check("max_samples", len(files), f"{root}: the number of {what}")
    notes = [f"ignored {len(ignored)} file(s) that are not {what} ({', '.join(ignored[:3])}"
             f"{', ...' if len(ignored) > 3 else ''})"] if ignored else []
    return files, names, notes


def read_each(files: list[tuple[Path, int]], root: Path, read: Callable[[Path], np.ndarray], skip_bad: bool,
              what: str, hint: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``read`` of every file, stacked, with the labels; a file it refuses stops the load, or with
    ``skip_bad`` is left out and named in the notes returned."""
    arrays, labels, notes = [], [], []
    for file, label in files:
        try:
            arrays.append(read(file))
        except (DataFormatError, SampleError) as exc:
            if not skip_bad:
                raise
            notes.append(f"left out {file.relative_to(root)}: {exc.message}")
            continue
        labels.append(label)
    if not arrays:
        raise DataFormatError(f"no readable {what} under {root}", hint=hint)
    return np.stack(arrays), np.array(labels, np.int64), notes


def load_image_folder(root: str | Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False,
                      limits: Limits | None = None, labelled: bool = True) -> LabeledImages:
    """Images under ``root``: labelled by their top-level sub-folder, or
    (not ``labelled``) all of them, flat or nested, labelled 0. Images are
    decoded and prepared a batch at a time, so memory holds one batch of
    decoded pixels however many photos the folder has."""
    root, limits = Path(root), current_limits(limits)
    files, names, notes = labelled_files(root, IMAGE_SUFFIXES, labelled, limits, "images")
    batch = _FolderBatches(preprocessing)
    unreadable = []
    for file, label in files:
        name = str(file.relative_to(root))
        try:
            batch.add(decode_image(file, limits), label, name)
        except DataFormatError as exc:
            unreadable.append((name, str(exc)))
    batch.flush()
    if unreadable and not skip_bad:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise SampleError(f"{len(unreadable)} of {len(files)} images under {root} cannot be read: "
                          f"{', '.join(n for n, _ in unreadable[:3])}{more} ({unreadable[0][1]})",
                          hint="remove or re-save them, or skip them (skip_bad=True, --skip-bad on the CLI)")
    notes += [f"left out {name}: {why}" for name, why in unreadable]
    if not batch.names:
        raise DataFormatError(f"no readable PNG/JPEG images under {root}",
                              hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")
    if batch.refused and not skip_bad:
        raise_refused(batch.refused, len(batch.names), batch.names)
    notes += [f"left out {batch.names[i]}: {why}" for i, why in batch.refused]
    images = np.concatenate(batch.images) if batch.images else np.zeros((0, CANVAS, CANVAS), np.uint8)
    labels = np.array(batch.labels, dtype=np.int64)[np.array(batch.kept, dtype=np.int64)]
    return LabeledImages(images, labels, names, str(root), preprocessing.to_dict(), notes)


class _FolderBatches:
    """Decoded images gathered until they reach FOLDER_BATCH_PIXELS, then
    prepared together (vectorised per size) and let go. Preparing an image
    does not depend on its batch, so the samples equal one big batch's."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing
        self.names: list[str] = []          # every decoded image, in order
        self.labels: list[int] = []
        self.images: list[np.ndarray] = []  # prepared samples, one array per batch
        self.kept: list[int] = []           # indices into names of the samples
        self.refused: list[tuple[int, str]] = []
        self._pending: list[np.ndarray] = []
        self._pixels = 0

    def add(self, image: np.ndarray, label: int, name: str) -> None:
        self.names.append(name)
        self.labels.append(label)
        self._pending.append(image)
        self._pixels += image.size
        if self._pixels >= FOLDER_BATCH_PIXELS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        first = len(self.names) - len(self._pending)
        result = prepare_images(self._pending, self.preprocessing, skip_bad=True)
        self.images.append(result.images)
        self.kept.extend(first + int(i) for i in result.kept)
        self.refused.extend((first + i, why) for i, why in result.refused)
        self._pending, self._pixels = [], 0


def save_npz(data: LabeledImages, path: str | Path) -> None:
    """Write ``data`` as an .npz; prepared samples record their preprocessing
    so that loading them back does not prepare them a second time."""
    extra = {"preprocess": np.array(json.dumps(data.prepared_with, sort_keys=True))} if data.prepared_with else {}
    np.savez_compressed(path, x=data.images, y=data.labels, label_names=np.array(data.label_names), **extra)
