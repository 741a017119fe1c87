/**
 * The mixture of experts on the device, a port of the Python runtime's
 * `device/mixture.py`: the same augmentation (`modalities.ts`), batches,
 * replay, gate calibration and routing, drawn from the same NumPy random
 * stream (`rng.ts`), so that the same samples and seed train the same LE and
 * GN in Python and here.
 *
 * - LE is trained on the user's samples (plus augmented copies while the set
 *   is small) mixed with replayed generic samples labelled by GE itself; GE's
 *   outputs on the replay come with the bundle.
 * - GN learns user samples (1) against two thirds of the replay (0); its
 *   threshold is raised until at most `gate_generic_share` of the held-out
 *   third would go to LE. LE answers above the threshold, else GE.
 *
 * Float32 arithmetic is reproduced with Math.fround where NumPy computes in
 * float32, so jittered pixels match Python's (rare 1-level differences in
 * rounding aside), and windows and clips to float32 rounding.
 */

import { BundleError, PersonalizationError } from "./errors.js";
import type { Bundle } from "./bundle.js";
import type { PersonalizeConfig, ProgressFn } from "./config.js";
import { argmax, ForwardPart, gateFromLogits, gather, type GlobalExpert, type ProgramOptions } from "./programs.js";
import { StepTrainer } from "./trainer.js";
import { parseNpz, type NpyArray } from "./npy.js";
import { augment } from "./augment.js";
import { modalityOf, sampleSize, type Samples } from "./modalities.js";
import { roundHalfEven } from "./preprocess.js";
import { NumpyRandom } from "./rng.js";

export function augmentedCopies(cfg: PersonalizeConfig, nSamples: number): number {
  return Math.trunc(Math.min(cfg.augment_copies, Math.max(0, Math.floor(cfg.augment_until / Math.max(1, nSamples)) - 1)));
}

export function leEpochsFor(cfg: PersonalizeConfig, nInputs: number): number {
  const stepsPerEpoch = Math.ceil(nInputs / Math.min(cfg.batch_size, nInputs));
  return Math.trunc(Math.min(cfg.le_epochs, Math.max(1, Math.floor(cfg.le_max_steps / stepsPerEpoch))));
}

/**
 * `np.quantile(values, q)` of float32 values: linear interpolation with
 * NumPy's lerp, in float32 as NumPy 2 computes it (a Python float `q` is a
 * weak scalar), so the calibrated threshold is Python's to the bit.
 */
export function quantile(values: Float32Array, q: number): number {
  const f = Math.fround;
  const sorted = Float32Array.from(values).sort();
  const index = q * (sorted.length - 1);
  const below = Math.floor(index);
  const above = Math.min(below + 1, sorted.length - 1);
  const t = index - below; // NumPy 2 keeps the weight in float64 and casts it, and 1 - it, to float32
  const a = sorted[below];
  const b = sorted[above];
  const diff = f(b - a);
  return t >= 0.5 ? f(b - f(diff * f(1 - t))) : f(a + f(diff * f(t)));
}

export interface TrainedMixture {
  le: Float32Array; // LE's flat parameters (manifest order)
  gn: Float32Array;
  threshold: number;
  report: Record<string, unknown>;
}

function now(): number {
  return (globalThis.performance ?? Date).now() / 1000;
}

/**
 * Hand control back to the event loop every ~50 ms of training: a page that
 * personalizes on its main thread keeps painting (the progress bar moves) and
 * answering input. onnxruntime's runs settle without yielding to the page.
 * Costs a timer tick per 50 ms, about 1 %.
 */
function breather(): () => Promise<void> {
  let last = now();
  return async () => {
    if (now() - last < 0.05) return;
    await new Promise((resolve) => setTimeout(resolve, 0));
    last = now();
  };
}

