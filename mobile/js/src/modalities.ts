/**
 * What kind of input a bundle's GE reads, and what depends on it: a port of
 * `toolkit/modalities.py`, one `Modality` per kind, registered in
 * `MODALITIES`.
 *
 * - `image`: 28x28 uint8 glyphs made by the bundle's preprocessing
 *   (`preprocess.ts`), augmented by a small affine warp.
 * - `timeseries`: float32 sensor windows (channels x length), taken as they
 *   are; augmented by jitter, per-channel scaling and a smooth time warp.
 * - `audio`: mono float32 clips (1 x length) at the bundle's sample rate; GE's
 *   program begins with the log-mel front-end. Augmented by a time shift,
 *   gain, noise at a random SNR, and SpecAugment-style time and frequency
 *   masks.
 *
 * This module is what an app loads at startup: each kind's shape and dtype,
 * its augmentation parameters (checked when a bundle opens), and how inputs
 * become samples. The augmentation itself is `augment.ts`, loaded with the
 * training code.
 */

import { BundleError, SampleError } from "./errors.js";
import type { InputSpec } from "./manifest.js";

/** Stored samples, N of them back to back: uint8 glyphs or float32 windows and clips. */
export type Samples = Uint8Array | Float32Array;

export type AugmentParams = Record<string, number | number[] | string>;

export interface Modality {
  readonly name: string;
  readonly dtype: "uint8" | "float32";
  readonly defaultAugment: AugmentParams;
  /** Why GE's input for one sample, as the manifest's input.shape gives it, is not this kind's ([1, H, W], [channels, length], [1, length]), or null. */
  checkShape(shape: number[]): string | null;
}

const isPositiveInt = (v: unknown): boolean => Number.isSafeInteger(v) && (v as number) > 0;

const IMAGE_AUGMENT: AugmentParams = { name: "affine-v1", rotation: 6.0, scale: 0.05, translate: 1.0 };

const image: Modality = {
  name: "image",
  dtype: "uint8",
  defaultAugment: IMAGE_AUGMENT,
  checkShape: (shape) => (shape.length === 3 && shape.every(isPositiveInt) && shape[0] === 1 ? null
    : "input.shape must be [1, H, W] (one grey channel)"),
};

const timeseries: Modality = {
  name: "timeseries",
  dtype: "float32",
  defaultAugment: { name: "sensor-v1", jitter: 0.03, scaling: 0.1, warp: 0.2, warp_knots: 4 },
  checkShape: (shape) => (shape.length === 2 && shape.every(isPositiveInt) && shape[1] >= 2 ? null
    : "input.shape must be [channels, length] for sensor windows"),
};

const audio: Modality = {
  name: "audio",
  dtype: "float32",
  defaultAugment: { name: "audio-v1", shift: 0.1, gain_db: 6.0, snr_db: [15.0, 35.0], time_mask: 0.08, freq_mask: 0.12 },
  checkShape: (shape) => (shape.length === 2 && shape[0] === 1 && isPositiveInt(shape[1]) && shape[1] >= 256 ? null
    : "input.shape must be [1, samples] for mono clips"),
};

export const MODALITIES: Record<string, Modality> = { image, timeseries, audio };

export function modalityOf(spec: InputSpec): Modality {
  const name = spec.modality ?? "image";
  const modality = MODALITIES[name];
  if (!modality) {
    throw new BundleError(`the bundle's input modality ${JSON.stringify(name)} is not one this SDK knows (${Object.keys(MODALITIES).join(", ")})`,
      "update @edgetailor/sdk, or re-export the bundle");
  }
  return modality;
}

/** The bundle's augmentation parameters, the modality's defaults for what it leaves out. */
export function augmentParams(spec: InputSpec): AugmentParams {
  return { ...modalityOf(spec).defaultAugment, ...(spec.augment ?? {}) };
}

const SHARES = ["shift", "time_mask", "freq_mask", "scale"]; // parts of the input: under 1

/**
 * Why the bundle's `input.augment` is not one its modality can apply, or null: `check_augment` in
 * `toolkit/modalities.py`, so a bad value is refused by name when the bundle opens, not as NaN copies
 * when the user personalizes.
 */
