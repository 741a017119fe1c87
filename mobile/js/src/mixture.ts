/**
 * The mixture of experts on the device, a port of the Python runtime's
 * `device/mixture.py`: the same jitter, batches, replay, gate calibration
 * and routing, drawn from the same NumPy random stream (`rng.ts`), so that
 * the same samples and seed train the same LE and GN in Python and here.
 *
 * - LE is trained on the user's samples (plus jittered copies while the set
 *   is small) mixed with replayed generic glyphs labelled by GE itself.
 * - GN learns user samples (1) against two thirds of the replay (0); its
 *   threshold is raised until at most `gate_generic_share` of the held-out
 *   third would go to LE. LE answers above the threshold, else GE.
 *
 * Float32 arithmetic is reproduced with Math.fround where NumPy computes in
 * float32, so jittered pixels match Python's (rare 1-level differences in
 * rounding aside).
 */

import { PersonalizationError, SampleError } from "./errors.js";
import type { Bundle } from "./bundle.js";
import type { PersonalizeConfig, ProgressFn } from "./config.js";
import { argmax, ForwardPart, gateFromLogits, gather, type GlobalExpert, type ProgramOptions } from "./programs.js";
import { StepTrainer } from "./trainer.js";
import { parseNpz, type NpyArray } from "./npy.js";
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
 * The originals plus `copies` slightly rotated, scaled and shifted versions of
 * each (uint8 in and out): `mixture.jitter` with `imaging.affine_batch`.
 */
export function jitter(images: Uint8Array, n: number, h: number, w: number, copies: number, rng: NumpyRandom): Uint8Array {
  const total = n * copies;
  const rotation = rng.uniform(-6, 6, total);
  const scale = rng.uniform(0.95, 1.05, total);
  const translate = rng.uniform(-1, 1, total * 2);
  const pixels = h * w;
  const out = new Uint8Array(n * (copies + 1) * pixels);
  out.set(images.subarray(0, n * pixels));
  const f = Math.fround;
  const cy = f((h - 1) / 2);
  const cx = f((w - 1) / 2);
  const stride = w + 2;
  const padded = new Float32Array((h + 3) * stride); // a black border, and a spare row so every neighbour is in range
  for (let k = 0; k < total; k++) {
    const src = k % n;
    padded.fill(0);
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) padded[(r + 1) * stride + c + 1] = f(images[src * pixels + r * w + c] / 255);
    }
    const theta = rotation[k] * (Math.PI / 180);
    const cos = f(Math.cos(theta) / scale[k]);
    const sin = f(Math.sin(theta) / scale[k]);
    const msin = f(-sin);
    const ty = f(translate[2 * k]);
    const tx = f(translate[2 * k + 1]);
    const base = (n + k) * pixels;
    for (let r = 0; r < h; r++) {
      const dy = f(f(r - cy) - ty);
      for (let c = 0; c < w; c++) {
        const dx = f(f(c - cx) - tx);
        let rows = f(f(f(msin * dx) + f(cos * dy)) + cy);
        let cols = f(f(f(cos * dx) + f(sin * dy)) + cx);
        rows = Math.min(Math.max(rows, -1), h);
        cols = Math.min(Math.max(cols, -1), w);
        const r0 = Math.floor(rows);
        const c0 = Math.floor(cols);
        const fr = f(rows - r0);
        const fc = f(cols - c0);
        let index = (r0 + 1) * stride + c0 + 1;
        let top = padded[index];
        top = f(top + f(f(padded[index + 1] - top) * fc));
        index += stride;
        let bottom = padded[index];
        bottom = f(bottom + f(f(padded[index + 1] - bottom) * fc));
        top = f(top + f(f(bottom - top) * fr));
        const value = roundHalfEven(f(top * 255));
        out[base + r * w + c] = Math.min(255, Math.max(0, value));
      }
    }
  }
  return out;
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

/** Train LE and GN on the user's uint8 samples (N*H*W) and label indices; returns their weights and the gate threshold. */
export async function trainMixture(bundle: Bundle, ge: GlobalExpert, options: ProgramOptions, images: Uint8Array,
                                   labels: Int32Array, cfg: PersonalizeConfig, progress?: ProgressFn): Promise<TrainedMixture> {
  const started = now();
  const deadline = started + cfg.max_seconds;
  const breathe = breather();
  const say: ProgressFn = progress ?? (() => {});
  const manifest = bundle.manifest;
  const leTap = manifest.local_expert.feature_tap;
  const gnTap = manifest.gating_network.feature_tap;
  const [, h, w] = manifest.input.shape;
  const pixels = h * w;
  const rng = new NumpyRandom(cfg.seed);
  const n = labels.length;

  const copies = augmentedCopies(cfg, n);
  const replay = replayImages(bundle);
  // One table of GE's outputs: the user's inputs (jittered copies after the originals), then the replay glyphs.
  const jittered = jitter(images, n, h, w, copies, rng);
  const nUser = n * (copies + 1);
  const nReplay = replay.count;
  const all = new Uint8Array((nUser + nReplay) * pixels);
  all.set(jittered);
  all.set(replay.images, nUser * pixels);
  say("features", 0, nUser + nReplay);
  const taps = [...new Set([leTap, gnTap])];
  const geOut = await ge.run(all, nUser + nReplay, taps, 64, (done, total) => say("features", done, total), breathe);
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

function replayImages(bundle: Bundle): { images: Uint8Array; count: number } {
  const file = bundle.manifest.replay.file;
  const archive = parseNpzCached(bundle, file);
  const x = archive.x;
  const [, h, w] = bundle.manifest.input.shape;
  if (!x || !(x.data instanceof Uint8Array) || x.shape.length !== 3 || x.shape[1] !== h || x.shape[2] !== w) {
    throw new SampleError(`${file} does not hold uint8 replay glyphs of the input size`, "the bundle is damaged; re-export it");
  }
  return { images: x.data, count: x.shape[0] };
}

const npzCache = new WeakMap<Bundle, Record<string, NpyArray>>();
function parseNpzCached(bundle: Bundle, file: string): Record<string, NpyArray> {
  let parsed = npzCache.get(bundle);
  if (!parsed) {
    parsed = parseNpz(bundle.file(file), file);
    npzCache.set(bundle, parsed);
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