/** Train LE and GN on the user's samples (N of the bundle's modality) and label indices; returns their weights and the gate threshold. */
export async function trainMixture(bundle: Bundle, ge: GlobalExpert, options: ProgramOptions, images: Samples,
                                   labels: Int32Array, cfg: PersonalizeConfig, progress?: ProgressFn): Promise<TrainedMixture> {
  const started = now();
  const deadline = started + cfg.max_seconds;
  const breathe = breather();
  const say: ProgressFn = progress ?? (() => {});
  const manifest = bundle.manifest;
  const leTap = manifest.local_expert.feature_tap;
  const gnTap = manifest.gating_network.feature_tap;
  const rng = new NumpyRandom(cfg.seed);
  const n = labels.length;

  const copies = augmentedCopies(cfg, n);
  // One table of GE's outputs: the user's inputs (augmented copies after the originals), then the replay samples.
  const modality = modalityOf(manifest.input);
  const inputs = augment(manifest.input, images, n, copies, rng);
  const nUser = n * (copies + 1);
  const taps = [...new Set([leTap, gnTap])];
  const carried = replayOutputs(bundle);
  let geOut: Awaited<ReturnType<GlobalExpert["run"]>>;
  let nReplay: number;
  if (carried) {   // GE's outputs on the replay, computed at export: GE runs on the user's inputs alone
    nReplay = carried.count;
    say("features", 0, nUser + nReplay);
    const user = await ge.run(inputs, nUser, taps, undefined, (done) => say("features", done, nUser + nReplay), breathe);
    geOut = joinOutputs(user, carried, leTap, gnTap, nUser);
  } else {
    const replay = replaySamples(bundle);
    nReplay = replay.count;
    const all = modality.dtype === "uint8" ? new Uint8Array(inputs.length + replay.samples.length)
      : new Float32Array(inputs.length + replay.samples.length);
    all.set(inputs);
    all.set(replay.samples, inputs.length);
    say("features", 0, nUser + nReplay);
    geOut = await ge.run(all, nUser + nReplay, taps, undefined, (done, total) => say("features", done, total), breathe);
  }
  const classes = geOut.classes;
  const logitsAll = geOut.logits;
  const leTable = geOut.features[leTap];
  const gnTable = geOut.features[gnTap];
  const labelsAll = new Int32Array(nUser + nReplay);
  for (let c = 0; c <= copies; c++) labelsAll.set(labels, c * n);
  labelsAll.set(argmax(logitsAll, classes, nReplay, nUser), nUser);

  // Local Expert: user batches with replay mixed in at cfg.replay_weight.
  const le = await StepTrainer.open(bundle, "local_expert", options, [leTable.dim, classes]);
  let gn: StepTrainer;
  try {
    gn = await StepTrainer.open(bundle, "gating_network", options, [gnTable.dim]);
  } catch (error) {
    await le.release();
    throw error;
  }
  try {
    le.setLearningRate(cfg.le_learning_rate);
    const perBatch = Math.min(cfg.batch_size, nUser);
    const replayPerBatch = roundHalfEven(perBatch * cfg.replay_weight);
    const stepsPerEpoch = Math.ceil(nUser / perBatch);
    const leEpochs = leEpochsFor(cfg, nUser);
    let leSteps = 0;
    let leLoss = NaN;
    let stoppedEarly = false;
    const leStarted = now();
    // Stop LE while GN's steps still fit in the budget: a GN step costs at most an LE step.
    const leMustStop = () => {
      const t = now();
      return t + (cfg.gn_steps * (t - leStarted)) / leSteps > deadline;
    };
    const rows = new Int32Array(perBatch + replayPerBatch);
    const rowLabels = new Int32Array(perBatch + replayPerBatch);
    for (let epoch = 0; epoch < leEpochs; epoch++) {
      const order = rng.permutation(nUser);
      const replayRows = rng.integers(0, nReplay, stepsPerEpoch * replayPerBatch);
      for (let k = 0; k < stepsPerEpoch; k++) {
        const users = order.subarray(k * perBatch, Math.min(nUser, (k + 1) * perBatch));
        rows.set(users);
        for (let j = 0; j < replayPerBatch; j++) rows[users.length + j] = nUser + replayRows[k * replayPerBatch + j];
        const used = rows.subarray(0, users.length + replayPerBatch);
        for (let j = 0; j < used.length; j++) rowLabels[j] = labelsAll[used[j]];
        leLoss = await le.step([leTable.data, logitsAll], used, rowLabels.subarray(0, used.length));
        leSteps++;
        await breathe();
        if (k % 64 === 63 && leMustStop()) {
          stoppedEarly = true;
          break;
        }
      }
      say("local expert", epoch + 1, leEpochs);
      if (stoppedEarly || (epoch + 1 < leEpochs && leMustStop())) {
        stoppedEarly = true;
        break;
      }
    }
    if (!Number.isFinite(leLoss)) {
      throw new PersonalizationError(`local-expert training diverged (loss ${leLoss})`,
        "lower personalize.le_learning_rate, or check the samples for mislabelled or blank images; the previous personalization stays in use");
    }

    // Gating Network: balanced batches of user (1) and replay (0) features, a third of the replay held out.
    const replayOrder = rng.permutation(nReplay);
    const third = Math.floor(nReplay / 3);
    const heldOut = Array.from(replayOrder.subarray(0, third), (i) => nUser + i);
    const kept = Array.from(replayOrder.subarray(third), (i) => nUser + i);
    gn.setLearningRate(cfg.gn_learning_rate);
    const half = Math.max(1, Math.min(Math.floor(cfg.batch_size / 2), nUser, kept.length));
    const target = new Int32Array(2 * half);
    target.fill(1, 0, half);
    let gnLoss = NaN;
    const reportEvery = Math.max(1, Math.floor(cfg.gn_steps / 20));
    const userPicks = rng.integers(0, nUser, cfg.gn_steps * half);
    const replayPicks = rng.integers(0, kept.length, cfg.gn_steps * half);
    const gnRows = new Int32Array(2 * half);
    for (let step = 0; step < cfg.gn_steps; step++) {
      for (let j = 0; j < half; j++) {
        gnRows[j] = userPicks[step * half + j];
        gnRows[half + j] = kept[replayPicks[step * half + j]];
      }
      gnLoss = await gn.step([gnTable.data], gnRows, target);
      await breathe();
      if ((step + 1) % reportEvery === 0 || step + 1 === cfg.gn_steps) say("gating network", step + 1, cfg.gn_steps);
    }
    if (!Number.isFinite(gnLoss)) {
      throw new PersonalizationError(`gating-network training diverged (loss ${gnLoss})`,
        "lower personalize.gn_learning_rate; the previous personalization stays in use");
    }
    const trainSeconds = now() - leStarted;
    const gnParams = gn.params;
    const leParams = le.params;
    const gnPart = await ForwardPart.open(bundle, "gating_network", options, gnParams);
    let lePart: ForwardPart;
    try {
      lePart = await ForwardPart.open(bundle, "local_expert", options, leParams);
    } catch (error) {
      await gnPart.release();
      throw error;
    }
    let threshold = Number(manifest.gating_network.threshold ?? 0.5);
    try {
      if (heldOut.length) {
        const generic = gateFromLogits(await gnPart.run([gather(gnTable, heldOut)], heldOut.length));
        threshold = Math.min(0.99, Math.max(threshold, quantile(generic, 1 - cfg.gate_generic_share)));
      }
      // the originals are the tables' first n rows
      const first = (t: { data: Float32Array; dim: number }) => ({ data: t.data.subarray(0, n * t.dim), dim: t.dim });
      const leLogits = await lePart.run([first(leTable), { data: logitsAll.subarray(0, n * classes), dim: classes }], n);
      const gate = gateFromLogits(await gnPart.run([first(gnTable)], n));
      const useLe = Array.from(gate, (g) => g > Math.fround(threshold));
      const learned = whatWasLearned(labels, logitsAll.subarray(0, n * classes), leLogits, useLe, classes, bundle.labels);
      const report = {
        n_samples: n, n_training_inputs: nUser, augment_copies: copies, replay: nReplay, le_epochs: leEpochs,
        le_steps: leSteps, le_loss: leLoss, gn_steps: cfg.gn_steps, gn_loss: gnLoss, gate_threshold: threshold,
        stopped_early: stoppedEarly, backend: "onnxruntime-js", seconds: round3(now() - started),
        train_seconds: round3(trainSeconds), config: { ...cfg }, learned,
      };
      return { le: leParams, gn: gnParams, threshold, report };
    } finally {
      await gnPart.release();
      await lePart.release();
    }
  } finally {
    await le.release();
    await gn.release();
  }
}

