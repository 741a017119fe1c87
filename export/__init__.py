"""Export: turn a GE checkpoint into a device bundle (``bundle.export_bundle``):
GE in every chosen format (``formats``: one exporter per format in the
registry), LE and GN as training programs for each runtime that trains
(``trainable``), and a manifest listing every file with its sha256. Every
program is checked against its torch source before anything is written.
``firmware`` turns a bundle into a C project for microcontrollers (GE's
layers, LE's and GN's initial weights, the replay glyphs as const data), and
``firmware_samples`` writes samples in the firmware's file format.
Sits above the server side (it reads checkpoints and models); needs torch.
"""
