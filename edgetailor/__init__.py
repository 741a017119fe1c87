"""edgetailor: personalise a model on the user's own device.

One namespace, in layers that point one way (docs/ARCHITECTURE.md):

- ``edgetailor.toolkit``: the shared ground (numpy only): data, bundle format,
  format registry, typed recipes, errors.
- ``edgetailor.device``: the on-device runtime (numpy and a runtime, no torch).
- ``edgetailor.server_side``: the build server (torch): GE training,
  compression, learngene.
- ``edgetailor.export``: trained models -> device bundles.
- ``edgetailor.app``: the top, where the sides meet: CLI, demo, workflows.

Importing this package imports nothing heavy: ``from edgetailor.device import
DeviceRuntime`` is all a device needs.
"""

from edgetailor.toolkit import __version__

__all__ = ["__version__"]
