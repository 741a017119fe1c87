"""Any torch classifier as a GE: ``TappedModel`` reads the features LE and GN
need out of a model that was never written for edgetailor.

The built-in families (``models.py``) return their feature taps from
``forward_with_features``. A user's ``nn.Module`` returns only its logits, so
``TappedModel`` collects the taps with forward hooks on named submodules
while the model runs, and offers the same interface (``feature_taps``,
``default_taps``, ``forward_with_features``, ``head``) to export. Hooks, not
a graph rewrite: every exporter the bundle uses (TorchScript for ONNX,
torch.export for ExecuTorch and LiteRT) traces through them, and they work on
any model that runs, whatever its Python.

A tap is a module's output (``"layer4"``) or a module's input
(``"fc:input"``, what the classifier reads). ``probe_taps`` runs the model
twice, at two batch sizes, and lists every tensor a tap could name with its
per-sample shape; it also checks that the model returns ``(N, classes)``
logits. Automatic taps follow the rules of the built-in families:

- LE reads the last spatial feature (a conv block's maps, a sequence's
  tokens): the last module whose output still has more than one position;
  the channel-mix LE keeps where in the input a pattern is.
- GN reads the penultimate layer, the input of the classifier.

A 3-D feature is channels-first ``(N, C, L)`` as ``nn.Conv1d`` writes it,
unless the leaf module that made it writes features last (``nn.Linear``,
``nn.LayerNorm``, attention, recurrent layers: ``(N, T, D)``; an activation
keeps its input's layout; see ``_record``). Channels-last features are
transposed before they are flattened, so every tap reaches LE
channel-major, as LeNet's maps and a ViT's patch tokens do. A module that
runs more than once in a forward pass is no tap.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from edgetailor.toolkit.errors import ModelError
from edgetailor.server_side.models import FeatureTap

INPUT_SUFFIX = ":input"
AUTO = "auto"
# Modules whose 3-D outputs are (N, tokens, features): their features are the last axis.
CHANNELS_LAST_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
    nn.TransformerDecoderLayer, nn.GRU, nn.LSTM, nn.RNN, nn.Embedding)


@dataclass(frozen=True)
class TapCandidate:
    """A tensor a tap can name: a module's output or input, as one sample sees it."""

    name: str                   # "block.2" or "fc:input"
    module_type: str
    shape: tuple[int, ...]      # per sample, batch axis dropped
    order: int                  # when it was produced in the forward pass
    channels_last: bool

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """The maps of a spatial feature (0 for a vector): what a channel-mix LE mixes."""
        if len(self.shape) < 2:
            return 0
        channels = self.shape[-1] if self.channels_last else self.shape[0]
        return channels if self.dim // channels > 1 else 0

    def describe(self) -> str:
        return f"{self.name} ({self.module_type}, {'x'.join(map(str, self.shape))})"


@dataclass(frozen=True)
class ProbeResult:
    candidates: dict[str, TapCandidate]
    num_classes: int
    classifier: str | None       # the module that writes the logits, when one does
    reused: dict[str, int] = field(default_factory=dict)   # modules forward calls more than once: no taps


