"""Learngene: train one compact core from a teacher GE, then expand it into
vision transformers of any depth, one per device class (``train`` ->
``expand``), and compare the family against training each depth from scratch
(``compare``). Server side only; the expanded models are GE checkpoints that
``server compress`` and ``export bundle`` take like any other."""
