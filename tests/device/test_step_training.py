"""Training with step programs on the device: short batches are padded with
rows of weight 0 and train exactly as torch on the real rows; a batch larger
than the program takes is refused; cost grows linearly with the samples."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetailor.device.backends import get_backend
from edgetailor.device.mixture import augmented_copies
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.config import PersonalizeConfig
from edgetailor.toolkit.errors import PersonalizationError
from edgetailor.export.bundle import bundle_parts


@pytest.mark.parametrize("backend", ["ort", "litert", "executorch"])
def test_a_short_batch_trains_as_torch_on_its_rows(bundle_dir, backend):
    with Bundle.open(bundle_dir) as bundle:
        part = bundle_parts(bundle)["local_expert"]
        trainer = get_backend(backend).trainer(bundle, "local_expert")
    trainer.set_learning_rate(part.learning_rate)
    reference = copy.deepcopy(part.module)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=part.learning_rate, eps=1e-6, weight_decay=0.0)
    for step in range(5):
        (features, base), labels = part.example(7 + step, seed=step)  # fewer rows than the program's batch
        loss = trainer.step(features.numpy(), base.numpy(), labels.numpy())
        want = F.cross_entropy(reference(features, base), labels)
        optimizer.zero_grad()
        want.backward()
        optimizer.step()
        assert abs(loss - want.item()) < 1e-5
    got = trainer.weights()
    for name, parameter in reference.named_parameters():
        assert np.abs(got[name] - parameter.detach().numpy()).max() < 1e-5, name


def test_a_batch_larger_than_the_program_is_refused(bundle_dir):
    with Bundle.open(bundle_dir) as bundle:
        part = bundle_parts(bundle)["gating_network"]
        trainer = get_backend("ort").trainer(bundle, "gating_network")
    (features,), labels = part.example(part.max_batch + 1)
    with pytest.raises(PersonalizationError, match="more than this bundle's gating network step program takes"):
        trainer.step(features.numpy(), labels.numpy())


def test_augmentation_stops_as_the_sample_set_grows():
    cfg = PersonalizeConfig()
    assert augmented_copies(cfg, 100) == cfg.augment_copies
    assert augmented_copies(cfg, 10_000) == 1 and augmented_copies(cfg, 20_000) == 0


def test_a_runtime_too_old_for_the_programs_says_so(bundle_dir, user, tmp_path):
    """A bundle from a newer exporter: its step program's ONNX IR version is beyond this onnxruntime."""
    import shutil

    import onnx

    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.bundle import write_manifest
    from edgetailor.toolkit.errors import BackendError

    copy = shutil.copytree(bundle_dir, tmp_path / "b")
    model = onnx.load(str(copy / "le/step.onnx"))
    model.ir_version = 99
    (copy / "le/step.onnx").write_bytes(model.SerializeToString())
    with Bundle.open(copy) as opened:
        write_manifest(copy, opened.manifest)
    with DeviceRuntime.open(copy, tmp_path / "s", "ort") as rt:
        rt.add_dataset(user.train)
        with pytest.raises(BackendError, match="onnxruntime could not load le/step.onnx") as info:
            rt.personalize()
    assert "too old for this bundle" in str(info.value) and "pip install -U" in str(info.value)


def test_a_short_time_budget_cuts_le_but_never_gn(bundle_dir, user, tmp_path):
    from edgetailor.device import DeviceRuntime

    with DeviceRuntime.open(bundle_dir, tmp_path / "s", "ort") as rt:
        rt.add_dataset(user.train)
        report = rt.personalize({"max_seconds": 0.05, "le_epochs": 10_000})
    assert report["stopped_early"] and 0 < report["le_steps"] < 10_000
    assert report["gn_steps"] == report["config"]["gn_steps"]