def _first_tensor(value: Any) -> torch.Tensor | None:
    """A module's output as a tap sees it: recurrent layers return (output, state); the output is the feature."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


# Modules that keep their input's layout: a feature they return is laid out as the one they were given.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Softplus,
    nn.Dropout, nn.Identity)


def _record(model: nn.Module, x: torch.Tensor) -> tuple[Any, list[tuple[str, str, torch.Tensor, bool]]]:
    """Run ``model`` once, recording every module's output and every leaf module's input, in order, each
    with whether its features are last.

    A tensor's layout is that of the leaf module that made it: features last
    for ``CHANNELS_LAST_MODULES``, first for the rest (``nn.Conv1d``,
    ``nn.BatchNorm1d``), as given for element-wise modules (an activation
    after a Linear over tokens keeps features last). A container returns a
    tensor one of its leaves made, and so has that leaf's layout. A tensor a
    functional call made is read channels-first."""
    seen: list[tuple[str, str, torch.Tensor, bool]] = []
    last: dict[int, bool] = {}          # id(tensor) -> features last, for tensors a leaf made
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        kind, leaf = type(module).__name__, not list(module.children())

        def output_hook(mod, inputs, output, name=name, kind=kind, leaf=leaf):
            tensor = _first_tensor(output)
            if tensor is None:
                return
            if leaf:
                given = _first_tensor(inputs)
                layout = (last.get(id(given), False) if isinstance(mod, ELEMENTWISE_MODULES) and given is not None
                          else isinstance(mod, CHANNELS_LAST_MODULES))
                last[id(tensor)] = layout
            seen.append((name, kind, tensor, last.get(id(tensor), False)))

        def input_hook(mod, inputs, name=name, kind=kind):
            tensor = _first_tensor(inputs)
            if tensor is not None:
                seen.append((name + INPUT_SUFFIX, kind, tensor, last.get(id(tensor), False)))

        handles.append(module.register_forward_hook(output_hook))
        if leaf:
            handles.append(module.register_forward_pre_hook(input_hook))
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


def probe_taps(model: nn.Module, example: torch.Tensor, num_classes: int) -> ProbeResult:
    """What ``model`` can expose as taps, checked at two batch sizes so that
    the batch axis is known to be the first (a tap that is not batch-first
    cannot be one); refuses a model that does not return ``(N, classes)`` logits."""
    was_training = model.training
    model.eval()
    try:
        n = example.shape[0]
        runs = []
        for batch in (example, torch.cat([example, example[:1]])):
            try:
                runs.append(_record(model, batch))
            except Exception as exc:  # the user's code: any exception is theirs to see, named
                raise ModelError(f"{type(model).__name__} failed on the example input of shape "
                                 f"{tuple(batch.shape)}: {type(exc).__name__}: {exc}",
                                 hint="give an example input shaped as the model expects, (N, channels, ...)"
                                 ) from exc
    finally:
        model.train(was_training)
    (output, seen), (output_more, seen_more) = runs
    check_logits(model, output, output_more, n, num_classes)
    more = {name: tensor.shape for name, _, tensor, _ in seen_more}
    calls = Counter(name for name, _, _, _ in seen)
    reused = {name: count for name, count in calls.items() if count > 1}
    candidates: dict[str, TapCandidate] = {}
    for order, (name, kind, tensor, last) in enumerate(seen):
        other = more.get(name)
        if (name in reused or tensor.ndim < 2 or tensor.shape[0] != n or other is None
                or tuple(other) != (n + 1, *tensor.shape[1:]) or not tensor.is_floating_point()):
            continue
        candidates[name] = TapCandidate(name, kind, tuple(tensor.shape[1:]), order, last and tensor.ndim == 3)
    leaves = [name for name, _, tensor, _ in seen
              if tensor is output and not name.endswith(INPUT_SUFFIX) and not list(_module(model, name).children())]
    return ProbeResult(candidates, num_classes, leaves[-1] if leaves else None, reused)


def check_logits(model: nn.Module, output: Any, output_more: Any, n: int, num_classes: int) -> None:
    what = type(model).__name__
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"{what} returns a {type(output).__name__}, not a logits tensor",
                         hint="a GE's forward must return only its logits, shape (N, classes); wrap the model in a "
                              "module that returns them")
    if output.shape != (n, num_classes) or output_more.shape != (n + 1, num_classes):
        raise ModelError(f"{what} returns shape {tuple(output.shape)} for a batch of {n}; a GE returns logits "
                         f"of shape ({n}, {num_classes}), one score per label",
                         hint=f"give as many label names as the model has outputs, or make forward return "
                              f"(N, {num_classes}) logits (no softmax needed)")
    if not output.is_floating_point():
        raise ModelError(f"{what} returns {output.dtype} values; logits are floating point")


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.removesuffix(INPUT_SUFFIX))


def describe_candidates(probe: ProbeResult, most: int = 40) -> str:
    """The module outputs a tap can name (inputs too, but only the classifier's is listed), last first."""
    classifier_input = f"{probe.classifier}{INPUT_SUFFIX}"
    shown = [c.describe() for c in sorted(probe.candidates.values(), key=lambda c: -c.order)
             if not c.name.endswith(INPUT_SUFFIX) or c.name == classifier_input]
    return ", ".join(shown[:most]) + (f", and {len(shown) - most} more" if len(shown) > most else "")


def auto_taps(probe: ProbeResult) -> tuple[str, str]:
    """(LE's tap, GN's tap) by the built-in families' rules (module doc)."""
    candidates = sorted(probe.candidates.values(), key=lambda c: c.order)
    if not candidates:
        raise ModelError("the model has no submodule whose output could be a feature tap",
                         hint="build the model from nn.Module layers (nn.Conv2d, nn.Linear, ...) rather than "
                              "functional calls alone")
    classifier_input = f"{probe.classifier}{INPUT_SUFFIX}" if probe.classifier else None
    cut = probe.candidates[classifier_input].order if classifier_input in probe.candidates else len(candidates) + 1
    before = [c for c in candidates if c.order < cut and not c.name.endswith(INPUT_SUFFIX)]
    spatial = [c for c in before if c.channels]
    vectors = [c for c in before if not c.channels and c.shape != (probe.num_classes,)]
    gn = classifier_input if classifier_input in probe.candidates else (vectors[-1].name if vectors else None)
    le = spatial[-1].name if spatial else gn
    if le is None or gn is None:
        raise ModelError("could not choose the feature taps automatically: no feature before the logits",
                         hint=f"name them: taps=(LE_TAP, GN_TAP); candidates: {describe_candidates(probe)}")
    return le, gn


def resolve_taps(probe: ProbeResult, taps: str | Sequence[str] | Mapping[str, str]) -> tuple[str, str]:
    """(LE's tap, GN's tap) from "auto", a pair of names, one name for both, or {"le": ..., "gn": ...}."""
    if isinstance(taps, str) and taps == AUTO:
        return auto_taps(probe)
    if isinstance(taps, str):
        chosen = [taps, taps]
    elif isinstance(taps, Mapping):
        unknown = sorted(set(taps) - {"le", "gn"})
        if unknown:
            raise ModelError(f"taps has unknown key(s) {', '.join(unknown)}", hint='give {"le": ..., "gn": ...}')
        le_auto, gn_auto = auto_taps(probe)
        chosen = [taps.get("le", le_auto), taps.get("gn", gn_auto)]
    else:
        chosen = list(taps)
        if len(chosen) != 2:
            raise ModelError(f"taps names {len(chosen)} features; give two (LE's, then GN's), one for both, "
                             "or \"auto\"")
    for name in chosen:
        if name == AUTO:
            continue
        if name in probe.reused:
            raise ModelError(f"{name!r} runs {probe.reused[name]} times in one forward pass, so it is no one "
                             "feature", hint=f"tap a module that runs once; candidates: {describe_candidates(probe)}")
        if name not in probe.candidates:
            raise ModelError(f"the model has no tap {name!r}",
                             hint="a tap is a submodule's name (its output) or NAME:input (its input); "
                                  f"candidates: {describe_candidates(probe)}")
    le, gn = chosen
    le_auto, gn_auto = auto_taps(probe) if AUTO in chosen else (le, gn)
    return (le_auto if le == AUTO else le), (gn_auto if gn == AUTO else gn)


class TappedModel(nn.Module):
    """A user's classifier with named taps, shaped like a built-in GE for export.

    ``arch`` is ``user:<class name>``. Exported, it returns the logits, then
    LE's tap, then GN's (one output when they are the same)."""

    structured_pruning = False

    def __init__(self, model: nn.Module, probe: ProbeResult, le_tap: str, gn_tap: str):
        super().__init__()
        self.model = model
        self.arch = f"user:{type(model).__name__}"
        self.num_classes = probe.num_classes
        self.taps = [probe.candidates[le_tap]] + ([probe.candidates[gn_tap]] if gn_tap != le_tap else [])
        self.default_taps = {"le_feature_tap": le_tap, "gn_feature_tap": gn_tap}
        self.classifier = probe.classifier

    @property
    def feature_taps(self) -> tuple[FeatureTap, ...]:
        return tuple(FeatureTap(t.name, t.dim, t.channels) for t in self.taps)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for tap in self.taps:
            module = _module(self.model, tap.name)
            if tap.name.endswith(INPUT_SUFFIX):
                handles.append(module.register_forward_pre_hook(
                    lambda _m, inputs, name=tap.name: captured.__setitem__(name, _first_tensor(inputs))))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _i, output, name=tap.name: captured.__setitem__(name, _first_tensor(output))))
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        features = {}
        for tap in self.taps:
            value = captured[tap.name]
            if tap.channels_last:
                value = value.transpose(1, 2)     # (N, T, D) -> (N, D, T): channel-major, as LE reads it
            features[tap.name] = torch.flatten(value, 1)
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def head(self) -> nn.Module:
        """The classifier, which the fine-tune-last baseline retrains."""
        if self.classifier is None:
            raise ModelError(f"{self.arch} has no classifier module (its logits come from a functional call)",
                             hint="end the model with an nn.Linear to compare with fine-tuning the last layer")
        return self.model.get_submodule(self.classifier)
