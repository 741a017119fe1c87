"""Fuzz inputs for the sample loaders: valid seeds, mutations of them, and a
check of one input. The hypothesis tests (test_fuzz_loaders.py) draw the
mutations' choices; a long run (a benchmark) passes ``random.Random``:

    seeds = seed_inputs()
    rng = random.Random(0)
    for _ in range(10_000):
        found = fuzz_one("npz", mutate("npz", seeds["npz"], rng), tmp_dir)

A loader may refuse any input, but only with an EdgetailorError (a message
naming the file and a hint); any other exception is a finding, and
``fuzz_one`` returns its type's name. Mutations are the blind ones (bit
flips, truncations, insertions, deletions, integers written over header
fields) and, so that inputs get past checksums to the parsers behind them,
structural ones: an npy member rewritten inside a re-built zip, IDX bytes
mutated inside a valid gzip, PNG chunks rewritten with their CRC fixed.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import random
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edgetailor.toolkit.errors import EdgetailorError
from edgetailor.toolkit.limits import Limits

LOADERS = ("npz", "idx", "idx.gz", "png")
# Small limits: a mutated header may declare anything up to them, and each input must stay fast.
FUZZ_LIMITS = Limits(max_image_pixels=1 << 18, max_samples=1000, max_sample_bytes=4 << 20, max_label_value=1000)
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
NPY_DESCRS = ("|u1", "<u2", ">u2", "<i4", ">i4", "<i8", "<f4", ">f8", "<f2", "|b1", "<c16", "|O", "<U0", "<U5",
              "|S3", "|V8", "<M8[s]", "[('a', '<i4')]", "('<u1', (2,))", "'|u1'", "u1", "<U2147483647", "()")
NPY_SHAPES = ("()", "(0,)", "(3,)", "(1,)", "(-1,)", "(3, 12, 12)", "(3, 12, 3)", "(3, 12, 12, 4)", "(3, 1, 12, 12)",
              "(12, 12)", "(3, 12, 12, 12, 12)", "(3, 4096, 4096)", "(99999999999, 12, 12)", "(3, 0, 12)",
              "(3, 12, 12,", "(3.0, 12, 12)", "(True,)", "[3, 12, 12]", "(2**40,)", "(" + "(" * 300 + ")" * 300 + ")")


@functools.lru_cache(maxsize=1)
def _seeds() -> tuple[tuple[str, bytes], ...]:
    rng = np.random.default_rng(0)
    images = np.zeros((3, 12, 12), np.uint8)
    for i in range(3):
        images[i, 2:10, 4 + i:6 + i] = 200 + rng.integers(0, 55)
    npz = io.BytesIO()
    np.savez(npz, x=images, y=np.array([0, 1, 2]), label_names=np.array(["a", "b", "c"]),
             preprocess=np.array(json.dumps({"name": "glyph-v1"})))
    idx = bytes([0, 0, 8, 3]) + struct.pack(">3I", *images.shape) + images.tobytes()
    return (("npz", npz.getvalue()), ("idx", idx), ("idx.gz", gzip.compress(idx, mtime=0)),
            ("png", _png(images[0])))


def seed_inputs() -> dict[str, bytes]:
    """A small valid input per loader name (``LOADERS``), each read without error."""
    return dict(_seeds())


def _png(image: np.ndarray) -> bytes:
    """A paletted PNG with transparency: more chunks (PLTE, tRNS) and decoder paths to reach."""
    from PIL import Image

    out = io.BytesIO()
    picture = Image.fromarray(image).convert("P")
    picture.info["transparency"] = 0
    picture.save(out, format="PNG", transparency=0)
    return out.getvalue()


# mutations -------------------------------------------------------------------

def mutate(loader: str, data: bytes, rng: random.Random) -> bytes:
    """One to three mutations of ``data``, blind or structural for ``loader``."""
    for _ in range(rng.randint(1, 3)):
        # structural mutations get past the checksums that stop most blind ones at the door
        kind = rng.choice(tuple(_BLIND) + ("structure",) * (2 if loader == "idx" else 6))
        if kind == "structure":
            data = _STRUCTURAL[loader](data, rng)
        else:
            data = _BLIND[kind](data, rng, _field_offsets(loader, data))
    return data


def _flip(data: bytes, rng: random.Random, offsets: list[int]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(data: bytes, rng: random.Random, offsets: list[int]) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def _insert(data: bytes, rng: random.Random, offsets: list[int]) -> bytes:
    at = rng.choice(offsets) if offsets and rng.random() < 0.5 else rng.randrange(len(data) + 1)
    filler = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) if rng.random() < 0.7 \
        else data[:rng.randint(1, 64)]
    return data[:at] + filler + data[at:]


def _delete(data: bytes, rng: random.Random, offsets: list[int]) -> bytes:
    start = rng.randrange(len(data) + 1)
    return data[:start] + data[start + rng.randint(1, 32):]


def _field(data: bytes, rng: random.Random, offsets: list[int]) -> bytes:
    """An integer written over a header field (or anywhere), in either byte order."""
    at = rng.choice(offsets) if offsets and rng.random() < 0.8 else rng.randrange(max(1, len(data)))
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.getrandbits(8 * width)
    if rng.random() < 0.2 and at + width <= len(data):  # near the value already there
        value = int.from_bytes(data[at:at + width], "little") + rng.randint(-4, 4)
    raw = (value % (1 << (8 * width))).to_bytes(width, rng.choice(("little", "big")))
    return data[:at] + raw + data[at + width:]


_BLIND = {"flip": _flip, "truncate": _truncate, "insert": _insert, "delete": _delete, "field": _field}


def _field_offsets(loader: str, data: bytes) -> list[int]:
    """Where the header fields are: zip records, the npy header, IDX dimensions, PNG chunk fields."""
    if loader == "npz":
        offsets = []
        for signature, fields in ((b"PK\x03\x04", (6, 8, 14, 18, 22, 26, 28)),
                                  (b"PK\x01\x02", (8, 10, 16, 20, 24, 28, 30, 32, 42)),
                                  (b"PK\x05\x06", (4, 8, 10, 12, 16, 20))):
            for match in re.finditer(re.escape(signature), data):
                offsets.extend(match.start() + f for f in fields)
        for match in re.finditer(rb"\x93NUMPY", data):
            offsets.extend(match.start() + f for f in (6, 7, 8, 9, 10))
        return [o for o in offsets if o < len(data)]
    if loader in ("idx", "idx.gz"):
        return list(range(0, 16)) if loader == "idx" else [3, 4, 8, 9, len(data) - 8, len(data) - 4]
    return [o for o in (8, 16, 20, 24, 25, 26, 27, 28) if o < len(data)] + \
        [m.start() - 4 for m in re.finditer(rb"PLTE|tRNS|IDAT|IEND", data)]


def _npz_structure(data: bytes, rng: random.Random) -> bytes:
    """A member rewritten (npy header text, bytes, name) or dropped, and the
    zip built again with valid CRCs, stored or deflated."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, struct.error,
            NotImplementedError, RuntimeError):
        return data  # already broken beyond rebuilding: leave it to the blind mutations
    if not members:
        return data
    name = rng.choice(sorted(members))
    member = members[name]
    action = rng.choice(("descr", "shape", "order", "header", "bytes", "drop", "rename", "pad"))
    if action == "descr":
        descr = rng.choice(NPY_DESCRS)
        descr = descr if descr[0] in "[('" else repr(descr)
        member = re.sub(rb"'descr': '[^']*'", b"'descr': " + descr.encode(), member, count=1)
    elif action == "shape":
        member = re.sub(rb"'shape': \([^)]*\)", b"'shape': " + rng.choice(NPY_SHAPES).encode(), member, count=1)
    elif action == "order":
        member = member.replace(b"False", rng.choice((b"True", b"0", b"None")), 1)
    elif action == "header":
        member = _flip(member[:128], rng, []) + member[128:]
    elif action == "bytes":
        member = rng.choice(list(_BLIND.values()))(member, rng, [])
    elif action == "drop":
        members.pop(name)
    elif action == "rename":
        members[rng.choice(("x.npy", "y.npy", "label_names.npy", "preprocess.npy", "x", "../x.npy"))] = member
    else:
        member = member[:8] + struct.pack("<H", rng.choice((0, 1, 0xFFFF, len(member)))) + member[10:]
    if action not in ("drop", "rename"):
        members[name] = member
    out = io.BytesIO()
    compression = rng.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(out, "w", compression) as archive:
            for key, value in members.items():
                archive.writestr(key, value)
    return out.getvalue()


