"""Device backends: the runtimes that run GE and train LE and GN, behind one
interface (``base.Backend``) and registered in ``BACKENDS`` below — adding a
runtime means adding one module and one line here.

Each backend imports its runtime lazily, inside its own module, so the device
package imports with numpy alone.
"""

from __future__ import annotations

from importlib import import_module

from device.backends.base import Backend
from toolkit.errors import EdgetailorError

# name -> (module, class, the pip requirement that provides the runtime)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "ort": ("device.backends.ort", "OrtBackend", "onnxruntime-training"),
}


def get_backend(name: str = "ort") -> Backend:
    if name not in BACKENDS:
        raise EdgetailorError(f"unknown backend {name!r}", hint=f"known backends: {', '.join(BACKENDS)}")
    module, cls, requirement = BACKENDS[name]
    try:
        return getattr(import_module(module), cls)()
    except ImportError as exc:
        raise EdgetailorError(f"backend {name!r} is not installed ({exc})",
                              hint=f"pip install '{requirement}' (or: pip install 'edgetailor[device]')") from None
