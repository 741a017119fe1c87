"""Device backends: the runtimes that run GE and train LE and GN, behind one
interface (``base.Backend``) and registered in ``BACKENDS`` below: adding a
runtime means adding one module and one entry here.

The runtimes an app embeds train with the bundle's step programs, plain
inference programs (``steps``), so they need only their inference package:

- ``ort``: ONNX Runtime (the maintained ``onnxruntime``; no torch).
- ``litert``: LiteRT (ai-edge-litert, or its predecessor tflite-runtime).
- ``executorch``: ExecuTorch, GE lowered to XNNPACK. Its Python bindings
  load libtorch, so in Python it needs torch installed; an app's C++ runtime
  does not.

For parity checks and old bundles, the runtimes' own training packages:
``ort-training`` (onnxruntime-training, deprecated; never in the same venv as
``onnxruntime``) and ``executorch-training`` (the experimental training
extension). And ``torch``, the reference: only when torch is installed and
the bundle was exported with the ``torch`` format.

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
from edgetailor.toolkit.formats import STEPS
from edgetailor.toolkit.manifest import PARTS


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    cls: str
    format: str                  # the bundle format whose GE it runs (a name in toolkit.formats.FORMATS)
    training: str                # the training kind it trains LE and GN with (a key of that format's training_kinds)
    modules: tuple[str, ...]     # importable modules that provide the runtime (any one)
    distributions: tuple[str, ...]  # pip distributions that provide them; the first installed gives the version
    requirement: str             # what to pip install
    description: str
    needs: tuple[str, ...] = ()  # modules its Python bindings also load
    exact_distribution: bool = False  # only ``distributions`` will do (another package provides the same module)

    @property
    def trains(self) -> bool:
        return bool(self.training)


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("ort", "edgetailor.device.backends.ort", "OrtBackend", "onnx", STEPS, ("onnxruntime",),
                ("onnxruntime", "onnxruntime-training", "onnxruntime-gpu", "onnxruntime-directml"), "onnxruntime",
                "ONNX Runtime: GE, and LE/GN trained by step programs"),
    BackendInfo("litert", "edgetailor.device.backends.litert", "LiteRTBackend", "tflite", STEPS,
                ("ai_edge_litert", "tflite_runtime"), ("ai-edge-litert", "tflite-runtime"), "ai-edge-litert",
                "LiteRT: GE, and LE/GN trained by step programs (builtin ops)"),
    BackendInfo("executorch", "edgetailor.device.backends.executorch", "ExecuTorchBackend", "executorch", STEPS,
                ("executorch",), ("executorch",), "executorch",
                "ExecuTorch: GE on XNNPACK, LE/GN trained by step programs (portable ops)", needs=("torch",)),
    BackendInfo("ort-training", "edgetailor.device.backends.ort_training", "OrtTrainingBackend", "onnx",
                "ort-training", ("onnxruntime",), ("onnxruntime-training",),
                "onnxruntime-training>=1.19,<1.20",
                "onnxruntime-training's training API (deprecated; parity, old bundles; a venv without onnxruntime)",
                exact_distribution=True),
    BackendInfo("executorch-training", "edgetailor.device.backends.executorch_training", "ExecuTorchTrainingBackend",
                "executorch", "executorch-training", ("executorch",), ("executorch",), "executorch",
                "ExecuTorch's training extension (experimental; parity)", needs=("torch",)),
    BackendInfo("torch", "edgetailor.device.backends.torch_reference", "TorchBackend", "torch", "autograd", ("torch",),
                ("torch",), "torch", "torch reference: torch.export programs, autograd"),
)}

# The order `auto` tries: fastest personalization and smallest memory first
# (measured by benchmarks/backends.py), the parity backends and the reference last.
PREFERENCE = ("ort", "litert", "executorch", "ort-training", "executorch-training", "torch")
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
    if not any(_importable(m) for m in info.modules):
        return None
    for distribution in info.distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None if info.exact_distribution else "installed"


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


def can_train(bundle: Bundle, name: str) -> bool:
    """Whether backend ``name`` finds its training programs, intact, in this bundle."""
    info = BACKENDS[name]
    return info.format in bundle.usable_formats and all(
        bundle.manifest.part(p).training_files(info.format, info.training) is not None for p in PARTS)


def usable_backends(bundle: Bundle) -> list[str]:
    """Installed backends whose format this bundle carries intact, best first."""
    return [n for n in installed_backends() if BACKENDS[n].format in bundle.usable_formats]


@dataclass
class BackendChoice:
    ge: Backend                  # runs GE
    trainer: Backend | None      # trains and runs LE and GN; None when nothing installed can
    why_not_trainable: str = ""  # then: why, and what would work


def _why_not_trainable(bundle: Bundle) -> str:
    carried = sorted({f"{fmt} {kind}" for p in PARTS for fmt in bundle.manifest.part(p).training
                      for kind in bundle.manifest.part(p).training_kinds(fmt)})
    would = [n for n, info in BACKENDS.items() if info.format in bundle.usable_formats and
             all(bundle.manifest.part(p).training_files(info.format, info.training) for p in PARTS)]
    has_steps = any(STEPS in bundle.manifest.part(p).training_kinds(fmt) for p in PARTS
                    for fmt in bundle.manifest.part(p).training)
    if not has_steps:
        return (f"{bundle.source} has no step programs (it carries {', '.join(carried) or 'no training programs'}; "
                f"exported by edgetailor {bundle.manifest.toolkit_version}). Re-export it with this edgetailor "
                f"(`edgetailor export bundle --model GE_DIR --out BUNDLE`) to train on any backend"
                + "".join(f", or train it with the {n} backend (pip install '{BACKENDS[n].requirement}'"
                          + (", in a venv without onnxruntime)" if n == "ort-training" else ")") for n in would))
    return (f"no installed backend can train from {bundle.source} (it carries {', '.join(carried)}; installed: "
            f"{', '.join(installed_backends()) or 'none'}); pip install one of: "
            + ", ".join(f"'{BACKENDS[n].requirement}'" for n in would))


def choose_backends(bundle: Bundle, requested: str | None = None) -> BackendChoice:
    """The backend that runs GE and the one that trains LE and GN.

    ``requested`` None or "auto": the best installed backend the bundle
    supports, preferring one that can also train from it. A named backend
    must be installed and find its format in the bundle; it trains too if the
    bundle carries its training programs, otherwise the best installed
    backend that can does (an old bundle: ORT artifacts but no step programs)."""
    requested = requested or AUTO
    if requested != AUTO and requested not in BACKENDS:
        raise _unknown(requested)
    usable = usable_backends(bundle)
    if requested == AUTO:
        if not usable:
            raise BackendError(
                f"no installed backend can run {bundle.source} (it carries {', '.join(bundle.formats)}; "
                f"installed: {', '.join(installed_backends()) or 'none'})",
                hint="pip install 'edgetailor[device]' (onnxruntime), or re-export the bundle with --formats onnx")
        requested = next((n for n in usable if can_train(bundle, n)), usable[0])
    info = BACKENDS[requested]
    if runtime_version(requested) is None:
        get_backend(requested)  # raises the not-installed error
    bundle.require_format(info.format, backends_by_format())
    ge_backend = get_backend(requested)
    if can_train(bundle, requested):
        return BackendChoice(ge_backend, ge_backend)
    trainers = [n for n in usable if can_train(bundle, n)]
    if trainers:
        return BackendChoice(ge_backend, get_backend(trainers[0]))
    return BackendChoice(ge_backend, None, _why_not_trainable(bundle))
