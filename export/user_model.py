"""Bring your own model: a user's trained ``nn.Module`` as a device bundle.

``bundle_from_model`` is ``export_bundle`` for a model edgetailor did not
train. It wraps the model with its feature taps (``server_side.tapped``),
refuses, before any file is written, what the device could not run (logits
that are not ``(N, classes)``, a tap that does not exist, an input that does
not match the input spec, data-dependent control flow or an op a format
cannot carry), and then writes the same bundle a built-in GE gets: GE in
every format checked against torch, LE's and GN's step programs, the replay
glyphs and a signed manifest. ``load_model_factory`` is how the CLI builds the
model: ``pkg.module:function`` plus a ``state_dict`` file.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgetailor.toolkit.config import ExpertConfig, PersonalizeConfig
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit.errors import ModelError, SampleError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.loaders import relabel
from edgetailor.toolkit.modalities import check_augment, get_modality
from edgetailor.toolkit.signing import load_signing_key
from edgetailor.server_side.checkpoint import CheckpointMeta, GECheckpoint
from edgetailor.server_side.models import WithFeatures
from edgetailor.server_side.cost import count_params
from edgetailor.server_side.experts import LE_DESIGNS, local_expert
from edgetailor.server_side.frontends import find_frontend
from edgetailor.server_side.tapped import AUTO, ProbeResult, TappedModel, probe_taps, resolve_taps
from edgetailor.export.bundle import ProgressFn, first_lines, write_bundle


def bundle_from_model(model: nn.Module, example_input: torch.Tensor | np.ndarray, label_names: Sequence[str],
                      replay: LabeledImages, out: str | Path, *,
                      taps: str | Sequence[str] | Mapping[str, str] = AUTO, input_spec: InputSpec | None = None,
                      experts: ExpertConfig | None = None, personalize: PersonalizeConfig | None = None,
                      generic_test: LabeledImages | None = None, seed: int = 0,
                      formats: list[str] | tuple[str, ...] | None = None,
                      extra_training: list[str] | tuple[str, ...] = (), make_zip: bool = True,
                      overwrite: bool = False, progress: ProgressFn | None = None,
                      signing_key: str | Path | None = None, name: str | None = None, version: int | None = None,
                      expires: datetime | None = None, replay_size: int | None = None) -> Path:
    """Write a device bundle for ``model``, a trained classifier returning
    ``(N, len(label_names))`` logits; returns the bundle directory.

    - ``example_input``: one batch as the model takes it, ``(N, *input_spec.shape)``.
    - ``replay``: generic samples of every label (``LabeledImages``, made
      by the input spec's preprocessing, e.g. ``toolkit.loaders.load_samples``);
      the device replays them so that LE keeps agreeing with GE on generic
      input, and GN learns what to leave to GE. A few hundred suffice.
    - ``taps``: "auto", one submodule name for both, (LE's, GN's), or
      ``{"le": ..., "gn": ...}``; ``NAME:input`` taps a module's input.
    - ``input_spec``: how a sample becomes the model's input; default
      28x28 glyph-v1 samples scaled to [0, 1] (``InputSpec.for_glyphs``);
      sensor windows: ``InputSpec.for_timeseries``; audio clips:
      ``InputSpec.for_audio`` (the model begins with its front-end, e.g.
      ``server_side.frontends.LogMel``, which the spec then records).
    - ``generic_test``: held-out generic samples; GE's accuracy on them is
      recorded in the manifest.
    The other arguments are ``export_bundle``'s."""
    key = load_signing_key(signing_key) if signing_key is not None else None
    say = progress or (lambda _msg: None)
    spec = input_spec or InputSpec.for_glyphs()
    try:
        check_augment(spec)
    except ValueError as exc:
        raise ModelError(f"the input spec's augmentation is not usable: {exc}") from None
    labels = _check_labels(label_names)
    example = _example_tensor(example_input, spec)
    model = copy.deepcopy(model).float().eval()
    if spec.modality == "audio":
        spec = _with_frontend(spec, model)
    say(f"probing {type(model).__name__} for its feature taps")
    probe = probe_taps(model, example, len(labels))
    replay = _check_replay(replay, labels, spec, "replay")
    experts = experts or ExpertConfig()
    experts.validate()
    if isinstance(taps, str) and taps == AUTO and (experts.le_feature_tap or experts.gn_feature_tap):
        taps = {"le": experts.le_feature_tap or AUTO, "gn": experts.gn_feature_tap or AUTO}   # the recipe's
    le_tap, gn_tap = resolve_taps(probe, taps)
    ge_params = count_params(model)
    if isinstance(taps, str) and taps == AUTO and not experts.le_design:
        experts, le_tap = fit_budget(probe, le_tap, gn_tap, experts, ge_params)
    experts = replace(experts, le_feature_tap=le_tap, gn_feature_tap=gn_tap)
    tapped = TappedModel(model, probe, le_tap, gn_tap)
    cost = experts_cost(probe, experts)
    say(f"  LE ({experts.le_design_on(tapped)}) reads {probe.candidates[le_tap].describe()}; GN reads "
        f"{probe.candidates[gn_tap].describe()}; LE+GN {cost:,} parameters, {cost / ge_params:.2%} of GE")
    if cost > experts.le_gn_budget * ge_params:
        say(f"  warning: LE+GN exceed experts.le_gn_budget ({experts.le_gn_budget:.1%} of GE's "
            f"{ge_params:,} parameters); choose a smaller tap, le_width or le_rank")
    check_exportable(tapped, example)
    replay_accuracy = _accuracy(tapped, replay, spec)
    chance = 1.0 / len(labels)
    if replay_accuracy < chance + 0.1 * (1.0 - chance):     # within a tenth of the way from chance to perfect
        raise ModelError(f"{tapped.arch} reads only {replay_accuracy:.1%} of the replay samples right (chance is "
                         f"{chance:.1%}): the input spec does not match how the model was trained",
                         hint="give the normalisation the model was trained with (InputSpec.for_glyphs(mean, std), "
                              "or --input-mean/--input-std), and replay samples made by the same preprocessing")
    generic_accuracy = None
    if generic_test is not None:
        generic_accuracy = _accuracy(tapped, _check_replay(generic_test, labels, spec, "generic_test"), spec)
    personalize = personalize or PersonalizeConfig()
    meta = CheckpointMeta(
        arch=tapped.arch, labels=labels, input=spec, seed=seed,
        data={"source": replay.source or "the user's replay samples", "sha256": replay.fingerprint(),
              "n_replay": len(replay), "replay_accuracy": round(replay_accuracy, 4)},
        recipe={"experts": asdict(experts), "personalize": asdict(personalize)},
        generic_accuracy=generic_accuracy)
    return write_bundle(GECheckpoint(tapped, meta, replay), out, None, experts, personalize, make_zip, overwrite,
                        progress, formats, extra_training, key, name, version, expires, replay_size)


def experts_cost(probe: ProbeResult, experts: ExpertConfig) -> int:
    """LE's and GN's parameters on the taps ``experts`` names (its design resolved)."""
    le_tap = probe.candidates[experts.le_feature_tap]
    design = experts.le_design or ("channel_mix" if le_tap.channels else "lowrank")
    le = local_expert(LE_DESIGNS[design], le_tap.dim, probe.num_classes, experts.le_rank, le_tap.channels,
                      experts.le_width)
    return count_params(le) + probe.candidates[experts.gn_feature_tap].dim + 1


def fit_budget(probe: ProbeResult, le_tap: str, gn_tap: str, experts: ExpertConfig,
               ge_params: int) -> tuple[ExpertConfig, str]:
    """LE's design and tap for automatic taps: the richest that keeps LE + GN
    within ``experts.le_gn_budget`` of GE's parameters.

    A channel mix on the last spatial feature first, at ``le_width`` and then
    narrower (it keeps where in the input a pattern is, which corrects a
    user's hand or voice best; docs/DESIGN.md); its output matrix grows with
    positions x classes, so on a small GE with many positions none fits, and
    then a low-rank correction of the penultimate feature (GN's), at
    ``le_rank`` and then lower. Rank 1 there is the floor, budget or not."""
    options = []
    if probe.candidates[le_tap].channels:
        options += [(replace(experts, le_design="channel_mix", le_width=w, le_feature_tap=le_tap,
                             gn_feature_tap=gn_tap), le_tap) for w in range(experts.le_width, 0, -1)]
    options += [(replace(experts, le_design="lowrank", le_rank=r, le_feature_tap=gn_tap, gn_feature_tap=gn_tap),
                 gn_tap) for r in range(max(1, experts.le_rank), 0, -1)]
    for config, tap in options:
        if experts_cost(probe, config) <= experts.le_gn_budget * ge_params:
            return config, tap
    return options[-1]


def _with_frontend(spec: InputSpec, model: nn.Module) -> InputSpec:
    """An audio spec that records the front-end the model begins with, whose sample rate must be the spec's."""
    frontend = find_frontend(model)
    rate = int(spec.preprocess["sample_rate"])
    if frontend is None:
        record = {"name": "the model's own", "in": "global_expert", "model": type(model).__name__}
    elif frontend.sample_rate != rate:
        raise ModelError(f"{type(model).__name__}'s LogMel front-end hears {frontend.sample_rate} Hz, but the input "
                         f"spec's clips are {rate} Hz: the spec does not match the model",
                         hint=f"give InputSpec.for_audio({frontend.sample_rate}) (or --input audio:"
                              f"{frontend.sample_rate})")
    else:
        record = frontend.describe()
    return replace(spec, preprocess={**spec.preprocess, "frontend": record})


def _check_labels(label_names: Sequence[str]) -> list[str]:
    labels = [label_names] if isinstance(label_names, str) else list(label_names)
    if len(labels) < 2 or not all(isinstance(n, str) and n for n in labels):
        raise ModelError(f"label_names must be two or more non-empty strings, got {labels!r}")
    duplicated = sorted({n for n in labels if labels.count(n) > 1})
    if duplicated:
        raise ModelError(f"label_names repeats {', '.join(map(repr, duplicated))}")
    return labels


def _example_tensor(example_input: Any, spec: InputSpec) -> torch.Tensor:
    example = torch.as_tensor(np.asarray(example_input) if not isinstance(example_input, torch.Tensor)
                              else example_input)
    expected = (*spec.shape,)
    if example.ndim != len(expected) + 1 or tuple(example.shape[1:]) != expected:
        raise ModelError(f"the example input has shape {tuple(example.shape)}, but the input spec gives "
                         f"(N, {', '.join(map(str, expected))}): the spec does not match the model",
                         hint="give an example batch shaped as the bundle's samples reach the model: 28x28 glyph "
                              "models take (N, 1, 28, 28) (pad or resize inside the model for other sizes), "
                              "window models (N, channels, length) (InputSpec.for_timeseries)")
    if not example.is_floating_point() or not bool(torch.isfinite(example).all()) or len(example) < 1:
        raise ModelError(f"the example input must be a finite float batch, got {example.dtype} "
                         f"{'with NaN or infinity' if example.is_floating_point() else ''}".strip())
    return example.float()[:8].contiguous()


def _check_replay(data: LabeledImages, labels: list[str], spec: InputSpec, what: str) -> LabeledImages:
    if not isinstance(data, LabeledImages):
        raise ModelError(f"{what} must be LabeledImages (e.g. from toolkit.loaders.load_samples), "
                         f"got {type(data).__name__}")
    modality = get_modality(spec.modality)
    shape = modality.sample_shape(spec)
    if data.images.dtype != np.dtype(modality.sample_dtype) or tuple(data.images.shape[1:]) != shape:
        raise SampleError(f"{what} holds {data.images.dtype} samples of {data.images.shape[1:]}; the input spec's "
                          f"{spec.modality} samples are {modality.sample_dtype} {shape}",
                          hint="load them with the modality's loader (toolkit.modalities: e.g. "
                               "MODALITIES[spec.modality].load(path, spec)), which makes samples as the device does")
    data = relabel(data, labels) if list(data.label_names) != labels else data
    missing = [labels[c] for c in range(len(labels)) if not (data.labels == c).any()]
    if what == "replay" and missing:
        raise SampleError(f"the replay has no samples of {', '.join(map(repr, missing))}",
                          hint="give generic samples of every label: GN and LE's replay need each class")
    return data


def _accuracy(model: nn.Module, data: LabeledImages, spec: InputSpec) -> float:
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(spec.normalize(data.images[i:i + 256])))
                            for i in range(0, len(data), 256)])
    return float((logits.argmax(1).numpy() == data.labels).mean())