const round3 = (x: number) => Math.round(x * 1000) / 1000;

/** The bundle's replay samples (an older bundle without GE's outputs on them): glyphs, windows or clips. */
function replaySamples(bundle: Bundle): { samples: Samples; count: number } {
  const file = bundle.manifest.replay.file;
  const x = parseNpzCached(bundle, file).x;
  const spec = bundle.manifest.input;
  const modality = modalityOf(spec);
  const size = sampleSize(spec);
  const type = modality.dtype === "uint8" ? Uint8Array : Float32Array;
  if (!x || !(x.data instanceof type) || x.shape.length < 2 || x.shape.slice(1).reduce((a, b) => a * b, 1) !== size) {
    throw new BundleError(`${file} does not hold ${modality.dtype} replay samples of the input's size`, "the bundle is damaged; re-export it");
  }
  return { samples: x.data, count: x.shape[0] };
}

interface ReplayOutputs { count: number; logits: NpyArray; le: NpyArray; gn: NpyArray; file: string }

/**
 * GE's logits and LE's and GN's taps on the replay, as export computed them with the bundle's ONNX GE
 * (`replay.outputs.onnx`; the Python runtime reads the same file): GE is frozen, so running it on the
 * replay again would give the same numbers. Null for a bundle from before they were shipped.
 */
