"""Export: turn a GE into a device bundle: a checkpoint edgetailor trained
(``bundle.export_bundle``) or the user's own torch model
(``user_model.bundle_from_model``). GE in every chosen format (``formats``:
one exporter per format in the registry), LE and GN as training programs for
each runtime that trains (``trainable``), and a manifest listing every file
with its sha256. Every program is checked against its torch source before
anything is written. ``firmware`` turns a bundle into a C project for
microcontrollers (GE's layers, LE's and GN's initial weights, the replay
glyphs as const data), and ``firmware_samples`` writes samples in the
firmware's file format. Sits above the server side (it reads checkpoints and
models); needs torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bundle_from_model", "export_bundle"]


def __getattr__(name: str) -> Any:
    """``edgetailor.export.bundle_from_model`` without importing every exporter
    for the modules here that need none (``firmware_samples``)."""
    if name == "bundle_from_model":
        from edgetailor.export.user_model import bundle_from_model

        return bundle_from_model
    if name == "export_bundle":
        from edgetailor.export.bundle import export_bundle

        return export_bundle
    raise AttributeError(f"module 'edgetailor.export' has no attribute {name!r}")
