"""Server side (the build server): train the Global Expert on generic data and
keep it as a checkpoint directory that export turns into device bundles.
Fine-tuning baselines the demo compares against live here too. Needs torch.
"""
