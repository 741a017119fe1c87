"""The errors edgetailor raises on bad input, each carrying what to do next.

The CLI prints ``str(error)`` without a traceback, so every message names the
problem (which file, which sample, which label) and ends with a hint.
"""

from __future__ import annotations


class EdgetailorError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class BundleError(EdgetailorError):
    """A device bundle is missing, corrupt, tampered with or of an unknown schema."""


class SampleError(EdgetailorError):
    """User samples of the wrong shape, dtype, value range, or with unknown labels."""


class DataFormatError(EdgetailorError):
    """A data file or folder that none of the loaders can read."""


class CheckpointError(EdgetailorError):
    """A model directory that is not a usable edgetailor GE checkpoint or learngene."""


class ConfigError(EdgetailorError):
    """A recipe with an unknown key or a bad value."""


class StateError(EdgetailorError):
    """A device state directory that cannot be used with this bundle."""
