"""Device backends: the runtimes that run GE and train LE and GN, behind one
interface (``base.Backend``) and registered in ``BACKENDS`` below: adding a
runtime means adding one module and one entry here.

- ``ort``: ONNX Runtime, inference and on-device training (no torch).
- ``executorch``: ExecuTorch, GE lowered to XNNPACK, LE/GN as joint
  forward-backward programs. Its Python bindings load libtorch, so in Python
  it needs torch installed; an app's C++ runtime does not.
- ``litert``: LiteRT (ai-edge-litert, or its predecessor tflite-runtime) for
  GE inference; LE and GN train on the best installed training backend.
- ``torch``: the reference, running torch.export programs; only when torch
  is installed and the bundle was exported with the ``torch`` format.

Each backend imports its runtime lazily, inside its own module, so the device
package imports with numpy alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from importlib import import_module

from edgetailor.device.backends.base import Backend
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.errors import BackendError
from edgetailor.toolkit.formats import FORMATS


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    cls: str
    format: str                  # the bundle format whose GE it runs (a name in toolkit.formats.FORMATS)
    modules: tuple[str, ...]     # importable modules that provide the runtime (any one)
    distributions: tuple[str, ...]  # the pip distribution of each of ``modules``, for its version
    requirement: str             # what to pip install
    description: str
    needs: tuple[str, ...] = ()  # modules its Python bindings also load

    @property
    def trains(self) -> bool:
        """Whether it trains LE and GN itself: its format carries training programs."""
        return FORMATS[self.format].trains


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("ort", "edgetailor.device.backends.ort", "OrtBackend", "onnx", ("onnxruntime",),
                ("onnxruntime-training",), "onnxruntime-training", "ONNX Runtime: GE inference and LE/GN training"),
    BackendInfo("executorch", "edgetailor.device.backends.executorch", "ExecuTorchBackend", "executorch",
                ("executorch",), ("executorch",), "executorch",
                "ExecuTorch: GE on XNNPACK, LE/GN as joint forward-backward programs", needs=("torch",)),
    BackendInfo("litert", "edgetailor.device.backends.litert", "LiteRTBackend", "tflite",
                ("ai_edge_litert", "tflite_runtime"), ("ai-edge-litert", "tflite-runtime"), "ai-edge-litert",
                "LiteRT: GE inference; LE/GN train on the best installed training backend"),
    BackendInfo("torch", "edgetailor.device.backends.torch_reference", "TorchBackend", "torch", ("torch",),
                ("torch",), "torch", "torch reference: torch.export programs, autograd"),
)}

# The order `auto` tries: fastest personalization and smallest memory first
# (measured by benchmarks/backends.py), the reference last.
PREFERENCE = ("ort", "executorch", "litert", "torch")
AUTO = "auto"


def _importable(module: str) -> bool:
    """Whether ``import module`` could work, found without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: deliberately blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def runtime_version(name: str) -> str | None:
    """The installed runtime's version, or None when it is not installed (found without importing it)."""
    info = BACKENDS[name]
    if not all(_importable(m) for m in info.needs):
        return None
    for module, distribution in zip(info.modules, info.distributions):
        if _importable(module):
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                return "installed"
    return None


def installed_backends() -> list[str]:
    return [name for name in PREFERENCE if runtime_version(name) is not None]


def backends_by_format() -> dict[str, list[str]]:
    """Bundle format -> the installed backends that run its GE, in order of preference."""
    result: dict[str, list[str]] = {}
    for name in installed_backends():
        result.setdefault(BACKENDS[name].format, []).append(name)
    return result


def _unknown(name: str) -> BackendError:
    return BackendError(f"unknown backend {name!r}", hint=f"backends: {', '.join(BACKENDS)}, or {AUTO}")


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name, importing its runtime."""
    if name not in BACKENDS:
        raise _unknown(name)
    info = BACKENDS[name]
    if runtime_version(name) is None:
        others = [b for b in installed_backends() if b != name]
        missing = " or ".join(info.modules) if not any(_importable(m) for m in info.modules) else " ".join(info.needs)
        raise BackendError(f"backend {name!r} is not installed (no module {missing})",
                           hint=f"pip install '{info.requirement}'; installed backends: "
                                f"{', '.join(others) or 'none'}")
    try:
        return getattr(import_module(info.module), info.cls)()
    except ImportError as exc:
        raise BackendError(f"backend {name!r} could not load its runtime ({exc})",
                           hint=f"reinstall it: pip install --force-reinstall '{info.requirement}'") from None


def usable_backends(bundle: Bundle) -> list[str]:
    """Installed backends whose format this bundle carries intact, best first.
    A GE-only backend counts only if some training backend is usable too."""
    usable = [n for n in installed_backends() if BACKENDS[n].format in bundle.usable_formats]
    if not any(BACKENDS[n].trains for n in usable):
        return []
    return usable


def choose_backends(bundle: Bundle, requested: str | None = None) -> tuple[Backend, Backend]:
    """(the backend that runs GE, the backend that trains and runs LE and GN).

    ``requested`` None or "auto": the best installed backend the bundle
    supports. A named backend must be installed and find its format in the
    bundle; a GE-only backend (litert) pairs with the best training backend."""
    requested = requested or AUTO
    if requested != AUTO and requested not in BACKENDS:
        raise _unknown(requested)
    usable = usable_backends(bundle)
    if requested == AUTO:
        if not usable:
            raise BackendError(
                f"no installed backend can run {bundle.source} (it carries {', '.join(bundle.formats)}; "
                f"installed: {', '.join(installed_backends()) or 'none'})",
                hint="pip install 'edgetailor[device]' (onnxruntime-training), or re-export the bundle with "
                     "--formats onnx")
        requested = usable[0]
    info = BACKENDS[requested]
    if runtime_version(requested) is None:
        get_backend(requested)  # raises the not-installed error
    bundle.require_format(info.format, backends_by_format())
    ge_backend = get_backend(requested)
    if info.trains:
        return ge_backend, ge_backend
    trainers = [n for n in usable if BACKENDS[n].trains]
    if not trainers:
        raise BackendError(f"backend {requested!r} runs GE only, and no installed backend can train LE and GN "
                           f"from {bundle.source} (it carries {', '.join(bundle.formats)})",
                           hint="pip install 'edgetailor[device]' (onnxruntime-training)")
    return ge_backend, get_backend(trainers[0])
