"""Export: turn a GE checkpoint into a device bundle (``bundle.export_bundle``):
GE in every chosen format (``formats``: one exporter per format in the
registry), LE and GN as training programs for each runtime that trains
(``trainable``), and a manifest listing every file with its sha256. Every
program is checked against its torch source before anything is written.
Sits above the server side (it reads checkpoints and models); needs torch.
"""
