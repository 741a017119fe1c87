"""What the benchmarks share: a default GE, pretrained once and reused.

A cached GE is reused only if it was trained on the generic data as the
toolkit prepares it today (the data's sha256 in its model.json): a change to
the preprocessing changes every sample, and a stale GE would measure the old
pipeline's features with the new inputs.
"""

from __future__ import annotations

import json
from pathlib import Path


def default_ge(out: Path, model: Path | None = None) -> Path:
    """``model`` if given, else ``out/ge``: pretrained with the default recipe unless a current one is there."""
    if model is not None:
        return model
    from edgetailor.server_side.pretrain import pretrain
    from edgetailor.toolkit.config import load_recipe
    from edgetailor.toolkit.data import load_generic_digits

    model = out / "ge"
    generic = load_generic_digits()
    meta = model / "model.json"
    if meta.exists() and json.loads(meta.read_text()).get("data", {}).get("sha256") == generic.fingerprint():
        return model
    print("pretraining the default GE ...", flush=True)
    pretrain(model, load_recipe("default"), generic, overwrite=True)
    return model
