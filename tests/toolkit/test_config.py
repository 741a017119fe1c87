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