def _idx_structure(data: bytes, rng: random.Random) -> bytes:
    """A rewritten IDX header: type code, dimension count, a dimension."""
    out = bytearray(data.ljust(8, b"\x00"))
    field = rng.choice(("type", "ndim", "dim"))
    if field == "type":
        out[2] = rng.choice((0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF))
    elif field == "ndim":
        out[3] = rng.choice((0, 1, 2, 3, 4, 5, 255))
    else:
        at = 4 + 4 * rng.randrange(max(1, min(out[3], (len(out) - 4) // 4)))
        out[at:at + 4] = struct.pack(">I", rng.choice(INTERESTING) & 0xFFFFFFFF)
    return bytes(out)


def _idx_gz_structure(data: bytes, rng: random.Random) -> bytes:
    """The IDX inside mutated, then gzipped again: a valid gzip with a hostile payload."""
    try:
        inner = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        inner = seed_inputs()["idx"]
    mutated = _idx_structure(inner, rng) if rng.random() < 0.5 else mutate("idx", inner, rng)
    return gzip.compress(mutated, mtime=0)


def _png_structure(data: bytes, rng: random.Random) -> bytes:
    """A chunk rewritten (IHDR fields, a chunk's bytes) or added, its CRC fixed,
    so that the decoder gets past the checksum."""
    chunks, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        chunks.append([kind, body])
        at += 12 + length
    if not chunks:
        return data
    action = rng.choice(("ihdr", "body", "add", "drop", "dup"))
    index = rng.randrange(len(chunks))
    if action == "ihdr" and chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13:
        ihdr = bytearray(chunks[0][1])
        which = rng.randrange(7)
        if which < 2:
            ihdr[4 * which:4 * which + 4] = struct.pack(">I", rng.choice((0, 1, 2, 511, 512, 513, 1 << 16, 1 << 31,
                                                                         0xFFFFFFFF, rng.getrandbits(32))))
        else:
            ihdr[6 + which] = rng.choice((0, 1, 2, 3, 4, 6, 8, 16, 255)) if which == 2 else rng.randrange(8)
        chunks[0][1] = bytes(ihdr)
    elif action == "body":
        chunks[index][1] = rng.choice(list(_BLIND.values()))(chunks[index][1], rng, [])
    elif action == "add":
        kind = rng.choice((b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"tRNS", b"PLTE", b"acTL", b"fcTL", b"fdAT",
                           b"sBIT", b"gAMA", b"pHYs", b"IDAT", b"IEND"))
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        if kind in (b"zTXt", b"iCCP"):
            body = b"k\x00\x00" + zlib.compress(bytes(rng.randint(0, 1 << 16)))
        chunks.insert(rng.randint(1, len(chunks)), [kind, body])
    elif action == "drop":
        chunks.pop(index)
    else:
        chunks.insert(index, list(chunks[index]))
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + kind + body
                                          + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


_STRUCTURAL = {"npz": _npz_structure, "idx": _idx_structure, "idx.gz": _idx_gz_structure, "png": _png_structure}


# the check -------------------------------------------------------------------

def fuzz_one(loader_name: str, data: bytes, tmp_dir: Path) -> str | None:
    """Run the loaders behind ``loader_name`` on ``data`` (written into
    ``tmp_dir``); the name of any exception that is not an EdgetailorError,
    None when every loader either read it or refused it properly."""
    from edgetailor.toolkit.loaders import decode_image, load_images, load_samples, read_idx
    from edgetailor.toolkit.preprocess import prepare_images

    tmp_dir = Path(tmp_dir)
    if loader_name == "npz":
        path = tmp_dir / "fuzz.npz"
        calls = [lambda: load_samples(path, limits=FUZZ_LIMITS), lambda: load_images(path, limits=FUZZ_LIMITS)]
    elif loader_name in ("idx", "idx.gz"):
        suffix, labels = (".gz", gzip.compress(_LABELS, mtime=0)) if loader_name == "idx.gz" else ("", _LABELS)
        path = tmp_dir / f"fuzz-images-idx3-ubyte{suffix}"
        (tmp_dir / f"fuzz-labels-idx1-ubyte{suffix}").write_bytes(labels)
        calls = [lambda: read_idx(path, FUZZ_LIMITS), lambda: load_samples(path, limits=FUZZ_LIMITS),
                 lambda: load_images(path, limits=FUZZ_LIMITS)]
    elif loader_name == "png":
        path = tmp_dir / "fuzz.png"
        calls = [lambda: prepare_images([decode_image(path, FUZZ_LIMITS)], skip_bad=True)]
    else:
        raise ValueError(f"no loader {loader_name!r}; one of {', '.join(LOADERS)}")
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in calls:
            try:
                call()
            except EdgetailorError:
                pass
            except Exception as exc:  # the finding: any other type is a bug
                kind = type(exc)
                return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return None


_LABELS = bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([0, 1, 2])
