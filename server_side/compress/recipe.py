"""Compression recipes: an ordered list of stages and the formats to export to.

A recipe is a TOML file (or the name of a shipped one in ``recipes/``)::

    description = "50 % structured channel pruning, distilled, then int8"
    [[stage]]
    kind = "prune_structured"
    ratio = 0.5
    [stage.recovery]
    epochs = 30
    distill = true
    [[stage]]
    kind = "quantize"
    [export]
    formats = ["onnx", "executorch"]

Every stage kind has a typed dataclass registered in ``STAGE_CONFIGS``;
unknown kinds, unknown keys and bad values are errors before any work starts.
"""

from __future__ import annotations

import dataclasses
try:
    import tomllib
except ModuleNotFoundError:  # CPython 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetailor.toolkit.config import check_learning_rate, check_positive, from_dict, read_recipe_file
from edgetailor.toolkit.errors import ConfigError
from edgetailor.toolkit.formats import DEFAULT_FORMATS

RECIPES_DIR = Path(__file__).with_name("recipes")


@dataclass
class Recovery:
    """Fine-tuning after a stage, optionally distilled from the dense fp32 GE
    (the teacher): ``loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``."""

    epochs: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 64
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.7

    def validate(self, where: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"{where}.epochs must be >= 0, got {self.epochs}")
        for name in ("learning_rate", "batch_size", "temperature"):
            check_positive(getattr(self, name), f"{where}.{name}")
        check_learning_rate(self.learning_rate, f"{where}.learning_rate")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha must be in [0, 1], got {self.alpha}")


@dataclass
class PruneStructured:
    """Remove whole channels/neurons (and what depends on them) with Torch-Pruning."""

    kind = "prune_structured"
    ratio: float = 0.5            # share of channels removed from every prunable layer
    importance: str = "l2"        # l1 | l2 (group norm of the coupled weights)
    recovery: Recovery = field(default_factory=lambda: Recovery(epochs=30))

    def validate(self, where: str) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"{where}.ratio must be in (0, 1), got {self.ratio}")
        _choice(self.importance, ("l1", "l2"), f"{where}.importance")
        self.recovery.validate(f"{where}.recovery")


@dataclass
class PruneMagnitude:
    """Zero the smallest-magnitude weights (unstructured), then recover."""

    kind = "prune_magnitude"
    sparsity: float = 0.5
    scope: str = "global"         # global: one threshold over all layers; layer: the same share per layer
    recovery: Recovery = field(default_factory=lambda: Recovery(epochs=20))

    def validate(self, where: str) -> None:
        _sparsity(self.sparsity, where)
        _choice(self.scope, ("global", "layer"), f"{where}.scope")
        self.recovery.validate(f"{where}.recovery")


@dataclass
class LotteryTicket:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin; rewinding to
    an early iteration as in Frankle et al. 2019): train, prune, rewind the
    survivors to their weights after ``rewind_epochs``, retrain; repeat."""

    kind = "lottery_ticket"
    sparsity: float = 0.9
    rounds: int = 5
    rewind_epochs: int = 1
    epochs: int = 40              # training epochs per round, counted from initialization
    learning_rate: float = 2e-3
    batch_size: int = 64
    scope: str = "global"
    distill: bool = False         # the classic procedure trains on labels alone

    def validate(self, where: str) -> None:
        _sparsity(self.sparsity, where)
        _choice(self.scope, ("global", "layer"), f"{where}.scope")
        if self.rounds < 1:
            raise ConfigError(f"{where}.rounds must be >= 1, got {self.rounds}")
        if not 0 <= self.rewind_epochs < self.epochs:
            raise ConfigError(f"{where}.rewind_epochs must be in [0, epochs), got {self.rewind_epochs}")
        for name in ("learning_rate", "batch_size"):
            check_positive(getattr(self, name), f"{where}.{name}")
        check_learning_rate(self.learning_rate, f"{where}.learning_rate")


@dataclass
class PruneNM:
    """N:M semi-structured sparsity: in every M consecutive input weights keep the N largest."""

    kind = "prune_nm"
    n: int = 2
    m: int = 4
    recovery: Recovery = field(default_factory=lambda: Recovery(epochs=20))

    def validate(self, where: str) -> None:
        if not 0 < self.n < self.m:
            raise ConfigError(f"{where}: need 0 < n < m, got n={self.n}, m={self.m}")
        self.recovery.validate(f"{where}.recovery")


@dataclass
class Distill:
    """Knowledge distillation from the dense fp32 GE on its own; keeps any sparsity."""

    kind = "distill"
    recovery: Recovery = field(default_factory=lambda: Recovery(epochs=20, distill=True))

    def validate(self, where: str) -> None:
        self.recovery.validate(f"{where}.recovery")


@dataclass
class Quantize:
    """Post-training static quantization: weights per output channel,
    symmetric, at ``weight_bits``; activations per tensor at 8 bits from
    calibration. ``rounding`` is round-to-nearest or FlexRound's learned rounding."""

    kind = "quantize"
    weight_bits: int = 8
    rounding: str = "nearest"     # nearest | flexround
    granularity: str = "channel"  # weight grid: one scale per output channel, or one per tensor
    calibration_samples: int = 256
    flexround_iterations: int = 500
    flexround_learning_rate: float = 2e-3

    def validate(self, where: str) -> None:
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"{where}.weight_bits must be 4 or 8, got {self.weight_bits}")
        _choice(self.rounding, ("nearest", "flexround"), f"{where}.rounding")
        _choice(self.granularity, ("channel", "tensor"), f"{where}.granularity")
        if self.calibration_samples < 1 or self.flexround_iterations < 1 or self.flexround_learning_rate <= 0:
            raise ConfigError(f"{where}: calibration_samples, flexround_iterations and "
                              "flexround_learning_rate must be positive")


