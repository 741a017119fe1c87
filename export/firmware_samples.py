"""Samples as the firmware reads them: ``edgetailor export firmware-samples``.

A microcontroller cannot decode PNGs or run the glyph preprocessing, so the
samples are prepared here, by the bundle's own preprocessing and label
order (the toolkit's loaders, as ``device personalize`` prepares them), and
written in the flat format ``et_samples_open`` reads one record at a time
(firmware_examples/libedgetailor/include/edgetailor.h), little-endian::

    0  "ETSM"           magic
    4  u16 version      1
    6  u16 height, u16 width, u16 n_labels
   12  u32 count
   16  u32 crc32        zlib.crc32 of every record
   20  u32 labels_crc32 zlib.crc32 of the bundle's label names joined by "\n" (UTF-8): a file made for
                        another bundle with as many labels, or another label order, is refused
   24  count records of [u8 label][height*width u8 pixels, row-major, white ink on black]
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import DataFormatError, ExportError
from edgetailor.toolkit.loaders import load_samples
from edgetailor.export.firmware import open_bundle

MAGIC = b"ETSM"
VERSION = 1
HEADER = struct.Struct("<4sHHHHIII")    # 24 bytes: ET_SAMPLES_HEADER_BYTES
MAX_LABELS = 256                  # a record's label is one byte


@dataclass
class SamplesReport:
    path: Path
    count: int
    height: int
    width: int
    size: int                     # bytes
    class_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def labels_crc32(label_names: Iterable[str]) -> int:
    """What binds a sample file to its bundle's labels (et_samples_open computes the same from the model)."""
    return zlib.crc32("\n".join(label_names).encode("utf-8"))


def firmware_samples_bytes(images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> bytes:
    """The sample file of uint8 images (N, H, W) with label indices into ``label_names`` (the bundle's)."""
    n_labels = len(label_names)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise ExportError(f"samples must be uint8 (N, H, W) with one label each, got {images.dtype} {images.shape} "
                          f"and {labels.shape} labels")
    if not 0 < n_labels <= MAX_LABELS:
        raise ExportError(f"the firmware's sample file holds up to {MAX_LABELS} labels, the bundle has {n_labels}",
                          hint="the firmware runs bundles of at most 256 classes")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_labels):
        raise ExportError(f"a label index is outside 0..{n_labels - 1}")
    if len(images) > 0xFFFFFFFF or max(images.shape[1:], default=0) > 0xFFFF:
        raise ExportError(f"{images.shape} samples do not fit the sample file's header")
    n, height, width = images.shape
    records = np.empty((n, 1 + height * width), np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(n, -1)
    body = records.tobytes()
    return HEADER.pack(MAGIC, VERSION, height, width, n_labels, n, zlib.crc32(body), labels_crc32(label_names)) + body


def read_firmware_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64) of a sample file, with every check the firmware makes:
    magic, version, size, CRC and label range."""
    path = Path(path)
    data = path.read_bytes()
    hint = "write it again with `edgetailor export firmware-samples`"
    if len(data) < HEADER.size:
        raise DataFormatError(f"{path} is {len(data)} bytes, shorter than a sample file's header", hint=hint)
    magic, version, height, width, n_labels, count, crc, _labels_crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DataFormatError(f"{path} is not a firmware sample file (magic {magic!r}, expected {MAGIC!r})", hint=hint)
    if version != VERSION:
        raise DataFormatError(f"{path} is sample file version {version}; this edgetailor reads {VERSION}", hint=hint)
    record = 1 + height * width
    if len(data) != HEADER.size + count * record:
        raise DataFormatError(f"{path} is {len(data):,} bytes; its header promises {count} records of {record} "
                              f"bytes ({HEADER.size + count * record:,} in all)", hint=hint)
    body = data[HEADER.size:]
    if zlib.crc32(body) != crc:
        raise DataFormatError(f"{path}: the records do not match their CRC-32 (the file is damaged)", hint=hint)
    records = np.frombuffer(body, np.uint8).reshape(count, record)
    labels = records[:, 0].astype(np.int64)
    if count and labels.max() >= n_labels:
        raise DataFormatError(f"{path}: label {labels.max()} is outside the file's {n_labels} labels", hint=hint)
    return records[:, 1:].reshape(count, height, width).copy(), labels


def export_firmware_samples(samples: str | Path, bundle_path: str | Path, out: str | Path,
                            trusted_keys: Iterable[str | Path] | None = None,
                            skip_bad: bool = False) -> SamplesReport:
    """Load labelled samples in any format the loaders read, prepare them by the bundle's preprocessing, map
    their labels onto the bundle's (an unknown label is an error naming it) and write the sample file ``out``
    atomically."""
    bundle, _ = open_bundle(bundle_path, trusted_keys)
    with bundle:
        manifest = bundle.manifest
    if not manifest.input.is_image:
        raise ExportError(f"{bundle_path} reads {manifest.input.modality} input; the firmware's sample files hold "
                          "glyphs only", hint="the firmware runs glyph bundles; personalize this one in Python")
    labels = list(manifest.labels)
    _, height, width = manifest.input.shape
    data = load_samples(samples, labels, manifest.input.preprocessing(), skip_bad)
    if data.images.shape[1:] != (height, width):
        raise ExportError(f"the bundle's preprocessing makes {data.images.shape[1]}x{data.images.shape[2]} samples, "
                          f"but its GE reads {height}x{width}", hint="re-export the bundle")
    blob = firmware_samples_bytes(data.images, data.labels, labels)
    out = Path(out)
    atomic.write_bytes(out, blob)
    counts = np.bincount(data.labels, minlength=len(labels))
    return SamplesReport(out, len(data), height, width, len(blob),
                         {label: int(n) for label, n in zip(labels, counts)}, [*data.notes])
