"""Bring your own model: user architectures unlike the built-in ones become
bundles that personalize alike on every backend, and what cannot be a GE is
refused, named, before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgetailor.export import bundle_from_model
from edgetailor.export.user_model import load_model_factory
from edgetailor.server_side.checkpoint import replay_subset
from edgetailor.toolkit.config import ExpertConfig
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import ModelError, SampleError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.loaders import save_npz
from examples.byom.architectures import DSCNN, ResNet, accuracy, train_classifier
from tests.conftest import run_cli

LABELS = [str(d) for d in range(10)]
SPEC = InputSpec.for_glyphs()


@pytest.fixture(scope="module")
def trained(generic_split):
    """A residual net with BatchNorm and a depthwise-separable net, trained by a user's own loop (~10 s)."""
    torch.set_num_threads(2)
    x = torch.from_numpy(SPEC.normalize(generic_split.train.images))
    y = torch.from_numpy(generic_split.train.labels)
    return {"resnet": train_classifier(ResNet(), x, y, epochs=8), "dscnn": train_classifier(DSCNN(width=32), x, y,
                                                                                            epochs=8)}


@pytest.fixture(scope="module")
def replay(generic_split) -> LabeledImages:
    return replay_subset(generic_split.train, 200, seed=0)


def example(replay: LabeledImages) -> torch.Tensor:
    return torch.from_numpy(SPEC.normalize(replay.images[:4]))


def test_a_user_model_personalizes_alike_on_every_backend(trained, replay, generic_split, user, tmp_path):
    from edgetailor.device import DeviceRuntime

    model = trained["dscnn"]
    out = bundle_from_model(model, example(replay), LABELS, replay, tmp_path / "dscnn",
                            generic_test=generic_split.test, formats=["onnx", "executorch", "tflite"],
                            make_zip=False)
    manifest = json.loads((out / "manifest.json").read_text())
    ge, le, gn = manifest["global_expert"], manifest["local_expert"], manifest["gating_network"]
    assert ge["arch"] == "user:DSCNN" and ge["output_order"] == ["logits", "classifier.3:input"]
    assert ge["generic_accuracy"] == pytest.approx(accuracy(model, torch.from_numpy(
        SPEC.normalize(generic_split.test.images)), torch.from_numpy(generic_split.test.labels)))
    assert (le["params"] + gn["params"]) / ge["params"] <= 0.025
    results = {}
    for backend in ("ort", "executorch", "litert"):
        with DeviceRuntime.open(out, tmp_path / f"state-{backend}", backend=backend) as runtime:
            before = runtime.evaluate_dataset(user.test)["accuracy"]
            runtime.add_dataset(user.train)
            runtime.personalize()
            results[backend] = (before, runtime.evaluate_dataset(user.test)["accuracy"],
                                runtime.evaluate_dataset(generic_split.test)["accuracy"])
    values = np.array(list(results.values()))
    assert np.ptp(values, axis=0).max() <= 0.005, results        # the backends agree within 0.5 points
    before, after, generic = values[0]
    assert after > before, results
    assert generic >= ge["generic_accuracy"] - 0.02, results


def test_a_channel_mix_le_on_a_residual_net_within_the_budget(trained, replay, user, tmp_path):
    """Automatic taps: the last spatial block for LE, as wide a channel mix as the budget allows."""
    from edgetailor.device import DeviceRuntime

    out = bundle_from_model(trained["resnet"], example(replay), LABELS, replay, tmp_path / "resnet",
                            formats=["onnx"], make_zip=False)
    manifest = json.loads((out / "manifest.json").read_text())
    le, gn, ge = manifest["local_expert"], manifest["gating_network"], manifest["global_expert"]
    assert (le["kind"], le["feature_tap"], le["channels"], gn["feature_tap"]) == (
        "residual_channel_mix", "pool", 32, "head:input")
    assert (le["params"] + gn["params"]) / ge["params"] <= 0.025
    with DeviceRuntime.open(out, tmp_path / "state") as runtime:
        before = runtime.evaluate_dataset(user.test)["accuracy"]
        runtime.add_dataset(user.train)
        runtime.personalize()
        assert runtime.evaluate_dataset(user.test)["accuracy"] > before


