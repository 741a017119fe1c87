"""Filling trained weights into a program file without its format's tooling.

A bundle's personalized-model template (``export.personalized``) is GE + LE +
GN + routing as one inference program, whose LE and GN weights and gate
threshold are placeholders. The device has its runtime but not the tools
that write programs (no ``onnx`` package, no converter, no torch), so it
writes the trained float32 values straight over the placeholders' bytes, at
offsets export found and recorded in a ``PatchTable``. Only the bytes of
constants change, never their size, so the file stays valid in any format;
export proves this for each template by patching it with random weights and
comparing with torch before the bundle is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import numpy as np

from edgetailor.toolkit.errors import BundleError

PATCH_VERSION = 1
THRESHOLD = "threshold"


@dataclass
class PatchTable:
    """For each part's parameter (C order) and the threshold: which element
    goes to which byte offset. One element may sit at several offsets (a
    constant a converter duplicated)."""

    values: dict[str, dict[str, tuple[list[int], list[int]]]]    # part -> parameter -> (elements, offsets)
    threshold: list[int]                                           # offsets of the gate threshold
    size: int                                                      # the template's size in bytes

    def check(self) -> None:
        """Every offset inside the file, no two values on the same bytes, one
        element per offset: a table that fails would write a corrupt program."""
        spans = [*self.threshold]
        for params in self.values.values():
            for name, (elements, offsets) in params.items():
                if len(elements) != len(offsets) or any(e < 0 for e in elements):
                    raise ValueError(f"{name}: {len(elements)} elements for {len(offsets)} offsets")
                spans += offsets
        if any(not 0 <= o <= self.size - 4 for o in spans):
            raise ValueError("an offset lies outside the program")
        spans.sort()
        if any(b - a < 4 for a, b in zip(spans, spans[1:])):
            raise ValueError("two values overlap")

    def to_json(self) -> str:
        return json.dumps({"version": PATCH_VERSION, "dtype": "float32", "byte_order": "little", "size": self.size,
                           "threshold": self.threshold,
                           "values": {part: {name: {"elements": e, "offsets": o} for name, (e, o) in params.items()}
                                      for part, params in self.values.items()}}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str) -> "PatchTable":
        try:
            data = json.loads(text)
            if data.get("version") != PATCH_VERSION or data.get("dtype") != "float32":
                raise ValueError(f"version {data.get('version')!r}, dtype {data.get('dtype')!r}")
            values = {part: {name: (list(map(int, entry["elements"])), list(map(int, entry["offsets"])))
                             for name, entry in params.items()} for part, params in data["values"].items()}
            table = cls(values, list(map(int, data["threshold"])), int(data["size"]))
            table.check()
            return table
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"{where} is not a patch table this toolkit reads: {exc}",
                              hint="the bundle is damaged or was written by a newer edgetailor; re-export it") from None


def find_offsets(data: bytes, markers: np.ndarray) -> list[list[int]]:
    """Every byte offset of each float32 marker value in ``data``."""
    found = []
    for value in np.asarray(markers, "<f4"):
        pattern, offsets, at = value.tobytes(), [], -1
        while (at := data.find(pattern, at + 1)) != -1:
            offsets.append(at)
        found.append(offsets)
    return found


def apply_patches(template: bytes, table: PatchTable, weights: dict[str, dict[str, np.ndarray]],
                  threshold: float, where: str = "the template") -> bytes:
    """``template`` with every placeholder replaced by the given weights and threshold."""
    if len(template) != table.size:
        raise BundleError(f"{where} has {len(template)} bytes, its patch table was made for {table.size}",
                          hint="the bundle is damaged; re-export it")
    out = bytearray(template)

    def put(offsets: list[int], values: np.ndarray) -> None:
        raw = np.asarray(values, "<f4").tobytes()
        for k, offset in enumerate(offsets):
            if not 0 <= offset <= len(out) - 4:
                raise BundleError(f"the patch table of {where} points outside it (offset {offset})",
                                  hint="the bundle is damaged; re-export it")
            out[offset:offset + 4] = raw[4 * k:4 * k + 4]

    for part, params in table.values.items():
        for name, (elements, offsets) in params.items():
            try:
                flat = np.asarray(weights[part][name], np.float32).reshape(-1)
            except KeyError:
                raise BundleError(f"{where} expects {part} parameter {name!r}, which the personalization lacks",
                                  hint="personalize again with this bundle") from None
            if elements and max(elements) >= flat.size:
                raise BundleError(f"{where} expects {part}.{name} with more than {flat.size} values",
                                  hint="personalize again with this bundle")
            put(offsets, flat[np.asarray(elements, np.int64)])
    put(table.threshold, np.full(len(table.threshold), threshold, np.float32))
    if len(out) != table.size:
        raise BundleError(f"patching {where} changed its size", hint="the bundle is damaged; re-export it")
    return bytes(out)

