"""What the benchmarks share: a default GE, pretrained once and reused.

A cached GE is reused only if it was trained on the generic data as the
toolkit prepares it today (the data's sha256 in its model.json) and with
today's default recipe: a change to the preprocessing changes every sample,
a change to the recipe (say, its augmentation) changes the GE, and a stale GE
would measure the old pipeline.
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
    recipe = load_recipe("default")
    meta = model / "model.json"
    if meta.exists():
        cached = json.loads(meta.read_text())
        if (cached.get("data", {}).get("sha256") == generic.fingerprint()
                and cached.get("recipe") == recipe.to_dict()):
            return model
    print("pretraining the default GE ...", flush=True)
    pretrain(model, recipe, generic, overwrite=True)
    return model
