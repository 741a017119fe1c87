"""Hostile sample files that declare far more than they hold, built without
allocating what they declare: deflate streams of zeros are assembled from
one compressed block repeated, and headers are written by hand.

Shared by the bomb tests and by benchmarks that time how fast they are refused.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

CHUNK = 1 << 20


def deflated_zeros(prefix: bytes, zeros: int) -> tuple[bytes, int, int]:
    """Raw deflate of ``prefix`` followed by ``zeros`` zero bytes, its CRC-32
    and its length. After a full flush deflate starts afresh, so the block for
    1 MiB of zeros is the same every time: compressed once, repeated."""
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [first.compress(prefix) + first.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    whole, rest = divmod(zeros, CHUNK)
    zero_chunk = bytes(CHUNK)
    if whole:
        block = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts.append((block.compress(zero_chunk) + block.flush(zlib.Z_FULL_FLUSH)) * whole)
        for _ in range(whole):
            crc = zlib.crc32(zero_chunk, crc)
    if rest:
        tail = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts.append(tail.compress(bytes(rest)) + tail.flush(zlib.Z_FULL_FLUSH))
        crc = zlib.crc32(bytes(rest), crc)
    parts.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush())  # the final, empty block
    return b"".join(parts), crc, len(prefix) + zeros


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    out = io.BytesIO()
    npy.write_array_header_1_0(out, {"descr": descr, "shape": shape, "fortran_order": False})
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    npy.write_array(out, np.asarray(array), allow_pickle=False)
    return out.getvalue()


def write_zip(path: Path, members: dict[str, bytes | tuple[bytes, int, int]]) -> Path:
    """A zip written by hand: ``bytes`` members are stored, ``(deflated, crc,
    size)`` members deflated, so a member may inflate to more than memory."""
    body, directory = bytearray(), bytearray()
    for name, member in members.items():
        if isinstance(member, bytes):
            data, crc, size, method = member, zlib.crc32(member), len(member), 0
        else:
            (data, crc, size), method = member, 8
        encoded = name.encode()
        offset = len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size,
                            len(encoded), 0) + encoded + data
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                                 len(encoded), 0, 0, 0, 0, 0, offset) + encoded
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path


def npz_bomb(path: Path, x_shape: tuple[int, ...], labels: int = 1) -> Path:
    """An .npz whose ``x`` (uint8 zeros of ``x_shape``) inflates to its full
    size from about 1 KB per MiB; ``y`` is small and genuine."""
    header = npy_header(x_shape)
    return write_zip(path, {"x.npy": deflated_zeros(header, int(np.prod(x_shape))),
                            "y.npy": npy_bytes(np.zeros(labels, np.int64))})


def idx_header(dims: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_of(deflated: bytes, crc: int, size: int) -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflated + struct.pack("<II", crc, size & 0xFFFFFFFF)


def idx_gz_bomb(path: Path, dims: tuple[int, ...], zeros: int, type_code: int = 0x08) -> Path:
    """A gzipped IDX file: the header ``dims`` then ``zeros`` zero bytes, whatever the header says."""
    path.write_bytes(gzip_of(*deflated_zeros(idx_header(dims, type_code), zeros)))
    return path


def png_of_size(path: Path, width: int, height: int) -> Path:
    """A genuine 1-bit grey PNG of ``width`` x ``height`` white pixels,
    compressed row block by row block (Pillow would hold all its pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * (-(-width // 8))
    rows_per_block = max(1, CHUNK // len(row))
    compressor, idat = zlib.compressobj(9), []
    for start in range(0, height, rows_per_block):
        idat.append(compressor.compress(row * min(rows_per_block, height - start)))
    idat.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat))
                     + chunk(b"IEND", b""))
    return path
