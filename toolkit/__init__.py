"""edgetailor's shared core: what the server, the exporter and the device all
need — labelled image data and its loaders, the user simulator, the model
definitions, the device-bundle format, typed configuration and the CLI.

Modules that need torch (``server_side.models``) are imported only by the server
and export sides; everything the device imports runs on numpy alone.
"""

__version__ = "0.1.0"
