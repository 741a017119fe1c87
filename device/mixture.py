"""The mixture of experts on the device: how LE and GN are trained from the
user's samples, and how an input is routed between GE and LE.

Design (measured alternatives are in docs/DESIGN.md):
- LE and GN read GE's intermediate features (taps chosen at export), so
  they cost ~2 % of GE in parameters and well under 1 % in multiply-adds.
- LE is a residual head on GE's features (by default a channel mix of its
  last spatial maps, ``GE_logits + U softplus(M f) + b``; server_side/experts.py) with U, b zero at
  start: it begins as GE and training adds corrections. It trains on the user's samples (plus a few
  augmented copies of each while the set is small, as the bundle's modality makes them:
  toolkit/modalities.py; GE's features shift with a pixel of offset)
  mixed with replayed generic glyphs labelled by GE itself, so that on generic
  input it keeps agreeing with GE.
- GN is a logistic regression on a GE feature, trained on the user's
  samples (label 1) against two thirds of the replay (label 0) in balanced
  batches. Its threshold is then calibrated on the third it never saw: raised
  from the bundle's value until at most ``gate_generic_share`` of those
  generic glyphs would go to LE. LE answers above the threshold, else GE.

Cost grows linearly with the samples: the augmentation is vectorised, GE
runs in batches, and the time budget (``max_seconds``) is shared so that GN
always gets its steps, however long LE's epochs take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgetailor.device.backends.base import Backend, GlobalExpertRunner, TrainedPart, pack_weights
from edgetailor.toolkit.bundle import Bundle
from edgetailor.toolkit.config import PersonalizeConfig
from edgetailor.toolkit.arrayfiles import NpzArchive
from edgetailor.toolkit.errors import BundleError, DataFormatError, PersonalizationError
from edgetailor.toolkit.input_spec import InputSpec
from edgetailor.toolkit.modalities import augment_params, get_modality

ProgressFn = Callable[[str, int, int], None]
GE, LE = "GE", "LE"


BATCH_VALUES = 1 << 18      # input values GE reads per batch, at most


def augmented_copies(cfg: PersonalizeConfig, n_samples: int) -> int:
    """Jittered copies per sample: ``augment_copies``, fewer once the set nears ``augment_until``."""
    return int(min(cfg.augment_copies, max(0, cfg.augment_until // max(1, n_samples) - 1)))


def le_epochs_for(cfg: PersonalizeConfig, n_inputs: int) -> int:
    """LE's epochs over ``n_inputs`` training inputs: ``le_epochs``, fewer once
    they would pass ``le_max_steps``, so that a large sample set costs a
    bounded time rather than 150 passes."""
    steps_per_epoch = -(-n_inputs // min(cfg.batch_size, n_inputs))
    return int(min(cfg.le_epochs, max(1, cfg.le_max_steps // steps_per_epoch)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_ge(ge: GlobalExpertRunner, images: np.ndarray, spec: InputSpec, batch: int | None = None,
           taps: list[str] | None = None, progress: Callable[[int, int], None] | None = None):
    """GE logits and features (those in ``taps``, default all) for samples
    (glyphs, windows, clips), in batches to bound memory, written into arrays allocated once.

    64: a transformer GE's attention scores grow with the batch (heads x 50 x
    50 floats per image), and ONNX Runtime's arena keeps its peak; at 512 a
    depth-4 ViT took the device process to 190 MB. LeNet-5 loses nothing."""
    logits, features = None, {}
    n = len(images)
    if batch is None:   # 64 glyphs; fewer of a larger input (a clip of audio: 16), whose activations are larger
        batch = int(max(8, min(64, BATCH_VALUES // max(1, int(np.prod(images.shape[1:], dtype=np.int64))))))
    for start in range(0, n, batch):
        lg, feats = ge.run(spec.normalize(images[start:start + batch]))
        if logits is None:
            logits = np.empty((n, *lg.shape[1:]), np.float32)
            features = {k: np.empty((n, *v.shape[1:]), np.float32) for k, v in feats.items()
                        if taps is None or k in taps}
        logits[start:start + len(lg)] = lg
        for k in features:
            features[k][start:start + len(lg)] = feats[k]
        if progress is not None and (start // batch) % 16 == 15:
            progress(min(n, start + batch), n)
    return logits, features


@dataclass
class TrainedMixture:
    le_model: bytes     # the trained weights (base.pack_weights), runnable by any training backend
    gn_model: bytes
    threshold: float
    report: dict


def gate_probability(gn: TrainedPart, features: np.ndarray) -> np.ndarray:
    """P(LE should answer) from GN's two-class logits [0, s]."""
    logits = gn(features)
    return sigmoid(logits[:, 1] - logits[:, 0])


