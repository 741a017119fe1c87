"""The firmware's C sources (libedgetailor, the example, the Cortex-M4 port), shipped as package data so that
``edgetailor export firmware`` can copy them from an installed wheel. No Python code ships from here:
scripts/parity.py is a development tool for the tests and the benchmark."""