def test_named_taps_and_the_recipes_design_are_kept(trained, replay, tmp_path):
    experts = ExpertConfig(le_design="lowrank", le_rank=2)
    out = bundle_from_model(trained["resnet"], example(replay), LABELS, replay, tmp_path / "named",
                            taps=("head:input", "stage2"), experts=experts, formats=["onnx"], make_zip=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["local_expert"]["feature_tap"] == "head:input" and manifest["local_expert"]["rank"] == 2
    assert manifest["gating_network"]["feature_tap"] == "stage2"
    assert manifest["global_expert"]["outputs"]["features"] == {"head:input": 32, "stage2": 32 * 14 * 14}


@pytest.mark.parametrize("architecture, backends", [("RowGRU", ("ort", "litert")),
                                                    ("RowAttention", ("ort", "executorch", "litert"))])
def test_recurrent_and_attention_models_are_carried_by_every_format(architecture, backends, generic_split, replay,
                                                                     tmp_path):
    """GRU and attention export to ONNX, ExecuTorch and LiteRT alike (the firmware has no kernels for them).
    The GRU's ExecuTorch export takes a minute, so the suite leaves it to benchmarks/user_models.py."""
    formats = {"ort": "onnx", "executorch": "executorch", "litert": "tflite"}
    import examples.byom.architectures as architectures
    from edgetailor.device import DeviceRuntime

    x = torch.from_numpy(SPEC.normalize(generic_split.train.images))
    model = train_classifier(getattr(architectures, architecture)(), x, torch.from_numpy(generic_split.train.labels),
                             epochs=4, lr=1e-2)
    out = bundle_from_model(model, example(replay), LABELS, replay, tmp_path / "b", replay_size=100,
                            formats=[formats[b] for b in backends], make_zip=False)
    answers = {}
    for backend in backends:
        with DeviceRuntime.open(out, tmp_path / backend, backend=backend) as runtime:
            answers[backend] = runtime.predict_dataset(generic_split.test).indices
    assert all(np.array_equal(answers["ort"], answers[b]) for b in backends), answers


class Branchy(nn.Module):
    """Data-dependent control flow: one graph cannot hold it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x):
        return self.body(x)


class BranchOnValues(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x


class WithCummax(nn.Module):
    """A trained model behind an op the ONNX exporter has no translation for."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.0 * torch.cummax(x, 3)[0])


def test_what_cannot_be_one_graph_is_refused_naming_the_module_or_op(trained, replay, tmp_path):
    branchy = Branchy()
    branchy.body.insert(0, BranchOnValues())
    with pytest.raises(ModelError, match=r"submodule 'body.0' \(BranchOnValues\) branches or indexes on the values"):
        bundle_from_model(branchy, example(replay), LABELS, replay, tmp_path / "branchy", formats=["onnx"])
    with pytest.raises(ModelError, match=r"cannot be exported to onnx.*aten::cummax"):
        bundle_from_model(WithCummax(trained["dscnn"]), example(replay), LABELS, replay, tmp_path / "cummax",
                          formats=["onnx"])
    assert not list(tmp_path.iterdir())


def test_an_input_spec_that_does_not_match_the_model_is_refused(trained, replay, tmp_path):
    model = trained["dscnn"]
    with pytest.raises(ModelError, match=r"example input has shape \(4, 1, 32, 32\).*\(N, 1, 28, 28\)"):
        bundle_from_model(model, torch.zeros(4, 1, 32, 32), LABELS, replay, tmp_path / "b")
    with pytest.raises(ModelError, match="NaN"):
        bundle_from_model(model, torch.full((4, 1, 28, 28), float("nan")), LABELS, replay, tmp_path / "b")
    with pytest.raises(ModelError, match="input spec does not match how the model was trained"):
        bundle_from_model(model, example(replay), LABELS, replay, tmp_path / "b",
                          input_spec=InputSpec.for_glyphs(mean=4.0, std=0.05))
    with pytest.raises(ModelError, match=r"returns shape \(4, 10\).*\(4, 9\)"):
        bundle_from_model(model, example(replay), LABELS[:9], replay, tmp_path / "b")
    with pytest.raises(SampleError, match="no samples of '3'"):
        keep = replay.labels != 3
        bundle_from_model(model, example(replay), LABELS, replay.subset(np.flatnonzero(keep)), tmp_path / "b")
    with pytest.raises(SampleError, match="uint8"):
        floats = LabeledImages(replay.images.astype(np.float32) / 255, replay.labels)
        bundle_from_model(model, example(replay), LABELS, floats, tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_the_cli_exports_a_model_factory_and_names_bad_input(trained, replay, generic_split, tmp_path):
    weights = tmp_path / "resnet.pt"
    torch.save(trained["resnet"].state_dict(), weights)
    save_npz(replay, tmp_path / "replay.npz")
    common = ["export", "bundle", "--weights", str(weights), "--replay", str(tmp_path / "replay.npz"),
              "--formats", "onnx", "--no-zip"]
    proc = run_cli(*common, "--model-factory", "examples.byom.architectures:resnet", "--taps", "stage2,head:input",
                   "--out", str(tmp_path / "bundle"))
    assert "LE+GN" in proc.stdout
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["local_expert"]["feature_tap"] == "stage2"
    assert load_model_factory("examples.byom.architectures:resnet", weights).state_dict()["head.bias"].equal(
        trained["resnet"].head.bias)
    bad = run_cli(*common, "--model-factory", "examples.byom.architectures:resnet", "--taps", "stage3",
                  "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "no tap 'stage3'" in bad.stderr and "stage2 (ResidualBlock, 32x14x14)" in bad.stderr
    bad = run_cli(*common, "--model-factory", "examples.byom.architectures:dscnn", "--out", str(tmp_path / "bad"),
                  check=False)
    assert bad.returncode == 2 and "does not fit examples.byom.architectures:dscnn()" in bad.stderr
    bad = run_cli("export", "bundle", "--model-factory", "examples.byom.architectures:resnet", "--out",
                  str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "--model-factory needs --replay" in bad.stderr
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- time series

@pytest.fixture(scope="module")
def gestures():
    """Simulated wrist gestures (toolkit/gestures.py) and a 1-D CNN trained on them by a user's loop (~5 s)."""
    from edgetailor.toolkit.data import split_generic
    from edgetailor.toolkit.gestures import generic_gestures
    from examples.byom.architectures import GestureCNN

    split = split_generic(generic_gestures(people=40), seed=0)
    spec = InputSpec.for_timeseries(3, 64, float(split.train.images.mean()), float(split.train.images.std()))
    x = torch.from_numpy(spec.normalize(split.train.images))
    model = train_classifier(GestureCNN(), x, torch.from_numpy(split.train.labels), epochs=12)
    return split, spec, model, x[:4]


def test_a_time_series_model_personalizes_alike_on_every_backend(gestures, tmp_path):
    from edgetailor.device import DeviceRuntime
    from edgetailor.toolkit.gestures import simulate_gesture_user

    split, spec, model, example_batch = gestures
    out = bundle_from_model(model, example_batch, split.train.label_names, replay_subset(split.train, 120, 0),
                            tmp_path / "gestures", input_spec=spec, generic_test=split.test,
                            formats=["onnx", "executorch", "tflite"], make_zip=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 3 and manifest["input"]["modality"] == "timeseries"
    assert manifest["local_expert"]["feature_tap"] == "blocks" and manifest["local_expert"]["channels"] == 64
    user = simulate_gesture_user(3, seed=0)
    results = {}
    for backend in ("ort", "executorch", "litert"):
        with DeviceRuntime.open(out, tmp_path / f"state-{backend}", backend=backend) as runtime:
            before = runtime.evaluate(user.test.images, user.test.labels)["accuracy"]
            runtime.add_samples(user.train.images, user.train.labels)
            report = runtime.personalize()
            assert report["augment_copies"] > 0
            results[backend] = (before, runtime.evaluate_dataset(user.test)["accuracy"],
                                runtime.evaluate_dataset(split.test)["accuracy"])
    values = np.array(list(results.values()))
    assert np.ptp(values, axis=0).max() <= 0.005, results
    before, after, generic = values[0]
    assert before < 0.6 and after > before + 0.3 and generic >= manifest["global_expert"]["generic_accuracy"] - 0.02


def test_the_cli_takes_sensor_windows_end_to_end(gestures, tmp_path):
    from edgetailor.toolkit.gestures import GESTURES, simulate_gesture_user

    split, spec, model, _ = gestures
    torch.save(model.state_dict(), tmp_path / "gesture.pt")
    replay = replay_subset(split.train, 60, 0)
    np.savez(tmp_path / "replay.npz", x=replay.images, y=replay.labels, label_names=np.array(GESTURES))
    user = simulate_gesture_user(0, train_per_class=4, test_per_class=4)
    for i, (window, label) in enumerate(zip(user.train.images, user.train.labels)):
        (tmp_path / "mine" / GESTURES[label]).mkdir(parents=True, exist_ok=True)
        np.savetxt(tmp_path / "mine" / GESTURES[label] / f"{i}.csv", window.T, delimiter=",", header="ax,ay,az",
                   comments="")
    run_cli("export", "bundle", "--model-factory", "examples.byom.architectures:gesture_cnn", "--weights",
            str(tmp_path / "gesture.pt"), "--replay", str(tmp_path / "replay.npz"), "--input", "timeseries:3x64",
            "--input-mean", str(spec.mean), "--input-std", str(spec.std), "--formats", "onnx",
            "--out", str(tmp_path / "bundle"))
    proc = run_cli("device", "personalize", "--bundle", str(tmp_path / "bundle.zip"), "--state", str(tmp_path / "s"),
                   "--samples", str(tmp_path / "mine"), "--json")
    assert json.loads(proc.stdout)["n_samples"] == 24
    (tmp_path / "mine" / "tap" / "short.csv").write_text("1,2,3\n4,5,6\n")
    bad = run_cli("device", "personalize", "--bundle", str(tmp_path / "bundle.zip"), "--state", str(tmp_path / "s"),
                  "--samples", str(tmp_path / "mine"), check=False)
    assert bad.returncode == 2 and "short.csv: a window must be 3 channel(s) x 64 steps, got 2 rows x 3" in bad.stderr
    bad = run_cli("export", "firmware", "--bundle", str(tmp_path / "bundle.zip"), "--out", str(tmp_path / "fw"),
                  check=False)
    assert bad.returncode == 2 and "the firmware runs glyph bundles only" in bad.stderr
    bad = run_cli("export", "bundle", "--model-factory", "examples.byom.architectures:gesture_cnn", "--weights",
                  str(tmp_path / "gesture.pt"), "--replay", str(tmp_path / "replay.npz"), "--input",
                  "timeseries:3x50", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "window must be 3 channel(s) x 50 steps" in bad.stderr
