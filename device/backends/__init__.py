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

import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
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
    # a path inside the first module's package that only this runtime's
    # distribution has (onnxruntime-training and onnxruntime install the same module)
    marker: str = ""

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
                marker="training/api"),
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


@lru_cache(maxsize=None)
def is_installed(name: str) -> bool:
    """Whether backend ``name``'s runtime is installed, found without importing
    it or reading package metadata (both would cost a device command tens of ms)."""
    info = BACKENDS[name]
    if not all(_importable(m) for m in info.needs) or not any(_importable(m) for m in info.modules):
        return False
    if info.marker:
        spec = importlib.util.find_spec(info.modules[0])
        roots = list(spec.submodule_search_locations or []) if spec else []
        return any(os.path.exists(os.path.join(root, info.marker)) for root in roots)
    return True


def runtime_version(name: str) -> str | None:
    """The installed runtime's version (from its package metadata), or None when it is not installed."""
    import importlib.metadata  # only here: it costs a device command's start ~30 ms

    if not is_installed(name):
        return None
    for distribution in BACKENDS[name].distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def installed_backends() -> list[str]:
    return [name for name in PREFERENCE if is_installed(name)]


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
    if not is_installed(name):
        others = [b for b in installed_backends() if b != name]
        if not any(_importable(m) for m in info.modules):
            missing = f"no module {' or '.join(info.modules)}"
        elif not all(_importable(m) for m in info.needs):
            missing = f"no module {' '.join(info.needs)}"
        else:
            missing = f"the installed {info.modules[0]} is not {info.distributions[0]}"
        where = " in a venv of its own, without onnxruntime" if info.marker else ""
        raise BackendError(f"backend {name!r} is not installed ({missing})",
                           hint=f"pip install '{info.requirement}'{where}; installed backends: "
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
    if requested == AUTO:
        # The first installed backend, in order of preference, that runs GE and
        # trains from this bundle; looked up lazily, in that order.
        carried = [n for n in PREFERENCE if BACKENDS[n].format in bundle.usable_formats]
        requested = next((n for n in carried if can_train(bundle, n) and is_installed(n)), None) or \
            next((n for n in carried if is_installed(n)), None)
        if requested is None:
            raise BackendError(
                f"no installed backend can run {bundle.source} (it carries {', '.join(bundle.formats)}; "
                f"installed: {', '.join(installed_backends()) or 'none'})",
                hint="pip install 'edgetailor[device]' (onnxruntime), or re-export the bundle with --formats onnx")
    info = BACKENDS[requested]
    if not is_installed(requested):
        get_backend(requested)  # raises the not-installed error
    if info.format not in bundle.usable_formats:
        bundle.require_format(info.format, backends_by_format())  # raises, naming the backends that would work
    ge_backend = get_backend(requested)
    if can_train(bundle, requested):
        return BackendChoice(ge_backend, ge_backend)
    trainers = [n for n in usable_backends(bundle) if can_train(bundle, n)]
    if trainers:
        return BackendChoice(ge_backend, get_backend(trainers[0]))
    return BackendChoice(ge_backend, None, _why_not_trainable(bundle))
