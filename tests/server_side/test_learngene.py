"""The learngene workflow on real data: the expansion rules are the papers'
equations, a trained learngene expands into GE checkpoints of any depth that
go through the bundle and the device loop, device profiles pick depths, and
bad input (depths, profiles, foreign or tampered learngenes) is refused with
what would fit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from edgetailor.server_side import training
from edgetailor.toolkit.errors import CheckpointError, ConfigError


def small_recipe(method: str = "tleg", epochs: int = 6):
    """A narrow learngene trained briefly: real training, test-sized."""
    from edgetailor.server_side.learngene.recipe import LearngeneConfig, LearngeneRecipe, TrainSchedule

    return LearngeneRecipe(
        learngene=LearngeneConfig(method=method, widths=[32, 64], aux_depth=4, stages=2, max_depth=6,
                                  epochs=epochs, batch_size=32, learning_rate=2e-3),
        expand=TrainSchedule(epochs=1, batch_size=32, learning_rate=5e-4),
        scratch=TrainSchedule(epochs=2, batch_size=32, learning_rate=2e-3), name="test").validate()


@pytest.fixture(scope="module")
def tleg_dir(ge_dir, tmp_path_factory):
    from edgetailor.server_side.learngene.train import train_learngene

    out = tmp_path_factory.mktemp("lg") / "tleg"
    train_learngene(ge_dir, small_recipe("tleg"), out)
    return out


@pytest.fixture(scope="module")
def sws_dir(ge_dir, tmp_path_factory):
    from edgetailor.server_side.learngene.train import train_learngene

    out = tmp_path_factory.mktemp("lg") / "sws"
    train_learngene(ge_dir, small_recipe("sws", epochs=2), out)
    return out


def test_tleg_layers_are_a_line_in_depth():
    from edgetailor.server_side.learngene.gene import Learngene

    learngene = Learngene(small_recipe("tleg").learngene, 10)
    model = learngene.expand(5)
    a, b = learngene.components["A"].qkv.weight, learngene.components["B"].qkv.weight
    for layer in range(5):  # layer l (1-based) = A + (l-1)/(L-1) B
        assert torch.allclose(model.blocks[layer].qkv.weight, a + layer / 4 * b)
    assert torch.allclose(learngene.expand(1).blocks[0].qkv.weight, a)
    # the shell (embedding, positions, head) is shared by every depth
    assert torch.equal(model.pos_embed, learngene.shell.pos_embed)
    assert torch.equal(model.classifier.weight, learngene.shell.classifier.weight)


def test_sws_repeats_each_stage_layer():
    from edgetailor.server_side.learngene.gene import Learngene

    learngene = Learngene(small_recipe("sws").learngene, 10)
    stages = [learngene.components[f"stage{s}"].fc1.weight for s in range(2)]
    model = learngene.expand(6)
    for layer, stage in enumerate([0, 0, 0, 1, 1, 1]):
        assert torch.equal(model.blocks[layer].fc1.weight, stages[stage])
    # one layer sits at relative depth 1/2: of two stages, the second one's layer
    assert [torch.equal(learngene.expand(1).blocks[0].fc1.weight, s) for s in stages] == [False, True]


@pytest.mark.parametrize("method", ["tleg", "sws"])
def test_auxiliary_model_is_the_expansion_at_its_depth(method):
    from edgetailor.server_side.learngene.gene import Learngene

    learngene = Learngene(small_recipe(method).learngene, 10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(learngene(x), learngene.expand(4)(x), atol=1e-5)


def test_trained_learngene_records_what_it_is(tleg_dir):
    from edgetailor.server_side.learngene import gene

    learngene, meta = gene.load(tleg_dir)
    assert meta.family == "vit" and meta.method == "tleg" and meta.components == ["A", "B"]
    per_block = sum(p.numel() for p in learngene.components["A"].parameters())
    shell = sum(p.numel() for p in learngene.shell.parameters())
    assert meta.stored_params == shell + 2 * per_block
    assert meta.teacher["arch"] == "lenet5" and meta.train_flops > 0
    # the accuracy recorded is the one the expansion at the auxiliary depth has
    generic, _ = gene.generic_data(meta)
    assert abs(training.test_accuracy(learngene.expand(4), generic) - meta.auxiliary["generic_accuracy"]) < 1e-6


def test_expand_makes_a_ge_that_goes_through_bundle_and_device(tleg_dir, tmp_path, user, generic_split):
    from edgetailor.device.runtime import DeviceRuntime
    from edgetailor.export.bundle import export_bundle
    from edgetailor.server_side.checkpoint import GECheckpoint

    out = tmp_path / "ge3"
    proc = run_cli("server", "learngene", "expand", "--learngene", str(tleg_dir), "--depth", "3",
                   "--out", str(out))
    assert "depth 3" in proc.stdout
    ckpt = GECheckpoint.load(out)
    assert ckpt.meta.arch == "vit" and ckpt.meta.depth == 3 and len(ckpt.model.blocks) == 3
    assert ckpt.meta.learngene["method"] == "tleg"
    assert ckpt.meta.recipe["experts"]["le_feature_tap"] == "patches"
    # ONNX only: the demo test below takes an expanded ViT through every format
    bundle = export_bundle(out, tmp_path / "bundle", formats=["onnx"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["global_expert"]["arch"] == "vit"
    with DeviceRuntime.open(bundle, tmp_path / "state") as runtime:
        runtime.add_dataset(user.train)
        runtime.personalize({"le_epochs": 20, "gn_steps": 40})
        result = runtime.evaluate_dataset(user.test)
    assert result["personalized"] and 0.0 <= result["accuracy"] <= 1.0


def test_profile_picks_the_deepest_model_that_fits(tleg_dir, tmp_path):
    from edgetailor.server_side.learngene import gene
    from edgetailor.app.learngene import check_profile, expand_for_device, footprint, pick_depth
    from edgetailor.server_side.learngene.recipe import DeviceProfile, TrainSchedule

    learngene, _ = gene.load(tleg_dir)
    rows = {d: footprint(learngene, d) for d in (2, 3)}
    assert rows[3]["flash_kb"] > rows[2]["flash_kb"] and rows[3]["macs"] > rows[2]["macs"]
    profile = DeviceProfile(name="tight", flash_kb=(rows[2]["flash_kb"] + rows[3]["flash_kb"]) / 2)
    depth, row = pick_depth(learngene, profile)
    assert depth == 2 and not check_profile(row, profile)
    ckpt = expand_for_device(tleg_dir, tmp_path / "ge", profile=profile, schedule=TrainSchedule(epochs=0))
    assert ckpt.meta.depth == 2 and ckpt.meta.learngene["device_profile"]["name"] == "tight"
    with pytest.raises(ConfigError, match="exceeds device profile 'tight'") as info:
        expand_for_device(tleg_dir, tmp_path / "ge5", depth=5, profile=profile)
    assert "deepest model that fits is depth 2" in str(info.value)
    with pytest.raises(ConfigError, match="no depth of this learngene fits"):
        pick_depth(learngene, DeviceProfile(name="tiny", ram_kb=1))
    assert not (tmp_path / "ge5").exists()


def test_shipped_profiles_load_and_order_depths(tleg_dir):
    from edgetailor.server_side.learngene import gene
    from edgetailor.app.learngene import pick_depth
    from edgetailor.server_side.learngene.recipe import load_profile, shipped_profiles

    learngene, _ = gene.load(tleg_dir)
    assert {"wearable", "budget-phone", "phone"} <= set(shipped_profiles())
    depths = [pick_depth(learngene, load_profile(p))[0] for p in ("wearable", "budget-phone", "phone")]
    assert depths == sorted(depths) and depths[-1] == learngene.cfg.max_depth


@pytest.mark.parametrize("depth", ["0", "7"])
def test_depth_outside_the_learngene_is_refused(tleg_dir, tmp_path, depth):
    proc = run_cli("server", "learngene", "expand", "--learngene", str(tleg_dir), "--depth", depth,
                   "--out", str(tmp_path / "ge"), check=False)
    assert proc.returncode == 2 and "1..6" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ge").exists()


def test_bad_profiles_are_refused(tmp_path):
    from edgetailor.server_side.learngene.recipe import load_profile

    bad = tmp_path / "p.toml"
    bad.write_text("[device]\nname = 'x'\nlatency_ms = 3\n")
    with pytest.raises(ConfigError, match="no macs_per_ms"):
        load_profile(bad)
    bad.write_text("[device]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="sets no budget"):
        load_profile(bad)
    bad.write_text("[device]\nflash_kb = 10\nvolts = 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile(bad)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_foreign_or_tampered_learngenes_are_refused(tleg_dir, ge_dir, tmp_path):
    from edgetailor.server_side.learngene import gene

    with pytest.raises(CheckpointError, match="is a GE checkpoint"):
        gene.load(ge_dir)
    for key, value, message in (("family", "resnet", "'resnet' model family; this toolkit expands 'vit'"),
                                ("toolkit_version", "9.4.0", "made by edgetailor 9.4.0"),
                                ("format_version", 99, "learngene format 99")):
        copy = _copy(tleg_dir, tmp_path / key)
        meta = json.loads((copy / "learngene.json").read_text())
        (copy / "learngene.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(CheckpointError, match=message):
            gene.load(copy)
    tampered = _copy(tleg_dir, tmp_path / "tampered")
    payload = bytearray((tampered / "learngene.pt").read_bytes())
    payload[-100] ^= 0xFF
    (tampered / "learngene.pt").write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        gene.load(tampered)


def test_compare_reports_every_depth_against_scratch(tleg_dir, sws_dir, tmp_path):
    from edgetailor.server_side.learngene.compare import compare_family

    report = compare_family([tleg_dir, sws_dir], [1, 3], tmp_path / "cmp", small_recipe())
    assert [r["depth"] for r in report["rows"]] == [1, 3]
    row = report["rows"][1]
    for key in ("scratch 1ep", "scratch 2ep", "tleg init", "tleg 1ep", "sws init", "sws 1ep"):
        assert 0.0 <= row[key] <= 1.0
    assert report["summary"]["scratch"]["stored_params"] == sum(r["params"] for r in report["rows"])
    assert report["summary"]["tleg"]["stored_vs_model_per_depth"] < 1.0
    for name in ("report.txt", "report.json", "report.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0


def test_pretrain_vit_from_the_cli(tmp_path):
    from edgetailor.server_side.checkpoint import GECheckpoint

    out = tmp_path / "vit"
    run_cli("server", "pretrain", "--arch", "vit", "--depth", "2", "--epochs", "1", "--out", str(out))
    ckpt = GECheckpoint.load(out)
    assert ckpt.meta.depth == 2 and len(ckpt.model.blocks) == 2
    assert (ckpt.meta.recipe["experts"]["le_feature_tap"], ckpt.meta.recipe["experts"]["gn_feature_tap"]) \
        == ("patches", "grid")


def test_vit_spatial_taps_are_channel_major_patch_tokens():
    """The channel-mix LE reads ``features[:, p::positions]`` as position p's
    channels: "patches" must hold token p's channel c at c * 49 + p, and
    "grid" the 3x3 pooled windows of the 7x7 token map."""
    import torch.nn.functional as F

    from edgetailor.server_side.models import ViT

    torch.manual_seed(0)
    model = ViT(depth=1).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        _, features = model.forward_with_features(x)
        tokens = model.norm(model.blocks[0](model.embed(x)))[:, 1:]               # (3, 49, 64)
    taps = {t.name: t for t in model.feature_taps}
    assert (taps["patches"].dim, taps["patches"].channels, taps["grid"].dim) == (64 * 49, 64, 64 * 9)
    assert torch.allclose(features["patches"][:, 5 * 49 + 17], tokens[:, 17, 5])
    window = tokens.transpose(1, 2).reshape(3, 64, 7, 7)[:, :, 2:5, 4:7].mean(dim=(2, 3))  # pooled row 1, col 2
    assert torch.allclose(features["grid"].reshape(3, 64, 9)[:, :, 1 * 3 + 2], window, atol=1e-6)
    assert torch.allclose(features["grid"], F.avg_pool2d(tokens.transpose(1, 2).reshape(3, 64, 7, 7), 3, 2)
                          .flatten(1), atol=1e-6)


def test_structured_pruning_of_a_transformer_is_refused_before_work(tleg_dir, tmp_path):
    from edgetailor.app.compress import compress
    from edgetailor.server_side.compress.recipe import recipe_from_dict
    from edgetailor.server_side.learngene.expand import expand_learngene
    from edgetailor.server_side.learngene.recipe import TrainSchedule

    expand_learngene(tleg_dir, tmp_path / "ge", depth=2, schedule=TrainSchedule(epochs=0))
    recipe = recipe_from_dict({"stage": [{"kind": "prune_structured", "ratio": 0.5}]}, name="t")
    with pytest.raises(ConfigError, match="does not support vit"):
        compress(tmp_path / "ge", recipe, tmp_path / "out", n_users=0)
    assert not (tmp_path / "out").exists()


def test_demo_runs_the_loop_with_an_expanded_ge(tleg_dir, tmp_path):
    """The user's loop with a learngene GE: bundle, a torch-free device process
    personalizing a simulated user, and the report against the baselines."""
    from edgetailor.server_side.learngene.expand import expand_learngene
    from edgetailor.app.demo import run_demo

    expand_learngene(tleg_dir, tmp_path / "ge", depth=2)
    report = run_demo(tmp_path / "demo", n_users=1, model_dir=tmp_path / "ge", echo=lambda _m: None)
    assert report["arch"] == "vit" and report["recipe"]["pretrain"]["depth"] == 2
    user = report["users"][0]
    assert not user["torch imported"] and 0.0 <= user["GE+LE+GN user"] <= 1.0
    assert (tmp_path / "demo" / "report.png").stat().st_size > 0
