import json

import pytest
import torch

from edgetailor.server_side.checkpoint import GECheckpoint
from edgetailor.server_side.finetune import finetune
from edgetailor.toolkit.errors import CheckpointError


def test_checkpoint_records_how_it_was_made(ge_dir):
    meta = json.loads((ge_dir / "model.json").read_text())
    assert meta["arch"] == "lenet5"
    assert len(meta["data"]["sha256"]) == 64 and meta["seed"] == 0
    assert meta["generic_accuracy"] > 0.95
    assert meta["recipe"]["pretrain"]["epochs"] == 150
    ckpt = GECheckpoint.load(ge_dir)
    assert len(ckpt.replay) > 0 and ckpt.labels == [str(d) for d in range(10)]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a GE checkpoint"):
        GECheckpoint.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        GECheckpoint.load(tmp_path)


def test_finetune_baselines_leave_ge_untouched(ge_dir, user):
    ckpt = GECheckpoint.load(ge_dir)
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    x, y = ckpt.normalize(user.train.images), torch.as_tensor(user.train.labels)
    last = finetune(ckpt.model, x, y, "last", epochs=20)
    full = finetune(ckpt.model, x, y, "all", epochs=5)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [k for k, v in last.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("fc3") for k in changed)
    assert not torch.equal(full.conv1.weight, before["conv1.weight"])


def test_checkpoint_metadata_is_typed_and_reads_older_files(ge_dir, tmp_path):
    import shutil

    from edgetailor.server_side.checkpoint import CheckpointMeta

    ckpt = GECheckpoint.load(ge_dir)
    assert isinstance(ckpt.meta, CheckpointMeta) and ckpt.meta.arch == "lenet5" and not ckpt.meta.quantized
    assert CheckpointMeta.from_dict(ckpt.meta.to_dict()) == ckpt.meta
    # model.json as edgetailor 0.1 wrote it: no format_version, and a key this version does not know
    old = shutil.copytree(ge_dir, tmp_path / "old")
    data = json.loads((old / "model.json").read_text())
    data.pop("format_version")
    data["written_by_a_later_minor"] = True
    (old / "model.json").write_text(json.dumps(data))
    assert GECheckpoint.load(old).meta == ckpt.meta
    data["format_version"] = 99
    (old / "model.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format 99") as info:
        GECheckpoint.load(old)
    assert "hint:" in str(info.value)
    for bad in ({"format_version": "one"}, {"input": "28x28"}):
        (old / "model.json").write_text(json.dumps({**data, "format_version": 1, **bad}))
        with pytest.raises(CheckpointError):
            GECheckpoint.load(old)


def test_handwriting_augment_is_seeded_and_keeps_the_paper():
    """Same generator, same hands; nothing but the knobs moves the ink; the
    background stays the background (the normalised minimum)."""
    import dataclasses

    from edgetailor.server_side.training import handwriting_augment
    from edgetailor.toolkit.config import PretrainConfig
    from edgetailor.toolkit.data import load_generic_digits

    images = torch.from_numpy(load_generic_digits().images[:16].astype("float32") / 255.0)[:, None] * 3 - 0.5
    cfg = PretrainConfig()
    one = handwriting_augment(images, cfg, torch.Generator().manual_seed(3))
    two = handwriting_augment(images, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(one, two) and one.shape == images.shape
    assert float(one.amin()) >= float(images.amin()) - 1e-6
    assert not torch.allclose(one, images, atol=0.1)
    still = dataclasses.replace(cfg, augment_rotation_deg=0, augment_scale=0, augment_shift=0, augment_shear=0,
                                augment_aspect=0, augment_thickness=0, augment_elastic=0)
    assert torch.allclose(handwriting_augment(images, still, torch.Generator().manual_seed(3)), images, atol=1e-5)
