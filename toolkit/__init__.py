"""edgetailor's shared ground, the bottom layer: what the server, export and
the device all need, on numpy alone. Labelled image data and its loaders, the
user simulator, the format registry, the device bundle and its typed
manifest, its signatures, the limits every input is checked against, the
input normalisation, typed recipes, tables and the errors.

Nothing here imports torch or any other layer (tests/test_architecture.py
checks it), so the device installs and runs with numpy and one runtime.
"""

__version__ = "0.1.0"
