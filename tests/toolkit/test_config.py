import pytest

from edgetailor.toolkit.config import Recipe, load_recipe, shipped_recipes
from edgetailor.toolkit.errors import ConfigError


def test_shipped_recipes_load():
    assert {"default", "fast"} <= set(shipped_recipes())
    for name in shipped_recipes():
        assert isinstance(load_recipe(name), Recipe)
    assert load_recipe("fast").pretrain.epochs < load_recipe("default").pretrain.epochs


def test_unknown_key_and_bad_values_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="(?s)epochz.*known keys"):
        load_recipe(bad)
    bad.write_text("[pretrain]\nepochs = 'ten'\n")
    with pytest.raises(ConfigError, match="pretrain.epochs must be int"):
        load_recipe(bad)
    bad.write_text("[experts]\ngate_threshold = 1.5\n")
    with pytest.raises(ConfigError, match="gate_threshold"):
        load_recipe(bad)
    bad.write_text("[pretrain\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="no recipe"):
        load_recipe("no-such-recipe")


def test_le_design_and_augmentation_values_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in [("[experts]\nle_design = 'mlp'\n", "le_design must be one of channel_mix, lowrank"),
                          ("[experts]\nle_width = 0\n", "le_width must be >= 1"),
                          ("[pretrain]\naugment_thickness = 1.5\n", "augment_thickness is a probability"),
                          ("[pretrain]\naugment_shear = nan\n", "augment_shear must be a number in")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_recipe(bad)


def test_recipe_le_designs_are_the_ones_export_builds():
    from edgetailor.server_side.experts import LE_DESIGNS
    from edgetailor.toolkit.config import LE_DESIGN_NAMES

    assert set(LE_DESIGN_NAMES) == set(LE_DESIGNS)


def test_channel_mix_needs_a_spatial_feature():
    from edgetailor.server_side.models import build_model
    from edgetailor.toolkit.config import ExpertConfig

    lenet = build_model("lenet5", 10)
    assert ExpertConfig().resolve_taps(lenet).le_design_on(lenet) == "channel_mix"   # conv: 16 maps of 5x5
    assert ExpertConfig(le_feature_tap="fc1").resolve_taps(lenet).le_design_on(lenet) == "lowrank"
    with pytest.raises(ConfigError, match="needs a spatial feature.*'fc2' is a vector") as info:
        ExpertConfig(le_feature_tap="fc2", le_design="channel_mix").resolve_taps(lenet)
    assert "conv" in info.value.hint


@pytest.mark.parametrize("text, message", [
    ("[personalize]\nmax_seconds = nan\n", r"personalize.max_seconds must be a finite number > 0, got nan"),
    ("[personalize]\nmax_seconds = inf\n", r"personalize.max_seconds must be a finite number > 0, got inf"),
    ("[personalize]\nle_learning_rate = 1e9\n", r"personalize.le_learning_rate must be a learning rate in \(0, 1\]"),
    ("[personalize]\ngn_learning_rate = nan\n", r"personalize.gn_learning_rate must be a finite number"),
    ("[personalize]\nreplay_weight = nan\n", r"replay_weight must be finite"),
    ("[pretrain]\nlearning_rate = 2.0\n", r"pretrain.learning_rate must be a learning rate in \(0, 1\], got 2.0"),
    ("[experts]\nreplay_size = 0\n", r"experts.replay_size must be a finite number > 0, got 0"),
])
def test_non_finite_and_absurd_numbers_are_refused(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(bad)


def test_personalize_overrides_are_validated_too():
    from edgetailor.toolkit.config import PersonalizeConfig

    with pytest.raises(ConfigError, match="max_seconds"):
        PersonalizeConfig(max_seconds=float("nan")).validate()
    PersonalizeConfig(le_learning_rate=1.0).validate()
