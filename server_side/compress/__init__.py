"""Server-side compression of the Global Expert: structured, unstructured,
N:M and lottery-ticket pruning, distillation, and post-training (round-to-
nearest or FlexRound) and quantization-aware int8/int4 quantization.

A TOML recipe (``recipe.py``) lists stages (``stages.py``), which
``pipeline.run_stages`` runs on a GE checkpoint. ``edgetailor.app.compress``
turns the result into a GE checkpoint again, exported to ONNX / ExecuTorch /
TFLite (``export.formats``) and measured against the fp32 GE
(``edgetailor.app.compress_report``). Needs torch.
"""
