"""The learngene: a few transformer layers' worth of parameters from which a
vision transformer of any depth is generated.

A learngene is a *shell* (patch embedding, class token, positions, final norm,
head: what every depth shares) plus a handful of *components*, each shaped
like one transformer block. An expansion rule says, for layer ``l`` of a
model of depth ``L``, which components to mix and with what weights:

* TLEG (Xia et al., "Transformer as Linear Expansion of Learngene"): two
  components θ_A, θ_B and layer ``l`` (1-based) = θ_A + (l−1)/(L−1)·θ_B, per
  parameter tensor.
* SWS (Xia et al., "Exploring Learngene via Stage-wise Weight Sharing"): one
  component per stage; a layer takes the component of the stage at its
  relative depth, so a deeper model repeats each stage's layer more times.

The same rule generates the auxiliary model the learngene is trained in (at
``aux_depth``) and the models it initialises (at any depth), so training and
expansion cannot drift apart. Written here rather than taken from the papers'
code because that code is built around DeiT on ImageNet and timm; the rules
are the papers' equations, applied to ``server_side.models.ViT``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from edgetailor.toolkit import __version__, atomic
from edgetailor.toolkit.config import PretrainConfig
from edgetailor.toolkit.errors import CheckpointError, ConfigError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.server_side.models import TransformerBlock, ViT
from edgetailor.server_side.learngene.recipe import LearngeneConfig
from edgetailor.server_side.learngene.rules import RULES
from edgetailor.server_side.environment import CPU, TrainingEnv
from edgetailor.server_side.training import GenericData, load_generic

FORMAT = "edgetailor-learngene"
# Bump when the file layout or an expansion rule changes meaning.
FORMAT_VERSION = 1
FAMILY = ViT.arch


class Learngene(nn.Module):
    """The learngene, trainable as the auxiliary model (``forward`` runs it at
    ``aux_depth``) and expandable to a ``ViT`` of any depth (``expand``)."""

    def __init__(self, cfg: LearngeneConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.rule = RULES[cfg.method]
        dim, mlp_dim = cfg.widths
        self.shell = ViT(num_classes, (dim, mlp_dim), depth=0)
        names = self.rule.components(cfg.stages)
        self.components = nn.ModuleDict({n: TransformerBlock(dim, ViT.heads, mlp_dim) for n in names})
        for block in self.components.values():
            block.apply(_init_block)
        if cfg.method == "tleg":
            # θ_B is a slope: its norms start flat so that every layer starts with
            # unit LayerNorm gains, while its random matrices tell the layers apart.
            for norm in (self.components["B"].norm1, self.components["B"].norm2):
                nn.init.zeros_(norm.weight)

    @property
    def num_classes(self) -> int:
        return self.shell.num_classes

    def layer_parameters(self, layer: int, depth: int) -> dict[str, torch.Tensor]:
        """Parameters of block ``layer`` (0-based) in a model of ``depth`` blocks."""
        names = list(self.components)
        mixed: dict[str, torch.Tensor] = {}
        for component, weight in self.rule.mix(layer, depth, names):
            for key, value in self.components[component].named_parameters():
                mixed[key] = mixed[key] + weight * value if key in mixed else weight * value
        return mixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary model: ``aux_depth`` generated layers between the shell's ends."""
        template = next(iter(self.components.values()))
        h = self.shell.embed(x)
        for layer in range(self.cfg.aux_depth):
            h = functional_call(template, self.layer_parameters(layer, self.cfg.aux_depth), (h,))
        return self.shell.readout(h)[0]

    @torch.no_grad()
    def expand(self, depth: int) -> ViT:
        """A ViT of ``depth`` blocks initialised from the learngene."""
        if not 1 <= depth <= self.cfg.max_depth:
            raise ConfigError(f"depth {depth} is outside 1..{self.cfg.max_depth} (this learngene's max_depth)",
                              hint=f"choose a depth in 1..{self.cfg.max_depth}")
        model = ViT(self.num_classes, tuple(self.cfg.widths), depth=depth)
        state = {k: v.clone() for k, v in self.shell.state_dict().items()}
        for layer in range(depth):
            state.update({f"blocks.{layer}.{k}": v.detach().clone()
                          for k, v in self.layer_parameters(layer, depth).items()})
        model.load_state_dict(state)
        return model.eval()

    def stored_parameters(self) -> int:
        """What has to be stored to initialise the whole family: shell + components."""
        return sum(p.numel() for p in self.parameters())