@dataclass
class QAT:
    """Quantization-aware training: fake-quantized weights (statistics-based
    per-channel scales, steadier than learned ones at low bits) and 8-bit
    activations in the forward pass, straight-through gradients."""

    kind = "qat"
    weight_bits: int = 8
    calibration_samples: int = 256
    recovery: Recovery = field(default_factory=lambda: Recovery(epochs=10, learning_rate=5e-4))

    def validate(self, where: str) -> None:
        if self.weight_bits not in (4, 8):
            raise ConfigError(f"{where}.weight_bits must be 4 or 8, got {self.weight_bits}")
        if self.calibration_samples < 1:
            raise ConfigError(f"{where}.calibration_samples must be >= 1")
        self.recovery.validate(f"{where}.recovery")


STAGE_CONFIGS: dict[str, type] = {cls.kind: cls for cls in (
    PruneStructured, PruneMagnitude, LotteryTicket, PruneNM, Distill, Quantize, QAT)}
QUANTIZING_STAGES = ("quantize", "qat")



@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["onnx", "executorch"])

    def validate(self) -> None:
        if not self.formats:
            raise ConfigError("export.formats is empty", hint=f"name one or more of: {', '.join(DEFAULT_FORMATS)}")
        for name in self.formats:
            _choice(name, DEFAULT_FORMATS, "export.formats")
        if "onnx" not in self.formats:
            raise ConfigError("export.formats must include \"onnx\": the device bundle carries GE as ONNX")


@dataclass
class CompressRecipe:
    stages: list[Any]
    export: ExportConfig = field(default_factory=ExportConfig)
    description: str = ""
    name: str = ""

    @property
    def quantized(self) -> Any | None:
        """The quantizing stage, if any (at most one, and it comes last)."""
        return next((s for s in self.stages if s.kind in QUANTIZING_STAGES), None)

    def validate(self) -> "CompressRecipe":
        if not self.stages:
            raise ConfigError("the recipe has no [[stage]]", hint=f"stage kinds: {', '.join(STAGE_CONFIGS)}")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stage[{i}] ({stage.kind})")
        quantizing = [i for i, s in enumerate(self.stages) if s.kind in QUANTIZING_STAGES]
        if len(quantizing) > 1:
            raise ConfigError("a recipe may quantize once (one quantize or qat stage)")
        if quantizing and quantizing[0] != len(self.stages) - 1:
            raise ConfigError("the quantize/qat stage must be the last stage",
                              hint="later stages would train the weights off the quantization grid")
        self.export.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "stage": [{"kind": s.kind, **dataclasses.asdict(s)} for s in self.stages],
                "export": dataclasses.asdict(self.export)}


def recipe_from_dict(data: dict[str, Any], name: str = "") -> CompressRecipe:
    known = {"description", "stage", "export"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)} in the compression recipe",
                          hint="known: description, [[stage]], [export]")
    stages = []
    raw_stages = data.get("stage", [])
    if not isinstance(raw_stages, list):
        raise ConfigError("stages are written as [[stage]] tables")
    for i, raw in enumerate(raw_stages):
        raw = dict(raw)
        kind = raw.pop("kind", None)
        if kind not in STAGE_CONFIGS:
            raise ConfigError(f"stage[{i}] has unknown kind {kind!r}",
                              hint=f"known stage kinds: {', '.join(STAGE_CONFIGS)}")
        stages.append(from_dict(STAGE_CONFIGS[kind], raw, f"stage[{i}]"))
    export = from_dict(ExportConfig, data.get("export", {}), "export")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description must be a string")
    return CompressRecipe(stages, export, description, name).validate()


def load_compress_recipe(name_or_path: str | Path) -> CompressRecipe:
    """A shipped recipe's name (``shipped_compress_recipes()``) or a TOML path."""
    path, data = read_recipe_file(name_or_path, RECIPES_DIR, "compression recipe")
    return recipe_from_dict(data, name=path.stem)


def shipped_compress_recipes() -> dict[str, str]:
    """name -> description of every shipped recipe."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        description = tomllib.loads(path.read_text()).get("description", "")
        out[path.stem] = description
    return out


def _choice(value: str, options: tuple[str, ...], where: str) -> None:
    if value not in options:
        raise ConfigError(f"{where} must be one of {', '.join(options)}; got {value!r}")


def _sparsity(value: float, where: str) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{where}.sparsity must be in (0, 1), got {value}")
