"""Tests of firmware_examples/: the C library and example against the Python device runtime."""