export function augmentProblem(spec: InputSpec): string | null {
  const modality = modalityOf(spec);
  const defaults = modality.defaultAugment;
  const given = spec.augment;
  if (given === undefined || given === null) return null;
  const params = augmentParams(spec);
  if (modality.name === "image") {
    const same = Object.keys(params).every((k) => JSON.stringify(params[k]) === JSON.stringify(defaults[k]));
    return same ? null : `a glyph bundle's augmentation is fixed (${JSON.stringify(defaults)}); input.augment changes it`;
  }
  const unknown = Object.keys(given).filter((k) => !(k in defaults)).sort();
  if (unknown.length) return `input.augment has key(s) ${unknown.join(", ")} that ${modality.name} augmentation lacks`;
  if (params.name !== defaults.name) return `input.augment names ${JSON.stringify(params.name)}; ${modality.name} inputs are augmented by ${JSON.stringify(defaults.name)}`;
  for (const [key, value] of Object.entries(params)) {
    if (key === "name") continue;
    const pair = Array.isArray(defaults[key]);
    const values = pair ? value : [value];
    const ok = Array.isArray(values) && (!pair || values.length === (defaults[key] as number[]).length)
      && values.every((v) => typeof v === "number" && Number.isFinite(v) && v >= 0);
    if (!ok) return `input.augment.${key} must be ${pair ? "a pair of" : "a"} finite number(s) >= 0 like ${JSON.stringify(defaults[key])}, got ${JSON.stringify(value)}`;
  }
  const share = SHARES.find((k) => k in params && (params[k] as number) >= 1);
  if (share) return `input.augment.${share} is a share of the input and must be under 1`;
  if ("warp" in params && (params.warp as number) >= 0.5) return "input.augment.warp is a share of the input and must be under 0.5";
  return null;
}

/** Values in one stored sample. */
export function sampleSize(spec: InputSpec): number {
  return spec.modality && spec.modality !== "image" ? spec.shape.reduce((a, b) => a * b, 1) : spec.shape[1] * spec.shape[2];
}

// Inputs as an app has them -> samples ------------------------------------------------------------

export type NumberArray = Float32Array | Float64Array | Int16Array | Int32Array | Uint8Array | Uint16Array | number[];

const CLIPPED_SHARE = 0.01; // of samples at full scale: a clipped recording (toolkit/audio.py)
const SILENT_PEAK = 1e-3;   // a clip whose loudest sample is below this holds no sound

/**
 * Sensor windows -> float32 samples: N windows of the bundle's channels x length, back to back, or a
 * list of windows. A window of another length or with NaN is refused (cutting or padding it would
 * change what it means), as `TimeSeriesModality.prepare` does.
 */
export function prepareWindows(windows: NumberArray | NumberArray[], spec: InputSpec,
                               checkCount: (count: number) => void = () => {}): { samples: Float32Array; count: number } {
  const [channels, length] = spec.shape;
  const size = channels * length;
  const parts = Array.isArray(windows) && windows.length > 0 && typeof windows[0] !== "number"
    ? windows as NumberArray[] : [windows as NumberArray];
  const flat = parts.length === 1 ? parts[0] : null;
  if (!flat) {
    const bad = parts.findIndex((w) => w.length !== size);
    if (bad >= 0) {
      throw new SampleError(`window ${bad} holds ${parts[bad].length} values; each must be ${channels} channel(s) x ${length} steps (${size})`,
        `cut your recordings into windows of exactly ${length} steps with ${channels} channel(s), as the model was trained`);
    }
  } else if (flat.length === 0 || flat.length % size !== 0) {
    throw new SampleError(`${flat.length} values are not a whole number of windows of ${channels} channel(s) x ${length} steps`,
      `cut your recordings into windows of exactly ${length} steps with ${channels} channel(s), as the model was trained`);
  }
  const count = flat ? flat.length / size : parts.length;
  checkCount(count);
  const samples = new Float32Array(count * size);
  if (flat) samples.set(flat);
  else parts.forEach((w, i) => samples.set(w, i * size));
  const nonFinite: number[] = [];
  for (let i = 0; i < count; i++) {
    if (!samples.subarray(i * size, (i + 1) * size).every(Number.isFinite)) nonFinite.push(i);
  }
  if (nonFinite.length) {
    throw new SampleError(`${nonFinite.length} window(s) hold NaN or infinite values (the first is window ${nonFinite[0]})`,
      "drop or repair those windows; a gap in a recording is not a value");
  }
  return { samples, count };
}