def replay_outputs(bundle: Bundle, ge: GlobalExpertRunner, ge_format: str | None, taps: list[str],
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """GE's logits and ``taps`` (LE's, GN's) on the bundle's replay samples.

    Read from the outputs export computed with ``ge_format``'s GE program when the bundle carries them
    (``ReplaySpec.outputs``): GE is frozen, so running it on the replay again would give the same
    numbers, and on a clip of audio that is most of the time and memory a personalization takes.
    Otherwise (an older bundle, or a GE that runs in another format) GE runs on the replay."""
    manifest = bundle.manifest
    file = manifest.replay.outputs.get(ge_format or "")
    if file is None:
        with np.load(bundle.path(manifest.replay.file)) as archive:
            replay_samples = archive["x"]
        return run_ge(ge, replay_samples, manifest.input, taps=taps, progress=progress)
    expected = {"logits": (manifest.replay.count, len(manifest.labels)),
                "le": (manifest.replay.count, manifest.local_expert.feature_dim),
                "gn": (manifest.replay.count, manifest.gating_network.feature_dim)}
    damaged = "the bundle is damaged or was not written by edgetailor; re-export it"
    arrays = {}
    try:
        with NpzArchive(bundle.path(file)) as archive:
            for key, shape in expected.items():     # each header checked before its array is read
                header = archive.header(key) if key in archive else None
                if header is None or header.dtype != np.float32 or len(header.shape) < 1 \
                        or (header.shape[0], int(np.prod(header.shape[1:]))) != shape:
                    found = f"{header.dtype} {header.shape}" if header else "missing"
                    raise BundleError(f"{file}: {key} is {found}; float32 rows {shape} expected", hint=damaged)
                arrays[key] = archive.read(key)
                if not np.isfinite(arrays[key]).all():
                    raise BundleError(f"{file}: {key} holds NaN or infinite values", hint=damaged)
    except DataFormatError as exc:
        raise BundleError(f"cannot read GE's replay outputs: {exc}", hint=damaged) from None
    le_tap, gn_tap = manifest.local_expert.feature_tap, manifest.gating_network.feature_tap
    features = {le_tap: arrays["le"], gn_tap: arrays["gn"]}
    return arrays["logits"], {tap: features[tap] for tap in taps}


def train_mixture(backend: Backend, ge: GlobalExpertRunner, bundle: Bundle, images: np.ndarray,
                  labels: np.ndarray, cfg: PersonalizeConfig, progress: ProgressFn | None = None,
                  ge_format: str | None = None) -> TrainedMixture:
    """Train LE and GN on the user's samples with ``backend``; returns their weights.

    ``ge`` may run on another backend (an old bundle's GE-only runtime); ``ge_format`` is the bundle
    format its program comes from, which picks the replay outputs to read (``replay_outputs``)."""
    started = time.perf_counter()
    deadline = started + cfg.max_seconds
    say = progress or (lambda stage, done, total: None)
    manifest = bundle.manifest
    le_tap = manifest.local_expert.feature_tap
    gn_tap = manifest.gating_network.feature_tap
    taps = [le_tap, gn_tap]
    rng = np.random.default_rng(cfg.seed)

    copies = augmented_copies(cfg, len(labels))
    # One table of GE's outputs: the user's inputs (augmented copies after the
    # originals), then the replay samples. Batches are rows of it.
    modality = get_modality(manifest.input.modality)
    n_user, n_replay = len(labels) * (copies + 1), manifest.replay.count
    total = n_user + n_replay
    say("features", 0, total)
    # GE runs on each chunk of augmented inputs as it is made: only GE's outputs are kept, never every
    # augmented input at once (a second of audio is 64 KB, and personalizing makes hundreds of them).
    parts, done = [], 0
    for chunk in modality.augment_chunks(images, copies, rng, augment_params(manifest.input)):
        parts.append(run_ge(ge, chunk, manifest.input, taps=taps))
        done += len(chunk)
        say("features", done, total)
    parts.append(replay_outputs(bundle, ge, ge_format, taps,
                                progress=lambda finished, _: say("features", n_user + finished, total)))
    n_replay = len(parts[-1][0])
    say("features", total, total)
    logits_all = np.concatenate([p[0] for p in parts])
    # (the replay outputs a bundle carries may be flattened: each part takes the shape GE gives)
    features = {tap: np.concatenate([p[1][tap].reshape(len(p[1][tap]), *parts[0][1][tap].shape[1:]) for p in parts])
                for tap in parts[0][1]}
    del parts
    le_table, gn_table = features[le_tap], features[gn_tap]
    # The user's labels, then GE's own answers for the replay glyphs.
    labels_all = np.concatenate([np.tile(labels, copies + 1), logits_all[n_user:].argmax(axis=1)]).astype(np.int64)

    # Local Expert: user batches with replay mixed in at cfg.replay_weight.
    le = backend.trainer(bundle, "local_expert")
    le.set_learning_rate(cfg.le_learning_rate)
    per_batch = min(cfg.batch_size, n_user)
    replay_per_batch = int(round(per_batch * cfg.replay_weight))
    le_steps, le_loss, stopped_early = 0, float("nan"), False
    le_started = time.perf_counter()
    steps_per_epoch = -(-n_user // per_batch)

    def le_must_stop() -> bool:
        """Stop LE while GN's steps still fit in the budget: a GN step costs at most an LE step."""
        now = time.perf_counter()
        return now + cfg.gn_steps * (now - le_started) / le_steps > deadline

    le_epochs = le_epochs_for(cfg, n_user)
    for epoch in range(le_epochs):
        # Random numbers drawn per epoch, not per step: one draw costs as much as a tenth of a step.
        order = rng.permutation(n_user)
        replay_rows = n_user + rng.integers(0, n_replay, (steps_per_epoch, replay_per_batch))
        for k in range(steps_per_epoch):
            rows = np.concatenate([order[k * per_batch:(k + 1) * per_batch], replay_rows[k]])
            le_loss = le.step(le_table.take(rows, axis=0), logits_all.take(rows, axis=0), labels_all.take(rows))
            le_steps += 1
            if k % 64 == 63 and le_must_stop():  # an epoch of a large sample set can outlast the budget
                stopped_early = True
                break
        say("local expert", epoch + 1, le_epochs)
        if stopped_early or (epoch + 1 < le_epochs and le_must_stop()):
            stopped_early = True
            break
    if not np.isfinite(le_loss):
        raise PersonalizationError(f"local-expert training diverged (loss {le_loss})",
                                   hint="lower personalize.le_learning_rate, or check the samples for mislabelled "
                                        "or blank images; the previous personalization stays in use")

    # Gating Network: balanced batches of user (1) and replay (0) features,
    # a third of the replay held out to calibrate the threshold.
    order = rng.permutation(n_replay)
    held_out, kept = n_user + order[: n_replay // 3], n_user + order[n_replay // 3:]
    gn = backend.trainer(bundle, "gating_network")
    gn.set_learning_rate(cfg.gn_learning_rate)
    half = max(1, min(cfg.batch_size // 2, n_user, len(kept)))
    target = np.concatenate([np.ones(half, np.int64), np.zeros(half, np.int64)])  # 1 = LE should answer
    gn_loss = float("nan")
    report_every = max(1, cfg.gn_steps // 20)
    gn_steps = 0
    gn_rows = np.concatenate([rng.integers(0, n_user, (cfg.gn_steps, half)),
                              kept[rng.integers(0, len(kept), (cfg.gn_steps, half))]], axis=1)
    for step in range(cfg.gn_steps):
        rows = gn_rows[step]
        gn_loss = gn.step(gn_table.take(rows, axis=0), target)
        gn_steps += 1
        if (step + 1) % report_every == 0 or step + 1 == cfg.gn_steps:
            say("gating network", step + 1, cfg.gn_steps)
    if not np.isfinite(gn_loss):
        raise PersonalizationError(f"gating-network training diverged (loss {gn_loss})",
                                   hint="lower personalize.gn_learning_rate; the previous personalization stays in use")
    train_seconds = time.perf_counter() - le_started
    gn_model = pack_weights(gn.weights())
    threshold = float(manifest.gating_network.threshold)
    gn_part = backend.load_trained(bundle, "gating_network", gn_model)
    if len(held_out):
        generic_scores = gate_probability(gn_part, gn_table[held_out])
        threshold = float(min(0.99, max(threshold, np.quantile(generic_scores, 1.0 - cfg.gate_generic_share))))

    le_model = pack_weights(le.weights())
    n = len(labels)  # the originals are the first rows of the tables (augmented copies follow)
    le_part = backend.load_trained(bundle, "local_expert", le_model)
    learned = what_was_learned(labels, logits_all[:n], le_part(le_table[:n], logits_all[:n]),
                               gate_probability(gn_part, gn_table[:n]) > threshold, bundle.labels)
    report = {
        "n_samples": int(len(labels)), "n_training_inputs": int(n_user), "augment_copies": copies,
        "replay": int(n_replay), "le_epochs": le_epochs,
        "le_steps": le_steps, "le_loss": float(le_loss), "gn_steps": gn_steps,
        "gn_loss": float(gn_loss), "gate_threshold": threshold, "stopped_early": stopped_early,
        "backend": backend.name, "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(train_seconds, 4),  # LE's and GN's steps, batches included; no GE, no calibration
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "learned": learned,
    }
    return TrainedMixture(le_model, gn_model, threshold, report)


def what_was_learned(labels: np.ndarray, ge_logits: np.ndarray, le_logits: np.ndarray, use_le: np.ndarray,
                     names: list[str]) -> dict:
    """What the personalization changed on the user's own samples, for the report.

    The user should learn from it whether personalizing was worth it: how
    many of their samples GE misread and the mixture now reads right (or the
    reverse), which labels they gave no samples of, and whether GE already
    read them all. Labels without samples matter: LE learns that the user's
    hand means one of the labels it saw, and on real writers with only
    labels 0-4 given, their 5-9 fell from about 0.85 with GE to 0.72
    (docs/DESIGN.md), so the report asks for samples of every label.
    Measured on the samples LE trained on, so it shows what LE learned, not
    how it generalises: ``device evaluate`` on other samples does that."""
    ge_right = ge_logits.argmax(axis=1) == labels
    mixture = np.where(use_le, le_logits.argmax(axis=1), ge_logits.argmax(axis=1))
    right = mixture == labels
    per_label = {}
    for index in np.unique(labels):
        rows = labels == index
        per_label[names[index]] = {"samples": int(rows.sum()), "ge_right": int(ge_right[rows].sum()),
                                   "personalized_right": int(right[rows].sum())}
    return {
        "ge_accuracy": float(ge_right.mean()),
        "personalized_accuracy": float(right.mean()),
        "fixed": int((right & ~ge_right).sum()),    # GE misread, the mixture reads right
        "broken": int((ge_right & ~right).sum()),   # GE read right, the mixture misreads
        "routed_to_le": float(use_le.mean()),
        "labels": per_label,
        "labels_without_samples": [name for i, name in enumerate(names) if not (labels == i).any()],
    }


def describe_learning(learned: dict) -> str:
    """One or two sentences for a person, from ``what_was_learned``'s dict."""
    n = sum(v["samples"] for v in learned["labels"].values())
    text = (f"on your {n} samples: GE alone read {learned['ge_accuracy']:.0%}, personalized "
            f"{learned['personalized_accuracy']:.0%} ({learned['fixed']} fixed, {learned['broken']} newly wrong; "
            f"LE answers {learned['routed_to_le']:.0%} of them)")
    if learned["fixed"] == 0 and learned["ge_accuracy"] == 1.0:
        text += ". GE already read every sample right, so there was little to learn"
    missing = learned["labels_without_samples"]
    if missing:
        text += (f". No samples of {', '.join(map(repr, missing))}: LE learned only your other labels and may "
                 "now read your samples of these worse than GE did; add samples of every label you use")
    return text


@dataclass
class Routed:
    logits: np.ndarray
    gate: np.ndarray        # probability that LE should answer (0 where not personalized)
    use_le: np.ndarray      # bool per input


def route(ge_logits: np.ndarray, le_features: np.ndarray, gn_features: np.ndarray, le: TrainedPart | None,
          gn: TrainedPart | None, threshold: float) -> Routed:
    if le is None or gn is None:
        zeros = np.zeros(len(ge_logits), dtype=np.float32)
        return Routed(ge_logits, zeros, zeros.astype(bool))
    gate = gate_probability(gn, gn_features)
    use_le = gate > threshold
    logits = ge_logits.copy()
    if use_le.any():
        logits[use_le] = le(le_features[use_le], ge_logits[use_le])
    return Routed(logits, gate, use_le)