function replayOutputs(bundle: Bundle): ReplayOutputs | null {
  const file = bundle.manifest.replay.outputs?.onnx;
  if (!file) return null;
  const archive = parseNpzCached(bundle, file);
  const count = archive.logits?.shape[0];
  if (!(count >= 1) || count !== bundle.manifest.replay.count) {
    throw new BundleError(`${file} holds GE's outputs on ${count ?? "no"} replay samples, the manifest says ${bundle.manifest.replay.count}`,
      "the bundle is damaged or was not written by edgetailor; re-export it");
  }
  for (const key of ["logits", "le", "gn"]) {
    const a = archive[key];
    if (!a || !(a.data instanceof Float32Array) || a.shape[0] !== count || !a.data.every(Number.isFinite)) {
      throw new BundleError(`${file}: ${key} is missing or not finite float32 rows, one per replay sample`,
        "the bundle is damaged or was not written by edgetailor; re-export it");
    }
  }
  return { count, logits: archive.logits, le: archive.le, gn: archive.gn, file };
}

/** The user's GE outputs followed by the replay's. */
function joinOutputs(user: Awaited<ReturnType<GlobalExpert["run"]>>, replay: ReplayOutputs, leTap: string, gnTap: string,
                     nUser: number): Awaited<ReturnType<GlobalExpert["run"]>> {
  const rows = nUser + replay.count;
  const join = (mine: Float32Array, theirs: NpyArray, dim: number, what: string) => {
    if (theirs.data.length !== replay.count * dim) {
      throw new BundleError(`${replay.file}: ${what} holds ${theirs.data.length / replay.count} values per sample, GE gives ${dim}`,
        "the bundle is damaged or was not written by edgetailor; re-export it");
    }
    const out = new Float32Array(rows * dim);
    out.set(mine.subarray(0, nUser * dim));
    out.set(theirs.data as Float32Array, nUser * dim);
    return out;
  };
  const features: Record<string, { data: Float32Array; dim: number }> = {};
  for (const [tap, key] of [[leTap, "le"], [gnTap, "gn"]] as const) {
    const dim = user.features[tap].dim;
    features[tap] = { data: join(user.features[tap].data, replay[key], dim, key), dim };
  }
  return { classes: user.classes, logits: join(user.logits, replay.logits, user.classes, "logits"), features };
}

const npzCache = new WeakMap<Bundle, Map<string, Record<string, NpyArray>>>();
function parseNpzCached(bundle: Bundle, file: string): Record<string, NpyArray> {
  let files = npzCache.get(bundle);
  if (!files) npzCache.set(bundle, (files = new Map()));
  let parsed = files.get(file);
  if (!parsed) {
    parsed = parseNpz(bundle.file(file), file);
    files.set(file, parsed);
  }
  return parsed;
}

export interface Learned {
  ge_accuracy: number;
  personalized_accuracy: number;
  fixed: number;
  broken: number;
  routed_to_le: number;
  labels: Record<string, { samples: number; ge_right: number; personalized_right: number }>;
  labels_without_samples: string[];
}

/** What the personalization changed on the user's own samples (`mixture.what_was_learned`). */
export function whatWasLearned(labels: Int32Array, geLogits: Float32Array, leLogits: Float32Array, useLe: boolean[],
                               classes: number, names: string[]): Learned {
  const n = labels.length;
  const ge = argmax(geLogits, classes, n);
  const lePred = argmax(leLogits, classes, n);
  let geRight = 0, right = 0, fixed = 0, broken = 0, routed = 0;
  const perLabel: Learned["labels"] = {};
  for (let i = 0; i < n; i++) {
    const g = ge[i] === labels[i];
    const r = (useLe[i] ? lePred[i] : ge[i]) === labels[i];
    geRight += +g;
    right += +r;
    fixed += +(r && !g);
    broken += +(g && !r);
    routed += +useLe[i];
    const entry = (perLabel[names[labels[i]]] ??= { samples: 0, ge_right: 0, personalized_right: 0 });
    entry.samples++;
    entry.ge_right += +g;
    entry.personalized_right += +r;
  }
  const sorted: Learned["labels"] = {};
  for (const name of names) if (perLabel[name]) sorted[name] = perLabel[name];
  return {
    ge_accuracy: geRight / n, personalized_accuracy: right / n, fixed, broken, routed_to_le: routed / n,
    labels: sorted, labels_without_samples: names.filter((name) => !perLabel[name]),
  };
}

