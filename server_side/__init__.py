"""Server side (the build server): the model families, GE training on generic
data (``pretrain``, with the one training loop in ``training``), checkpoints
that export turns into device bundles, compression stages (``compress``), the
learngene (``learngene``), and the fine-tuning baselines the demo compares
against. Needs torch; knows nothing of export, the device or the CLI.
"""