/**
 * Clips -> float32 samples of the bundle's length: a list of mono clips of any length (Float32Array in
 * [-1, 1] or Int16Array), each centred in silence or cut to its loudest stretch (`audio.fit_length`),
 * or N clips of exactly the bundle's length back to back. Empty, silent, clipped and non-finite clips
 * are refused by number, as `AudioModality.prepare` does.
 */
export function prepareClips(clips: NumberArray | NumberArray[], spec: InputSpec,
                             checkCount: (count: number) => void = () => {}): { samples: Float32Array; count: number } {
  const length = spec.shape[1];
  let list: NumberArray[];
  if (Array.isArray(clips) && clips.length > 0 && typeof clips[0] !== "number") list = clips as NumberArray[];
  else {
    const flat = clips as NumberArray;
    if (flat.length === 0 || flat.length % length !== 0) {
      throw new SampleError(`${flat.length} values are not a whole number of ${length}-sample clips`,
        "pass a list of clips (one typed array each) to have each fitted to the bundle's length");
    }
    checkCount(flat.length / length);
    list = Array.from({ length: flat.length / length }, (_, i) => flat.slice(i * length, (i + 1) * length) as NumberArray);
  }
  checkCount(list.length);
  const samples = new Float32Array(list.length * length);
  list.forEach((clip, i) => {
    const scaled = Float32Array.from(clip as ArrayLike<number>, (v) => (clip instanceof Int16Array ? v / 32768 : v));
    checkClip(scaled, `clip ${i}`);
    samples.set(fitLength(scaled, length), i * length);
  });
  return { samples, count: list.length };
}

function checkClip(clip: Float32Array, where: string): void {
  if (clip.length === 0) throw new SampleError(`${where} is empty (no samples)`, "record the clip again");
  let peak = 0;
  let full = 0;
  for (const v of clip) {
    if (!Number.isFinite(v)) throw new SampleError(`${where} holds NaN or infinite values`);
    const a = Math.abs(v);
    peak = Math.max(peak, a);
    full += +(a >= 0.999);
  }
  if (peak > 1 + 1e-6) {
    throw new SampleError(`${where} goes to ${peak.toFixed(2)}; audio samples lie in [-1, 1]`,
      "scale float audio to [-1, 1], or give int16 samples");
  }
  if (peak < SILENT_PEAK) throw new SampleError(`${where} is silent (loudest sample ${peak.toExponential(1)})`, "record the clip again");
  if (full / clip.length > CLIPPED_SHARE) {
    throw new SampleError(`${where} is clipped: ${((100 * full) / clip.length).toFixed(1)}% of its samples are at full scale`,
      "record it again at a lower gain; clipping smears the spectrum the model hears");
  }
}

/** `audio.fit_length`: a short clip centred in silence, a long one cut to its loudest stretch (differences of the running energy, as NumPy's cumsum makes them). */
function fitLength(clip: Float32Array, length: number): Float32Array {
  if (clip.length <= length) {
    const out = new Float32Array(length);
    out.set(clip, Math.floor((length - clip.length) / 2));
    return out;
  }
  const energy = new Float64Array(clip.length + 1);
  for (let t = 0; t < clip.length; t++) energy[t + 1] = energy[t] + clip[t] * clip[t];
  let start = 0;
  let best = -Infinity;
  for (let s = 0; s + length <= clip.length; s++) {
    const window = energy[s + length] - energy[s];
    if (window > best) {
      best = window;
      start = s;
    }
  }
  return clip.slice(start, start + length);
}