def _init_block(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------ files
@dataclass
class LearngeneMeta:
    """``learngene.json``: what the learngene is (checked on load) and how it was made."""

    VERSION: ClassVar[int] = FORMAT_VERSION

    method: str
    config: dict[str, Any]                 # the LearngeneConfig, as a dict
    components: list[str]
    stored_params: int
    labels: list[str]
    input: InputSpec
    data: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    recipe: dict[str, Any] = field(default_factory=dict)
    # the teacher's device settings travel to the models the learngene makes
    experts: dict[str, Any] = field(default_factory=dict)
    personalize: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    auxiliary: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_flops: int = 0
    weights_sha256: str = ""
    toolkit_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    family: str = FAMILY
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, learngene: Learngene, **how_made: Any) -> "LearngeneMeta":
        """The metadata of ``learngene``: its identity from the module, the rest as given."""
        return cls(method=learngene.cfg.method, config=asdict(learngene.cfg),
                   components=list(learngene.components), stored_params=learngene.stored_parameters(),
                   **how_made)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input": self.input.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LearngeneMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "input": InputSpec.from_dict(data["input"])})


def save(learngene: Learngene, meta: LearngeneMeta, out_dir: Path) -> LearngeneMeta:
    """``learngene.pt`` (weights) and ``learngene.json`` (what it is, how it was
    made, and the weights' sha256, checked on load)."""
    buffer = io.BytesIO()
    torch.save(learngene.state_dict(), buffer)
    payload = buffer.getvalue()
    atomic.write_bytes(out_dir / "learngene.pt", payload)
    meta = replace(meta, weights_sha256=hashlib.sha256(payload).hexdigest())
    atomic.write_text(out_dir / "learngene.json", json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
    return meta


def generic_data(meta: LearngeneMeta, data: Any = None, env: TrainingEnv = CPU) -> tuple[GenericData, Any]:
    """The generic data (LabeledImages or a SampleStore; default the built-in
    digits) split and normalised as the learngene's teacher saw it."""
    return load_generic(meta.input, meta.seed, PretrainConfig(), data, env)


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def load(learngene_dir: str | Path) -> tuple[Learngene, LearngeneMeta]:
    """Load and check a learngene directory; every refusal says what would fit."""
    learngene_dir = Path(learngene_dir)
    meta_path = learngene_dir / "learngene.json"
    train_hint = "train one with `edgetailor server learngene train --teacher GE --out LG`"
    if not meta_path.is_file():
        what = "a GE checkpoint" if (learngene_dir / "model.json").is_file() else "not a learngene"
        raise CheckpointError(f"{learngene_dir} is {what} (no learngene.json)", hint=train_hint)
    try:
        data = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}", hint=train_hint) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{learngene_dir} is not a learngene (format {found!r})", hint=train_hint)
    if data.get("family") != FAMILY:
        raise CheckpointError(f"{learngene_dir} is a learngene of the {data.get('family')!r} model family; "
                              f"this toolkit expands {FAMILY!r} learngenes", hint=train_hint)
    made_by = data.get("toolkit_version", "?")
    if data.get("format_version") != FORMAT_VERSION or _minor(made_by) != _minor(__version__):
        raise CheckpointError(
            f"{learngene_dir} was made by edgetailor {made_by} (learngene format {data.get('format_version')}); "
            f"this is edgetailor {__version__} (format {FORMAT_VERSION}), which reads learngenes of "
            f"edgetailor {'.'.join(_minor(__version__))}.x",
            hint=f"re-train it with this version ({train_hint[len('train one with '):]}), "
                 f"or expand it with edgetailor {made_by}")
    if data.get("method") not in RULES:
        raise CheckpointError(f"{learngene_dir} uses expansion method {data.get('method')!r}; "
                              f"known: {', '.join(RULES)}", hint=train_hint)
    weights = learngene_dir / "learngene.pt"
    try:
        payload = weights.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}", hint=train_hint) from None
    if hashlib.sha256(payload).hexdigest() != data.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match the sha256 in learngene.json: corrupt or modified",
                              hint="copy the learngene again from where it was trained, or re-train it")
    try:
        meta = LearngeneMeta.from_dict(data)
        cfg = LearngeneConfig(**meta.config)
        cfg.validate()
        learngene = Learngene(cfg, len(meta.labels))
        learngene.load_state_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError, ConfigError) as exc:
        why = exc.message if isinstance(exc, ConfigError) else exc
        raise CheckpointError(f"cannot load the learngene in {learngene_dir}: {why}", hint=train_hint) from None
    return learngene.eval(), meta
