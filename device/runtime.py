"""The device runtime's public API, the one a mobile app's bridge calls.

    rt = DeviceRuntime.open("bundle.zip", "state/")
    rt.add_samples(images, labels)     # stored in SQLite, kept across restarts
    rt.personalize()                    # trains LE and GN; atomic
    rt.predict(images)                  # label, probabilities, which expert answered
    rt.evaluate(images, labels)
    rt.export_personalized("model.onnx")  # one program for an app that only predicts
    rt.reset()

Until a personalization exists for this bundle, predict and evaluate answer
with GE alone. ``backend`` names the runtime (``device.backends``); by
default the best installed one that the bundle carries.

``trusted_keys`` pins publisher keys into the state (``device.trust``): from
then on only bundles they signed open. A .zip bundle is unpacked once into
the state's content-addressed cache (``state/bundles``). ``read_only`` is for
commands that only answer (predict, evaluate): they fall back to reading the
state without writing (a full disk, a read-only folder), or to GE alone.
Whatever is wrong with the stored state, the runtime opens and says why in
``warnings`` and ``personalization_problem``.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetailor.device.backends import BACKENDS, choose_backends
from edgetailor.device.backends.base import unpack_weights
from edgetailor.device.mixture import GE, LE, ProgressFn, Routed, route, run_ge, softmax, train_mixture
from edgetailor.device.store import DamagedState, SamplesChanged, StateStore, open_store
from edgetailor.device.trust import TrustPolicy, read_trusted_keys
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.limits import Limits
from edgetailor.toolkit.config import PersonalizeConfig, from_dict
from edgetailor.toolkit.data import LabeledImages
from edgetailor.toolkit import atomic
from edgetailor.toolkit.errors import BackendError, BundleError, PersonalizationError, SampleError, StateError
from edgetailor.toolkit.patching import PatchTable, apply_patches
from edgetailor.toolkit.modalities import get_modality


@dataclass
class Prediction:
    labels: list[str]            # the answer for each input, as label names
    indices: np.ndarray          # (N,) label indices
    probabilities: np.ndarray    # (N, C)
    experts: list[str]           # "GE" or "LE" for each input
    gate: np.ndarray             # (N,) GN's probability that LE should answer

    def __len__(self) -> int:
        return len(self.labels)


def validate_labels(labels: Any, names: list[str], n: int) -> np.ndarray:
    """Labels as names (str) or indices (int) -> indices into ``names``."""
    array = np.asarray(labels).reshape(-1)
    if len(array) != n:
        raise SampleError(f"{n} images but {len(array)} labels")
    if array.dtype.kind in "US" or array.dtype == object:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in array} - set(index))
        if unknown:
            raise SampleError(f"unknown label(s) {', '.join(map(repr, unknown))}",
                              hint=f"this bundle knows: {', '.join(names)}")
        return np.array([index[str(v)] for v in array], dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise SampleError(f"labels must be label names or integer indices, got dtype {array.dtype}")
    bad = sorted({int(v) for v in array if not 0 <= v < len(names)})
    if bad:
        raise SampleError(f"unknown label index(es) {bad}: this bundle has {len(names)} labels (0..{len(names) - 1})",
                          hint=f"labels: {', '.join(names)}")
    return array.astype(np.int64)


CACHE_DIR = "bundles"           # .zip bundles unpacked once per content, inside the state directory
PERSONALIZE_ATTEMPTS = 5        # trainings before giving up when other processes keep adding samples


class DeviceRuntime:
    """A bundle opened on a device with a state directory."""

    def __init__(self, bundle: Bundle, store: StateStore, backend_name: str | None = None,
                 warnings: list[str] | None = None):
        self.bundle = bundle
        self.store = store
        self.warnings = list(warnings or [])
        if store.problem:
            self.warnings.append(store.problem)
        # GE runs on `backend`; LE and GN train and run on `trainer`: the same
        # backend unless the bundle lacks its training programs (an old bundle),
        # and None when no installed backend can train from this bundle.
        choice = choose_backends(bundle, backend_name)
        self.backend, self.trainer, self.why_not_trainable = choice.ge, choice.trainer, choice.why_not_trainable
        self.manifest = bundle.manifest
        self.labels = bundle.labels
        self.input_shape = self.manifest.input.shape
        self.modality = get_modality(self.manifest.input.modality)
        # the image preprocessing (toolkit.preprocess); None for other modalities
        self.preprocessing = self.manifest.input.preprocessing() if self.manifest.input.is_image else None
        self.le_tap = self.manifest.local_expert.feature_tap
        self.gn_tap = self.manifest.gating_network.feature_tap
        self.ge = self.backend.load_global_expert(bundle)
        self._le = self._gn = None
        self.threshold = float(self.manifest.gating_network.threshold)
        self.personalization_id: int | None = None
        self._load_personalization()

    @classmethod
    def open(cls, bundle: str | Path | Bundle, state_dir: str | Path, backend: str | None = None,
             trusted_keys: str | Path | list | None = None, read_only: bool = False,
             limits: Limits | None = None) -> "DeviceRuntime":
        """Open the state, decide whether the bundle may run (``device.trust``), then open and check the bundle."""
        keys = read_trusted_keys(trusted_keys)
        try:
            store = open_store(state_dir, read_only)
            try:
                return cls._open_with(store, bundle, state_dir, backend, keys, limits)
            except sqlite3.DatabaseError as exc:
                store.close()
                if not read_only:
                    raise DamagedState(f"the state in {state_dir} is damaged: {exc}") from None
            # A command that only answers still answers: with GE alone, saying why.
            store = StateStore.in_memory(state_dir, f"the state in {state_dir} is damaged; GE answers alone "
                                                    "(run `edgetailor device repair`)")
            return cls._open_with(store, bundle, state_dir, backend, keys, limits)
        except BaseException:
            if isinstance(bundle, Bundle):
                bundle.close()     # the runtime owns a bundle handed to it, opened or not
            raise

    @classmethod
    def _open_with(cls, store: StateStore, bundle: str | Path | Bundle, state_dir: str | Path, backend: str | None,
                   keys: list, limits: Limits | None) -> "DeviceRuntime":
        try:
            policy = TrustPolicy(store, keys)
            if isinstance(bundle, Bundle):
                policy(bundle.manifest, bundle.signature, bundle.source)
                opened = bundle
            else:
                opened = Bundle.open(bundle, trust=policy, limits=limits, cache_dir=Path(state_dir) / CACHE_DIR)
            try:
                policy.accept(opened)
                store.check_labels(opened.labels)
                return cls(opened, store, backend, policy.warnings)
            except BaseException:
                if opened is not bundle:
                    opened.close()
                raise
        except BaseException:
            store.close()
            raise

    def _load_personalization(self) -> None:
        self.threshold = float(self.manifest.gating_network.threshold)
        self._le = self._gn = None
        self.personalization_id = None
        self.personalization_problem = None
        try:
            saved = self.store.active_personalization()
        except (DamagedState, sqlite3.DatabaseError) as exc:
            # Never lock the user out: answer with GE alone and say why.
            self.personalization_problem = f"{str(exc).splitlines()[0]}; GE answers alone until you personalize again"
            return
        if saved is None:
            return
        if saved.bundle_id != self.bundle.bundle_id:
            # A personalization trained on another GE's features is meaningless here.
            self.personalization_problem = (f"it was trained with another bundle (id {saved.bundle_id}, this one is "
                                            f"{self.bundle.bundle_id}); personalize again to use this bundle")
            return
        if self.trainer is None:
            self.personalization_problem = self.why_not_trainable
            return
        try:
            le = self.trainer.load_trained(self.bundle, "local_expert", saved.le_model)
            gn = self.trainer.load_trained(self.bundle, "gating_network", saved.gn_model)
        except (StateError, BackendError) as exc:
            # Answer with GE alone, say why, and let the user personalize again.
            self.personalization_problem = str(exc)
            return
        self._le, self._gn = le, gn
        self.threshold = saved.threshold
        self.personalization_id = saved.id

    @property
    def personalized(self) -> bool:
        return self._le is not None

    # samples -------------------------------------------------------------
    def prepare(self, images: Any) -> np.ndarray:
        """Inputs as an app has them -> the samples GE reads, as the bundle's
        modality makes them (``toolkit.modalities``). Images of any size,
        polarity and container, by the bundle's preprocessing
        (``toolkit.preprocess``): a (N, H, W[, C]) array or a list of arrays;
        uint8, uint16 or float in [0, 1]. Sensor windows: (N, channels,
        length), or (N, length) for one channel, exactly the bundle's size."""
        return self.modality.prepare(images, self.manifest.input)

    def _samples(self, data: LabeledImages) -> np.ndarray:
        """A loader's samples, prepared unless the loader already made them: glyphs by this bundle's
        preprocessing, windows and clips of the bundle's shape (the modality's loaders check each)."""
        if self.preprocessing is not None and data.prepared_with == self.preprocessing.to_dict():
            return data.images
        if (self.preprocessing is None and data.images.dtype == np.dtype(self.modality.sample_dtype)
                and data.images.shape[1:] == self.modality.sample_shape(self.manifest.input)):
            return data.images
        return self.prepare(data.images)

    def add_samples(self, images: Any, labels: Any) -> int:
        """Prepare, validate and store the user's labelled samples; returns how many were new."""
        array = self.prepare(images)
        return self._store(array, validate_labels(labels, self.labels, len(array)))

    def _store(self, array: np.ndarray, indices: np.ndarray) -> int:
        try:
            return self.store.add_samples(array, indices)
        except sqlite3.OperationalError as exc:
            raise StateError(f"could not store the samples in {self.store.dir}: {exc}",
                             hint="free some space and try again; the samples stored before are intact") from None

    def add_dataset(self, data: LabeledImages) -> int:
        names = [data.label_names[i] for i in data.labels]
        return self._store(self._samples(data), validate_labels(np.array(names, dtype=object), self.labels, len(data)))

    def sample_count(self) -> int:
        return self.store.count_samples()

    # personalize ---------------------------------------------------------
    def personalize(self, overrides: dict[str, Any] | None = None, progress: ProgressFn | None = None) -> dict:
        """Train LE and GN on every stored sample, then make them active in one commit.

        The commit is a compare-and-swap on the samples' generation: if another
        process added samples meanwhile, this training is stale, so it is not
        committed. Either that process has already committed a personalization of
        the newest samples (it wins, and is reported with ``superseded``), or this
        one trains again on all of them.

        ``overrides`` changes the bundle's PersonalizeConfig (e.g. ``max_seconds``)."""
        if self.trainer is None:
            raise BackendError(f"cannot personalize: {self.why_not_trainable}")
        if self.store.read_only:
            raise StateError(f"cannot personalize: {self.store.problem or 'the state is open read-only'}")
        cfg = from_dict(PersonalizeConfig, {**self.manifest.personalize, **(overrides or {})}, "personalize")
        cfg.validate()
        started = time.perf_counter()
        for attempt in range(1, PERSONALIZE_ATTEMPTS + 1):
            images, labels, generation = self.store.load_samples_with_generation(
                self.modality.sample_shape(self.manifest.input), self.modality.sample_dtype)
            self._check_trainable(labels)
            trained = train_mixture(self.trainer, self.ge, self.bundle, images, labels, cfg, progress,
                                    ge_format=BACKENDS[self.backend.name].format)
            report = {**trained.report, "damaged_samples_skipped": self.store.damaged_samples,
                      "other_samples_ignored": self.store.other_samples}
            try:
                pid = self.store.save_personalization(self.bundle.bundle_id, len(labels), trained.le_model,
                                                      trained.gn_model, trained.threshold, report, generation)
            except SamplesChanged:
                newer = self._personalization_of_current_samples()
                if newer is not None:     # another process already trained on the newest samples: it wins
                    self._load_personalization()
                    return {**newer.report, "personalization_id": newer.id, "superseded": True,
                            "attempts": attempt, "seconds": round(time.perf_counter() - started, 3)}
                continue                  # the samples grew while we trained: train again on all of them
            except sqlite3.OperationalError as exc:
                raise StateError(f"could not save the personalization in {self.store.dir}: {exc}",
                                 hint="free some space and try again; the previous personalization stays in "
                                      "use") from None
            self._load_personalization()
            return {**report, "personalization_id": pid, "attempts": attempt,
                    "seconds": round(time.perf_counter() - started, 3)}
        raise PersonalizationError(f"the stored samples changed during each of {PERSONALIZE_ATTEMPTS} trainings, "
                                   "so none was committed (another process keeps adding samples)",
                                   hint="personalize again once the samples stop changing; the previous "
                                        "personalization stays in use")

    def _check_trainable(self, labels: np.ndarray) -> None:
        if len(labels) == 0:
            damaged = f" ({self.store.damaged_samples} damaged rows skipped)" if self.store.damaged_samples else ""
            if self.store.other_samples:
                damaged += (f"; the {self.store.other_samples} stored are another kind of input than this bundle "
                            f"reads ({self.manifest.input.modality}, {tuple(self.input_shape)}), from another bundle")
            raise SampleError(f"no samples stored to personalize on{damaged}",
                              hint="add labelled samples first (edgetailor device personalize --samples PATH)")
        if len(np.unique(labels)) < 2:
            raise SampleError(f"all {len(labels)} stored samples have the label {self.labels[labels[0]]!r}",
                              hint="add samples of at least two labels")

    def _personalization_of_current_samples(self):
        try:
            saved = self.store.active_personalization()
        except DamagedState:
            return None
        if (saved is not None and saved.bundle_id == self.bundle.bundle_id
                and saved.samples_generation == self.store.samples_generation()):
            return saved
        return None

    # inference -----------------------------------------------------------
    def _answer(self, images: np.ndarray) -> tuple[np.ndarray, Routed]:
        """GE's logits and the routed answer for validated uint8 images."""
        ge_logits, features = run_ge(self.ge, images, self.manifest.input)
        return ge_logits, route(ge_logits, features[self.le_tap], features[self.gn_tap], self._le, self._gn,
                                self.threshold)

    def predict(self, images: Any) -> Prediction:
        """The answer for each image (any size; prepared as ``prepare`` does)."""
        return self._predict(self.prepare(images))

    def predict_dataset(self, data: LabeledImages) -> Prediction:
        return self._predict(self._samples(data))

    def _predict(self, samples: np.ndarray) -> Prediction:
        _, routed = self._answer(samples)
        indices = routed.logits.argmax(axis=1)
        return Prediction([self.labels[i] for i in indices], indices, softmax(routed.logits),
                          [LE if u else GE for u in routed.use_le], routed.gate)

    def evaluate(self, images: Any, labels: Any) -> dict[str, Any]:
        array = self.prepare(images)
        return self._evaluate(array, validate_labels(labels, self.labels, len(array)))

    def _evaluate(self, array: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
        ge_logits, routed = self._answer(array)
        correct = routed.logits.argmax(axis=1) == truth
        ge_correct = ge_logits.argmax(axis=1) == truth
        answered = {GE: int((~routed.use_le).sum()), LE: int(routed.use_le.sum())}
        return {
            "accuracy": float(correct.mean()),
            "n": int(len(truth)),
            "experts": answered,
            "accuracy_by_expert": {GE: float(correct[~routed.use_le].mean()) if answered[GE] else None,
                                   LE: float(correct[routed.use_le].mean()) if answered[LE] else None},
            "ge_only_accuracy": float(ge_correct.mean()),
            "personalized": self.personalized,
            "personalization_id": self.personalization_id,
        }

    def evaluate_dataset(self, data: LabeledImages) -> dict[str, Any]:
        names = np.array([data.label_names[i] for i in data.labels], dtype=object)
        return self._evaluate(self._samples(data), validate_labels(names, self.labels, len(data)))

    # one program, for apps that only predict -----------------------------
    def export_personalized(self, path: str | Path, fmt: str = "onnx") -> Path:
        """Write GE + LE + GN + routing with the active personalization's
        weights folded in, as one inference program in format ``fmt``: image
        in; logits, probabilities, gate and expert (1 = LE) out, as
        ``predict`` answers. Needs no converter: the bundle's template for
        ``fmt`` gets the trained values written over its placeholders."""
        if not self.personalized:
            raise PersonalizationError("nothing to export: this state has no personalization in use"
                                       + (f" ({self.personalization_problem})" if self.personalization_problem else ""),
                                       hint="personalize first (edgetailor device personalize ...)")
        template = self.manifest.personalized_model.get(fmt)
        if template is None:
            have = ", ".join(self.manifest.personalized_model) or "none"
            raise BundleError(f"{self.bundle.source} has no {fmt} personalized-model template (it has: {have})",
                              hint=f"choose one of those, or re-export the bundle with --formats including {fmt} "
                                   "(a quantized GE has one in onnx only)")
        self.bundle.require_format(fmt)
        saved = self.store.active_personalization()
        weights = {part: unpack_weights(blob, self.bundle, part, self.trainer.name)
                   for part, blob in (("local_expert", saved.le_model), ("gating_network", saved.gn_model))}
        try:
            text = self.bundle.path(template["patches"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read {template['patches']}: {exc}", hint="re-export the bundle") from None
        table = PatchTable.from_json(text, template["patches"])
        program = apply_patches(self.bundle.path(template["program"]).read_bytes(), table, weights,
                                self.threshold, where=template["program"])
        path = Path(path)
        try:
            atomic.write_bytes(path, program)
        except OSError as exc:
            raise StateError(f"could not write {path}: {exc}", hint="check the folder exists and has space") from None
        return path

    # housekeeping --------------------------------------------------------
    def reset(self, keep_samples: bool = True) -> None:
        """Forget the personalization (and, unless ``keep_samples``, the samples): back to GE alone.
        A damaged state raises DamagedState: repair it first (``repair_state``; the CLI's reset does)."""
        if self.store.read_only:
            raise StateError(f"cannot reset: {self.store.problem or 'the state is open read-only'}")
        self.store.check_health()     # a damaged state is repaired, not just emptied (the CLI's reset does it)
        try:
            self.store.clear_personalization()
            if not keep_samples:
                self.store.clear_samples()
        except sqlite3.DatabaseError as exc:
            raise DamagedState(f"cannot change the state in {self.store.dir}: {exc}") from None
        self._load_personalization()

    def status(self) -> dict[str, Any]:
        saved = self.store.active_personalization() if self.personalized else None
        return {"bundle": str(self.bundle.source), "bundle_id": self.bundle.bundle_id,
                "signed_by": self.bundle.signer_id, "warnings": self.warnings,
                "backend": self.backend.name, "trainer": self.trainer.name if self.trainer else None,
                "samples": self.sample_count(),
                "personalized": self.personalized,
                "personalization": saved.report if saved and self.personalized else None,
                "personalization_problem": self.personalization_problem}

    def close(self) -> None:
        self.store.close()
        self.bundle.close()

    def __enter__(self) -> "DeviceRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
