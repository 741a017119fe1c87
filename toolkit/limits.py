"""Limits checked before work: how big an input may be before any of its bytes are allocated.

A 1.8 MB zip can hold a 1 GiB member, an 80-byte IDX header can promise
terabytes, and one label value of 2·10⁹ makes a label table of that length.
Every reader checks the size an input *declares* (zip central directory,
npy header, IDX dimensions, image header) against these limits first, and
then reads no more than that, so a lie in the header cannot get past either.

Each limit has a default and an override: an environment variable
(``EDGETAILOR_LIMIT_<NAME>``, e.g. ``EDGETAILOR_LIMIT_MAX_IMAGE_PIXELS=100000000``)
or a ``Limits`` passed to the API. The error names the limit, its value and
the variable that raises it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from edgetailor.toolkit.errors import LimitError

ENV_PREFIX = "EDGETAILOR_LIMIT_"


@dataclass(frozen=True)
class Limits:
    # bundles (.zip and directories)
    max_bundle_bytes: int = 1 << 30            # every file of a bundle, uncompressed
    max_bundle_members: int = 1000             # files in a bundle
    max_compression_ratio: float = 200.0       # uncompressed / compressed, per zip member (models deflate < 10x)
    max_manifest_bytes: int = 1 << 20          # manifest.json and signature.json
    max_json_depth: int = 32                   # nesting of any JSON the device reads
    # samples
    max_image_pixels: int = 40_000_000         # one decoded image (a 40 MP photo)
    max_samples: int = 1_000_000               # images in one data file
    max_sample_bytes: int = 1 << 30            # one data file's decoded arrays
    max_label_value: int = 65_535              # an integer label (labels are indices into a table of this size)

    def check(self, name: str, value: float, what: str) -> None:
        """Refuse ``value`` when it is over the limit ``name``: the message says what, the limit and how to raise it."""
        limit = getattr(self, name)
        if value > limit:
            raise LimitError(f"{what}: {value:,} is over the limit {name} = {limit:,}",
                             hint=f"if the input is genuine, raise it: {ENV_PREFIX}{name.upper()}={_raised(limit)} "
                                  f"(environment) or Limits({name}=...) in the API")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Limits":
        """The defaults with any ``EDGETAILOR_LIMIT_*`` overrides applied."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            try:
                value = float(raw) if field.type == "float" else int(raw)
            except ValueError:
                raise LimitError(f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not a number",
                                 hint="give a positive number, or unset it for the default") from None
            if not value > 0:
                raise LimitError(f"{ENV_PREFIX}{field.name.upper()}={raw!r} must be positive")
            values[field.name] = value
        return cls(**values)


def _raised(limit: float) -> str:
    return f"{limit * 4:g}" if isinstance(limit, float) else str(limit * 4)


def current_limits(limits: Limits | None = None) -> Limits:
    """``limits`` if given, else the defaults with the environment's overrides."""
    return limits if limits is not None else Limits.from_env()


def json_depth(text: str | bytes) -> int:
    """How deeply ``text``'s arrays and objects nest, found without parsing:
    ``json.loads`` recurses once per level, so 100,000 ``[`` would raise
    RecursionError (or crash a smaller stack) before any schema could refuse
    them. Brackets inside strings do not count."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
