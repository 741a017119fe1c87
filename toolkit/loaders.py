"""Loaders for real labelled glyphs on local paths; nothing is downloaded.

``load_samples(path)`` picks the format from the path:
- a ``.npz`` file holding ``x`` (N, H, W) uint8 and ``y`` (N,) int (optional
  ``label_names``);
- MNIST/EMNIST IDX files, gzipped or not: the images file
  (``*-images-idx3-ubyte[.gz]`` or ``*-images.idx3-ubyte``) with its labels
  file beside it. EMNIST stores images transposed; files whose name says
  ``emnist`` are transposed back;
- an image folder with one sub-folder per label holding PNG/JPEG files of
  any size (needs Pillow to decode).
Images that are not 28x28 are normalised MNIST-style (see ``toolkit.imaging``).
Black-on-white images (scans, photos) are inverted to white ink on black.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from edgetailor.toolkit.data import DIGIT_LABELS, LabeledImages, to_uint8
from edgetailor.toolkit.errors import DataFormatError, SampleError
from edgetailor.toolkit.imaging import CANVAS, mnist_style

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_samples(path: str | Path, label_names: list[str] | None = None) -> LabeledImages:
    """Read labelled glyphs from ``path`` (see the module doc for formats).

    ``label_names`` maps the file's labels onto a bundle's label order; for
    integer-labelled files the default is the digits 0-9.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"no such file or folder: {path}", hint="check the --samples path")
    if path.is_dir():
        data = load_image_folder(path)
    elif path.suffix == ".npz":
        data = load_npz(path)
    elif "idx3" in path.name:
        data = load_idx_pair(path)
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
    return LabeledImages(data.images, labels, list(label_names), data.source)


def to_canvas(images: np.ndarray) -> np.ndarray:
    """Make (N, H, W) uint8 images 28x28 MNIST-style when they are another size."""
    if images.shape[1:] == (CANVAS, CANVAS):
        return images
    return to_uint8(np.stack([mnist_style(img.astype(np.float32) / 255.0) for img in images]))


def load_npz(path: Path) -> LabeledImages:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataFormatError(f"{path} holds {sorted(archive.files)}, not 'x' and 'y'",
                                      hint="save with np.savez(path, x=images, y=labels)")
            x, y = archive["x"], archive["y"]
            names = [str(n) for n in archive["label_names"]] if "label_names" in archive else None
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path} is not a readable .npz file: {exc}") from None
    if x.ndim != 3:
        raise DataFormatError(f"{path}: x must have shape (N, H, W), got {x.shape}")
    if x.dtype != np.uint8:
        raise DataFormatError(f"{path}: x must be uint8 (0-255), got {x.dtype}",
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
    return LabeledImages(to_canvas(x), y.astype(np.int64), names, str(path))


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


def load_idx_pair(images_path: Path, transpose: bool | None = None) -> LabeledImages:
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
    return LabeledImages(to_canvas(np.ascontiguousarray(images)), labels, names, str(images_path))


def _decode_image(path: Path) -> np.ndarray:
    try:
        from PIL import Image  # optional: only image folders need a decoder
    except ImportError:
        raise DataFormatError("reading PNG/JPEG folders needs Pillow",
                              hint="pip install pillow, or convert the samples to .npz") from None
    try:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise DataFormatError(f"cannot decode image {path}: {exc}") from None
    # Scans and photos are dark ink on a light page: flip to white ink on black.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return 1.0 - grey if border.mean() > 0.5 else grey


def load_image_folder(root: Path) -> LabeledImages:
    label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not label_dirs:
        raise DataFormatError(f"{root} has no sub-folders",
                              hint="put each label's images in a sub-folder named after the label")
    images, labels = [], []
    for label, folder in enumerate(label_dirs):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(mnist_style(_decode_image(file)))
                labels.append(label)
    if not images:
        raise DataFormatError(f"no PNG/JPEG images under {root}")
    return LabeledImages(to_uint8(np.stack(images)), np.array(labels), [p.name for p in label_dirs], str(root))


def save_npz(data: LabeledImages, path: str | Path) -> None:
    np.savez_compressed(path, x=data.images, y=data.labels, label_names=np.array(data.label_names))
