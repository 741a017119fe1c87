"""Loaders for real labelled glyphs on local paths; nothing is downloaded.

``load_samples(path)`` picks the format from the path:
- a ``.npz`` file holding ``x`` (N, H, W) uint8 and ``y`` (N,) int (optional
  ``label_names``);
- MNIST/EMNIST IDX files, gzipped or not: the images file
  (``*-images-idx3-ubyte[.gz]`` or ``*-images.idx3-ubyte``) with its labels
  file beside it. EMNIST stores images transposed; files whose name says
  ``emnist`` are transposed back;
- an image folder with one sub-folder per label holding PNG/JPEG files of
  any size, in nested folders too (needs Pillow to decode).
Every image, whatever the container, goes through the same preprocessing
(``toolkit.preprocess``; by default the bundle's), so the same image gives
the same sample from each. Decoded files are taken as a person sees them:
EXIF rotation applied, transparency composited onto white, 16-bit scaled.
Blank and unreadable images are refused, all counted in one error, or left
out with ``skip_bad``. An ``.npz`` written by ``save_npz`` from prepared
samples records its preprocessing and is read back as it is.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np

from edgetailor.toolkit.data import DIGIT_LABELS, LabeledImages
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.imaging import CANVAS
from edgetailor.toolkit.preprocess import DEFAULT, Preprocessing, prepare_images

IMAGE_SUFFIXES = {".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_samples(path: str | Path, label_names: list[str] | None = None,
                 preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False) -> LabeledImages:
    """Read labelled glyphs from ``path`` (see the module doc for formats) as
    samples made by ``preprocessing`` (a device passes its bundle's).

    ``label_names`` maps the file's labels onto a bundle's label order; for
    integer-labelled files the default is the digits 0-9.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --samples path")
    if path.is_dir():
        data = load_image_folder(path, preprocessing, skip_bad)
    elif path.suffix == ".npz":
        data = load_npz(path, preprocessing, skip_bad)
    elif "idx3" in path.name:
        data = load_idx_pair(path, preprocessing=preprocessing, skip_bad=skip_bad)
    else:
        raise DataFormatError(
            f"cannot tell the format of {path}",
            hint="give a .npz with x and y, an MNIST/EMNIST '*-images-idx3-ubyte[.gz]' file "
                 "(labels file beside it) or a folder with one sub-folder per label")
    if label_names is not None:
        data = relabel(data, label_names)
    return data


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


def load_npz(path: Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False) -> LabeledImages:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataFormatError(f"{path} holds {sorted(archive.files)}, not 'x' and 'y'",
                                      hint="save with np.savez(path, x=images, y=labels)")
            x, y = archive["x"], archive["y"]
            names = [str(n) for n in archive["label_names"]] if "label_names" in archive else None
            made_by = json.loads(str(archive["preprocess"])) if "preprocess" in archive else None
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path} is not a readable .npz file: {exc}") from None
    if x.ndim not in (3, 4):
        raise DataFormatError(f"{path}: x must have shape (N, H, W) or (N, H, W, 3|4), got {x.shape}")
    if x.dtype not in (np.uint8, np.uint16) and not np.issubdtype(x.dtype, np.floating):
        raise DataFormatError(f"{path}: x must be uint8 (0-255), uint16 or float in [0, 1], got {x.dtype}",
                              hint="convert with (x * 255).round().astype(np.uint8) if it is float in [0, 1]")
    if y.ndim != 1 or len(y) != len(x):
        raise DataFormatError(f"{path}: y must have shape ({len(x)},), got {y.shape}")
    if names is None:
        if not np.issubdtype(y.dtype, np.integer):
            names = sorted({str(v) for v in y})
            y = np.array([names.index(str(v)) for v in y])
        else:
            names = list(DIGIT_LABELS) if y.size == 0 or y.max() < 10 else [str(i) for i in range(int(y.max()) + 1)]
    if y.size and (y.min() < 0 or y.max() >= len(names)):
        raise DataFormatError(f"{path}: labels must index label_names (0..{len(names) - 1}), got {y.min()}..{y.max()}")
    if made_by == preprocessing.to_dict() and x.dtype == np.uint8 and x.shape[1:] == (CANVAS, CANVAS):
        # samples saved by save_npz after this same preprocessing: already made
        return LabeledImages(x, y.astype(np.int64), names, str(path), made_by)
    return prepared(x, y.astype(np.int64), names, str(path), preprocessing, skip_bad)


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataFormatError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise DataFormatError(f"{path} is truncated or corrupt: {len(body)} bytes of data, header says {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def idx_labels_path(images_path: Path) -> Path:
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if a in images_path.name:
            return images_path.with_name(images_path.name.replace(a, b))
    raise DataFormatError(f"{images_path} does not look like an IDX images file")


def load_idx_pair(images_path: Path, transpose: bool | None = None, preprocessing: Preprocessing = DEFAULT,
                  skip_bad: bool = False) -> LabeledImages:
    images = read_idx(images_path)
    labels_path = idx_labels_path(images_path)
    if not labels_path.exists():
        raise DataFormatError(f"no labels file beside {images_path}", hint=f"expected {labels_path}")
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise DataFormatError(f"{labels_path} holds {labels.shape} labels for {len(images)} images")
    if transpose if transpose is not None else "emnist" in images_path.name.lower():
        images = images.transpose(0, 2, 1)
    digits = labels.size == 0 or labels.max() < 10
    names = list(DIGIT_LABELS) if digits else [str(i) for i in range(int(labels.max()) + 1)]
    return prepared(np.ascontiguousarray(images), labels, names, str(images_path), preprocessing, skip_bad)


def decode_image(path: Path) -> np.ndarray:
    """A PNG/JPEG/... file as a person sees it: grey float64 in [0, 1].

    EXIF orientation applied (phones store photos sideways); palette and
    transparency composited onto white, so ink drawn only in the alpha
    channel shows; 16-bit greys scaled from 65535; the first frame of an
    animation. Raises DataFormatError when the file cannot be decoded."""
    try:
        from PIL import Image, ImageOps  # optional: only image folders need a decoder
    except ImportError:
        raise DataFormatError("reading PNG/JPEG folders needs Pillow",
                              hint="pip install pillow, or convert the samples to .npz") from None
    try:
        with Image.open(path) as img:
            img.seek(0)
            img = ImageOps.exif_transpose(img)
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
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataFormatError(f"cannot decode image {path}: {exc}") from None


def load_image_folder(root: Path, preprocessing: Preprocessing = DEFAULT, skip_bad: bool = False) -> LabeledImages:
    label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not label_dirs:
        raise DataFormatError(f"{root} has no sub-folders",
                              hint="put each label's images in a sub-folder named after the label")
    images, labels, where, unreadable, ignored = [], [], [], [], []
    for label, folder in enumerate(label_dirs):
        for file in sorted(folder.rglob("*")):  # nested folders belong to their top-level label
            if file.is_dir() or any(part.startswith(".") for part in file.relative_to(root).parts):
                continue
            name = str(file.relative_to(root))
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(name)
                continue
            try:
                images.append(decode_image(file))
            except DataFormatError as exc:
                unreadable.append((name, str(exc)))
                continue
            labels.append(label)
            where.append(name)
    notes = [f"ignored {len(ignored)} file(s) that are not images ({', '.join(ignored[:3])}"
             f"{', ...' if len(ignored) > 3 else ''})"] if ignored else []
    if unreadable and not skip_bad:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise SampleError(f"{len(unreadable)} of {len(images) + len(unreadable)} images under {root} cannot be read: "
                          f"{', '.join(n for n, _ in unreadable[:3])}{more} ({unreadable[0][1]})",
                          hint="remove or re-save them, or skip them (skip_bad=True, --skip-bad on the CLI)")
    notes += [f"left out {name}: {why}" for name, why in unreadable]
    if not images:
        raise DataFormatError(f"no readable PNG/JPEG images under {root}",
                              hint=f"image files end in {', '.join(sorted(IMAGE_SUFFIXES))}")
    return prepared(images, np.array(labels), [p.name for p in label_dirs], str(root), preprocessing, skip_bad,
                    where, notes)


def save_npz(data: LabeledImages, path: str | Path) -> None:
    """Write ``data`` as an .npz; prepared samples record their preprocessing
    so that loading them back does not prepare them a second time."""
    extra = {"preprocess": np.array(json.dumps(data.prepared_with, sort_keys=True))} if data.prepared_with else {}
    np.savez_compressed(path, x=data.images, y=data.labels, label_names=np.array(data.label_names), **extra)
