"""The errors edgetailor raises on bad input, each carrying what to do next.

The CLI prints ``str(error)`` without a traceback, so every message names the
problem (which file, which sample, which label) and ends with a hint: the one
given where the error is raised, or else its class's ``default_hint``, so no
user-caused error leaves the user without a next step.
"""

from __future__ import annotations


class EdgetailorError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    default_hint = "see `edgetailor --help` and docs/ARCHITECTURE.md"

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class BundleError(EdgetailorError):
    """A device bundle is missing, corrupt, tampered with or of an unknown schema."""

    default_hint = "re-export the bundle (`edgetailor export bundle`) or copy it again"


class SampleError(EdgetailorError):
    """User samples of the wrong shape, dtype, value range, or with unknown labels."""

    default_hint = "give uint8 (N, 28, 28) images (or float in [0, 1]) with one known label each"


class DataFormatError(EdgetailorError):
    """A data file or folder that none of the loaders can read."""

    default_hint = ("the loaders read an .npz with x (N, H, W) uint8 and y (N,), an MNIST/EMNIST IDX images "
                    "file with its labels file beside it, or a folder with one sub-folder of images per label")


class CheckpointError(EdgetailorError):
    """A model directory that is not a usable edgetailor GE checkpoint or learngene."""

    default_hint = "create a checkpoint with `edgetailor server pretrain --out DIR`"


class ConfigError(EdgetailorError):
    """A recipe with an unknown key or a bad value."""

    default_hint = "fix the recipe value named above; every key is listed in the recipe's dataclass"


class StateError(EdgetailorError):
    """A device state directory that cannot be used with this bundle."""

    default_hint = "personalize again, or start afresh with `edgetailor device reset`"


class BackendError(EdgetailorError):
    """A device runtime that is not installed, cannot load, or cannot run this bundle."""

    default_hint = "`edgetailor device info --bundle BUNDLE` lists the backends and how to install them"


class PersonalizationError(EdgetailorError):
    """On-device training that failed (diverged); the previous personalization stays in use."""

    default_hint = "check the samples and the personalize settings; the previous personalization stays in use"


class ExportError(EdgetailorError):
    """An exported program that does not match its torch source; nothing is written."""

    default_hint = "nothing was written; see docs/upstream/ for known runtime defects, or export fewer --formats"


class ModelError(EdgetailorError):
    """A user's torch model that cannot be a GE: wrong outputs, an unknown tap, an input it does not take,
    or an op or control flow the bundle's formats cannot carry; nothing is written."""

    default_hint = "see docs/BRING_YOUR_OWN_MODEL.md for what a GE must return and how taps are named"


class LimitError(EdgetailorError):
    """An input over a size limit (``toolkit.limits``), refused before its bytes were allocated."""

    default_hint = "if the input is genuine, raise the limit named above (EDGETAILOR_LIMIT_<NAME>)"


class TrustError(BundleError):
    """A bundle that no key this device trusts signed, or one older than a bundle already accepted."""

    default_hint = ("get the bundle from its publisher again; a device trusts the keys given with --trusted-keys "
                    "and keys they endorse")


class SigningKeyError(EdgetailorError):
    """A key file that is missing, unreadable or not an Ed25519 key."""

    default_hint = "make a key pair with `edgetailor keys generate --out DIR`"
