"""Arrays out of untrusted ``.npz`` and IDX files, sized from their headers first.

``np.load`` trusts an ``.npz``: a 1.8 MB zip inflates to a 1 GiB member,
and the npy header's shape alone decides the allocation. An IDX header is 4
bytes per dimension, so 20 bytes promise terabytes, and ``gzip.open().read()``
inflates until the stream ends. Here the size every header declares (zip
directory, npy header, IDX dimensions) is checked against ``Limits`` before
anything is allocated, and then no more than the declared bytes are read, so
a header that lies about its data is caught as well (truncated or trailing).

The parsers underneath (zipfile, zlib, gzip, numpy's header reader) fail with
a dozen exception types; each one they are known to raise becomes a
DataFormatError naming the file. Only those: a fuzz test must still see a
real bug as what it is.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy

from edgetailor.toolkit.errors import DataFormatError
from edgetailor.toolkit.limits import Limits, current_limits

# What zipfile and zlib raise on a damaged archive (EOFError: a deflate stream cut short;
# struct.error: a short zip record; KeyError: a member the directory names but cannot find).
# NotImplementedError: a zip version or compression method zipfile does not know.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error, KeyError,
               UnicodeDecodeError, NotImplementedError)
# What numpy's npy header parser lets out besides ValueError (tokenize.TokenError: it re-parses a
# header that is not a Python literal as a Python 2 one; IndexError: an empty tuple as the dtype).
_HEADER_ERRORS = (ValueError, tokenize.TokenError, SyntaxError, IndexError)
NPY_HEADER_MAX = 10_000     # numpy's own bound on an npy header (np.load's max_header_size)
SMALL_MEMBER = 1 << 20      # below this a member's compression ratio says nothing: 1 MiB of zeros is fine
READ_CHUNK = 1 << 20
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_MAX_DIMS = 4


@dataclass(frozen=True)
class NpyHeader:
    """What an npy member declares: the array is not read until these pass."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int     # bytes before the data: magic, header length and header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class NpzArchive:
    """An ``.npz`` opened as the zip it is: members are looked at one by one
    (size in the directory, compression ratio, npy header) and read with a
    bounded read. ``header(name)`` checks what a member declares, so a caller
    can refuse a shape before ``read(name)`` allocates it."""

    def __init__(self, path: Path, limits: Limits | None = None):
        self.path, self.limits = Path(path), current_limits(limits)
        self._headers: dict[str, NpyHeader] = {}
        self._read_bytes = 0
        try:
            self._size = self.path.stat().st_size
            self._zip = zipfile.ZipFile(self.path)
            self._infos = {info.filename[:-4]: info for info in self._zip.infolist()
                           if info.filename.endswith(".npy")}
        except _ZIP_ERRORS as exc:
            raise DataFormatError(f"{path} is not a readable .npz file: {_describe(exc)}",
                                  hint="save it again with np.savez(path, x=images, y=labels)") from None

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc_info) -> None:
        self._zip.close()

    @property
    def names(self) -> list[str]:
        """The arrays the archive holds (``x`` for member ``x.npy``)."""
        return sorted(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def header(self, name: str) -> NpyHeader:
        """The shape and dtype member ``name.npy`` declares, once its declared sizes pass the limits."""
        if name in self._headers:
            return self._headers[name]
        info = self._member(name)
        try:
            with self._zip.open(info) as stream:
                header = self._parse_header(name, stream)
        except _ZIP_ERRORS as exc:
            raise self._damaged(name, exc) from None
        if header.data_offset + header.nbytes != info.file_size:
            raise DataFormatError(
                f"{self.path}: {name}.npy holds {info.file_size - header.data_offset:,} bytes of data, "
                f"but its header declares {header.shape} {header.dtype} ({header.nbytes:,} bytes)",
                hint="the file is truncated or corrupt; save it again")
        self._headers[name] = header
        return header

    def read(self, name: str) -> np.ndarray:
        """Member ``name.npy`` as an array, read into one buffer of its declared size."""
        header = self.header(name)
        self._read_bytes += header.nbytes
        self.limits.check("max_sample_bytes", self._read_bytes, f"{self.path}: the bytes of its arrays")
        try:
            with self._zip.open(self._member(name)) as stream:
                stream.read(header.data_offset)
                data = read_exactly(stream, header.nbytes)
                stream.read(1)  # to the end: zipfile checks the CRC there (it stops at the directory's size)
        except _ZIP_ERRORS as exc:
            raise self._damaged(name, exc) from None
        if data is None:
            raise DataFormatError(f"{self.path}: {name}.npy is truncated: its header declares "
                                  f"{header.nbytes:,} bytes of data", hint="the file is corrupt; save it again")
        if header.dtype.kind == "U" and (data.view(np.dtype("u4").newbyteorder(header.dtype.byteorder))
                                         > 0x10FFFF).any():
            # numpy would hand these on, and Python fails on such a str with SystemError
            raise DataFormatError(f"{self.path}: {name}.npy holds characters outside Unicode (above U+10FFFF)",
                                  hint="the file is corrupt; save it again")
        array = data.view(header.dtype)
        if header.fortran_order:
            return array.reshape(header.shape[::-1]).transpose()
        return array.reshape(header.shape)

    def iter_rows(self, name: str, rows: int) -> Iterator[np.ndarray]:
        """Member ``name.npy`` ``rows`` records (first-axis entries) at a time,
        for members larger than memory; the whole member is read, so the CRC
        at its end is checked too. Its declared size is not held against
        ``max_sample_bytes``: no buffer of that size is made."""
        header = self.streamed_header(name)
        if header.fortran_order or not header.shape:
            raise DataFormatError(f"{self.path}: {name}.npy is stored in Fortran order or is a scalar",
                                  hint="save it again with np.savez from a C-ordered array")
        row_bytes = math.prod(header.shape[1:]) * header.dtype.itemsize
        try:
            with self._zip.open(self._member(name, bounded=False)) as stream:
                stream.read(header.data_offset)
                for start in range(0, header.shape[0], rows):
                    count = min(rows, header.shape[0] - start)
                    data = read_exactly(stream, count * row_bytes)
                    if data is None:
                        raise DataFormatError(f"{self.path}: {name}.npy is truncated: its header declares "
                                              f"{header.nbytes:,} bytes of data",
                                              hint="the file is corrupt; save it again")
                    yield data.view(header.dtype).reshape(count, *header.shape[1:])
                stream.read(1)
        except _ZIP_ERRORS as exc:
            raise self._damaged(name, exc) from None

    def streamed_header(self, name: str) -> NpyHeader:
        try:
            with self._zip.open(self._member(name, bounded=False)) as stream:
                return self._parse_header(name, stream, bounded=False)
        except _ZIP_ERRORS as exc:
            raise self._damaged(name, exc) from None

    def _member(self, name: str, bounded: bool = True) -> zipfile.ZipInfo:
        info = self._infos[name]
        what = f"{self.path}: member {name}.npy"
        if info.flag_bits & 0x1:
            raise DataFormatError(f"{what} is encrypted", hint="save it again with np.savez, without a password")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise DataFormatError(f"{what} uses zip compression method {info.compress_type}",
                                  hint="save it with np.savez or np.savez_compressed")
        if info.compress_size > self._size:  # else the ratio below would rest on a second lie
            raise DataFormatError(f"{what} declares {info.compress_size:,} compressed bytes in a file of "
                                  f"{self._size:,}", hint="the file is truncated or corrupt; save it again")
        if bounded:
            self.limits.check("max_sample_bytes", info.file_size, f"{what}'s inflated size in bytes")
        if info.file_size >= SMALL_MEMBER:
            ratio = info.file_size / info.compress_size if info.compress_size else math.inf
            self.limits.check("max_compression_ratio", round(ratio, 1),
                              f"{what}'s compression ratio (inflated / compressed size)")
        return info

    def _parse_header(self, name: str, stream, bounded: bool = True) -> NpyHeader:
        """The npy header, read through numpy's own parser, but with its length
        checked first: a version 2 header states its length in 4 bytes, and
        numpy reads all of them before its own size check."""
        magic = stream.read(npy.MAGIC_LEN)
        version = npy.read_magic(io.BytesIO(magic))
        if version not in ((1, 0), (2, 0)):
            raise DataFormatError(f"{self.path}: {name}.npy is npy format version {version}, which is not read here",
                                  hint="save it with np.savez (format 1.0 or 2.0)")
        length_bytes = stream.read(2 if version == (1, 0) else 4)
        (length,) = struct.unpack("<H" if version == (1, 0) else "<I", length_bytes)
        if length > NPY_HEADER_MAX:
            raise DataFormatError(f"{self.path}: {name}.npy has a header of {length:,} bytes",
                                  hint="a genuine npy header is a few hundred bytes; save the file again")
        text = stream.read(length)
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        try:
            shape, fortran_order, dtype = reader(io.BytesIO(length_bytes + text), max_header_size=NPY_HEADER_MAX)
        except _HEADER_ERRORS as exc:
            raise DataFormatError(f"{self.path}: {name}.npy has a header numpy cannot parse: {_describe(exc)}",
                                  hint="the file is corrupt or not written by numpy; save it again") from None
        if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.itemsize == 0:
            raise DataFormatError(f"{self.path}: {name}.npy holds {dtype} values, not numbers or strings",
                                  hint="object and structured arrays are not read (they would need pickle)")
        if any(d < 0 for d in shape):
            raise DataFormatError(f"{self.path}: {name}.npy declares a negative dimension {shape}")
        header = NpyHeader(tuple(shape), dtype, fortran_order, npy.MAGIC_LEN + len(length_bytes) + length)
        if not bounded:
            return header
        if shape:
            self.limits.check("max_samples", shape[0], f"{self.path}: {name}.npy's first dimension (of {shape})")
        self.limits.check("max_sample_bytes", header.nbytes,
                          f"{self.path}: {name}.npy's declared size ({shape} {dtype}) in bytes")
        return header

    def _damaged(self, name: str, exc: Exception) -> DataFormatError:
        return DataFormatError(f"{self.path}: member {name}.npy cannot be read: {_describe(exc)}",
                               hint="the file is corrupt or not written by numpy; save it again with np.savez")


def read_exactly(stream, nbytes: int) -> np.ndarray | None:
    """``nbytes`` from ``stream`` into one uint8 buffer, in chunks, so that a
    stream holding less than its header promised costs no more than it holds
    and a full one is not copied twice. None when the stream ends early.
    Callers read one byte more: zipfile and gzip check their CRC at the end,
    and data running on past the declared size is refused."""
    out = np.empty(nbytes, np.uint8)
    view = memoryview(out)
    filled = 0
    while filled < nbytes:
        chunk = stream.read(min(READ_CHUNK, nbytes - filled))
        if not chunk:
            return None
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return out


def _idx_header(handle, path: Path, limits: Limits, whole: bool) -> tuple[tuple[int, ...], np.dtype]:
    """The dimensions and dtype of an IDX stream, its sizes checked against
    ``limits``; ``whole``: the data will be read into memory at once, so its
    count and bytes are checked too (a stream read in chunks needs neither)."""
    head = handle.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
        raise DataFormatError(f"{path} is not an IDX file (bad magic number)",
                              hint="MNIST/EMNIST files start with 00 00 08 03 (images) or 00 00 08 01 (labels)")
    ndim, dtype = head[3], np.dtype(IDX_DTYPES[head[2]])
    if not 1 <= ndim <= IDX_MAX_DIMS:
        raise DataFormatError(f"{path}: an IDX file of {ndim} dimensions is not read here",
                              hint=f"images have 3 dimensions and labels 1 (at most {IDX_MAX_DIMS})")
    dim_bytes = handle.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataFormatError(f"{path} is truncated: its header ends inside the dimensions")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    if whole:
        limits.check("max_samples", dims[0], f"{path}: the IDX header's count (of {dims})")
    limits.check("max_image_pixels", math.prod(dims[1:]), f"{path}: the IDX header's pixels per image "
                                                           f"(of {dims})")
    if whole:
        nbytes = math.prod(dims) * dtype.itemsize
        limits.check("max_sample_bytes", nbytes, f"{path}: the IDX header's data size ({dims} {dtype}) in bytes")
    return dims, dtype


def _idx_damaged(path: Path, exc: Exception) -> DataFormatError:
    return DataFormatError(f"cannot read IDX file {path}: {_describe(exc)}",
                           hint="the file is corrupt or truncated; download or copy it again")


def _idx_truncated(path: Path, dims: tuple[int, ...], dtype: np.dtype) -> DataFormatError:
    nbytes = math.prod(dims) * dtype.itemsize
    return DataFormatError(f"{path} is truncated or corrupt: the header declares {dims} {dtype} "
                           f"({nbytes:,} bytes of data), the file holds fewer",
                           hint="the file is corrupt or truncated; download or copy it again")


def read_idx(path: str | Path, limits: Limits | None = None) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, with its dimensions
    checked before its data is read. The dimensions come from the first
    bytes of the (inflated) stream; then exactly the bytes they declare are
    read, never the whole stream."""
    path, limits = Path(path), current_limits(limits)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            dims, dtype = _idx_header(handle, path, limits, whole=True)
            nbytes = math.prod(dims) * dtype.itemsize
            if opener is open and path.stat().st_size < 4 + 4 * len(dims) + nbytes:
                data = None  # a plain file's size is known: no buffer for data that is not there
            else:
                data = read_exactly(handle, nbytes)
            if data is not None and handle.read(1):  # gzip checks its CRC at the end
                raise DataFormatError(f"{path}: more data follows the {nbytes:,} bytes its header declares "
                                      f"({dims} {dtype})", hint="the file is corrupt or its header is wrong")
    except (OSError, EOFError, zlib.error) as exc:
        raise _idx_damaged(path, exc) from None
    if data is None:
        raise _idx_truncated(path, dims, dtype)
    return data.view(dtype).reshape(dims)


def iter_idx(path: str | Path, rows: int, limits: Limits | None = None) -> Iterator[np.ndarray]:
    """An IDX file ``rows`` records at a time, for files larger than memory:
    the first chunk comes after the header's checks, and the end of the
    stream is checked as ``read_idx`` checks it (truncated, or data past the
    declared size, or a gzip CRC)."""
    path, limits = Path(path), current_limits(limits)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            dims, dtype = _idx_header(handle, path, limits, whole=False)
            row_bytes = math.prod(dims[1:]) * dtype.itemsize
            if opener is open and path.stat().st_size < 4 + 4 * len(dims) + dims[0] * row_bytes:
                raise _idx_truncated(path, dims, dtype)
            for start in range(0, dims[0], rows):
                count = min(rows, dims[0] - start)
                data = read_exactly(handle, count * row_bytes)
                if data is None:
                    raise _idx_truncated(path, dims, dtype)
                yield data.view(dtype).reshape(count, *dims[1:])
            if handle.read(1):
                raise DataFormatError(f"{path}: more data follows the {dims[0] * row_bytes:,} bytes its header "
                                      f"declares ({dims} {dtype})", hint="the file is corrupt or its header is wrong")
    except (OSError, EOFError, zlib.error) as exc:
        raise _idx_damaged(path, exc) from None


def idx_shape(path: str | Path, limits: Limits | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """The dimensions and dtype an IDX file declares, without reading its data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            return _idx_header(handle, path, current_limits(limits), whole=False)
    except (OSError, EOFError, zlib.error) as exc:
        raise _idx_damaged(path, exc) from None


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