def check_exportable(model: TappedModel, example: torch.Tensor) -> None:
    """Trace the tapped model with ``torch.export`` before any format is
    written, and name the submodule that stops it.

    ONNX's TorchScript exporter would bake data-dependent control flow into
    one branch without a word; torch.export refuses it. The hooks keep a stack
    of the modules running, so the error says which one failed."""
    running: list[str] = []
    names = {module: name for name, module in model.model.named_modules()}
    handles = []
    def enter(module: nn.Module, _inputs) -> None:
        running.append(names[module])

    def leave(_module: nn.Module, _inputs, _output) -> None:   # a hook's return value would replace the output
        if running:
            running.pop()

    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(WithFeatures(model).eval(), (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:
        where = running[-1] if running else ""
        module = f"submodule {where!r} ({type(model.model.get_submodule(where)).__name__})" if where else "its forward"
        data_dependent = "data-dependent" in str(exc) or "GuardOnDataDependent" in type(exc).__name__
        raise ModelError(
            f"{model.arch} cannot be exported: {module} "
            + ("branches or indexes on the values of a tensor" if data_dependent else "fails to trace")
            + f" ({type(exc).__name__}: {first_lines(exc, 2, 400)})",
            hint="a GE must be one graph for every input: replace Python control flow on tensor values with "
                 "torch.where or masking, and shapes that depend on values with fixed ones") from None
    finally:
        for handle in handles:
            handle.remove()


def load_model_factory(factory: str, weights: str | Path | None = None) -> nn.Module:
    """``pkg.module:function`` called with no arguments, then ``weights`` (a
    ``state_dict`` saved with ``torch.save``) loaded into what it returns.

    The module is imported from the current directory too, as ``python -m``
    would; the weights are loaded with ``weights_only=True``, so a weights
    file cannot run code."""
    module_name, _, attribute = factory.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"--model-factory {factory!r} is not MODULE:FUNCTION",
                         hint="e.g. --model-factory my_models.kws:build, where build() returns the nn.Module")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import {module_name!r} for --model-factory: {type(exc).__name__}: {exc}",
                         hint="run from the folder that holds the module, or install its package") from None
    build = getattr(module, attribute, None)
    if not callable(build):
        raise ModelError(f"{module_name} has no function {attribute!r}",
                         hint="public callables there: " + ", ".join(
                             n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))))
    try:
        model = build()
    except Exception as exc:
        raise ModelError(f"{factory}() failed: {type(exc).__name__}: {exc}",
                         hint="the factory is called with no arguments") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{factory}() returned a {type(model).__name__}, not a torch nn.Module")
    if weights is not None:
        try:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"cannot read the weights {weights}: {type(exc).__name__}: {first_lines(exc, 1)}",
                             hint="save them with torch.save(model.state_dict(), PATH)") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"{weights} holds a {type(state).__name__}, not a state_dict",
                             hint="save them with torch.save(model.state_dict(), PATH)")
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a tensor of another shape
            raise ModelError(f"{weights} does not fit {factory}(): {first_lines(exc, 2)}",
                             hint="the factory must build the same architecture the weights were saved from"
                             ) from None
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(f"{weights} does not fit {factory}(): missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}",
                             hint="the factory must build the same architecture the weights were saved from")
    return model.eval()
