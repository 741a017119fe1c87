/**
 * How personalization augments a user's few samples, by the bundle's
 * modality: a port of the `augment_chunks` of `toolkit/modalities.py`.
 * Loaded with the training code (`mixture.ts`), not at startup.
 *
 * - `image`: a small affine warp (rotation, scale, shift), uint8 in and out.
 * - `timeseries`: jitter (Gaussian noise scaled to each channel's spread),
 *   per-channel scaling and a smooth time warp through moved knots.
 * - `audio`: a time shift, gain, noise at a random SNR, and SpecAugment-style
 *   time and frequency masks (the band zeroed in the clip's spectrum).
 *
 * Every random number comes from the same NumPy stream in the same order as
 * Python (`rng.ts`), so a phone and the Python runtime make the same copies
 * of the same samples: glyphs to the pixel (rare rounding ties aside),
 * windows and clips to about 1e-6 (a window's spread and a clip's spectrum
 * are summed in another order than NumPy's).
 */

import type { InputSpec } from "./manifest.js";
import { irfft, rfft } from "./fft.js";
import { augmentParams, modalityOf, type AugmentParams, type Samples } from "./modalities.js";
import { roundHalfEven } from "./preprocess.js";
import type { NumpyRandom } from "./rng.js";

/** The originals, then `copies` augmented versions of each (copy k of sample i at row n * (1 + k) + i). */
type Augmentation = (samples: Samples, n: number, copies: number, rng: NumpyRandom, params: AugmentParams,
                     shape: number[]) => Samples;

const f = Math.fround;

/** The glyphs' affine jitter (`imaging.affine_batch`), uint8 in and out, in NumPy's float32 steps. */
export function jitter(images: Uint8Array, n: number, h: number, w: number, copies: number, rng: NumpyRandom,
                       params: AugmentParams): Uint8Array {
  const total = n * copies;
  const [rot, sc, tr] = [params.rotation, params.scale, params.translate] as number[];
  const rotation = rng.uniform(-rot, rot, total);
  const scale = rng.uniform(1 - sc, 1 + sc, total);
  const translate = rng.uniform(-tr, tr, total * 2);
  const pixels = h * w;
  const out = new Uint8Array(n * (copies + 1) * pixels);
  out.set(images.subarray(0, n * pixels));
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

const image: Augmentation = (samples, n, copies, rng, params, shape) =>
  jitter(samples as Uint8Array, n, shape[1], shape[2], copies, rng, params);

/**
 * `np.interp(x, xp, fp)` for increasing `xp`, as numpy computes it (compiled_base.c): exact at the
 * knots, `slope * (x - xp[j]) + fp[j]` between them, the end values beyond.
 */
function interp(x: number, xp: ArrayLike<number>, fp: ArrayLike<number>): number {
  const last = xp.length - 1;
  if (x <= xp[0]) return fp[0];
  if (x >= xp[last]) return fp[last];
  let lo = 0;
  let hi = last;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xp[mid] <= x) lo = mid;
    else hi = mid;
  }
  if (xp[lo] === x) return fp[lo];
  const slope = (fp[lo + 1] - fp[lo]) / (xp[lo + 1] - xp[lo]);
  return slope * (x - xp[lo]) + fp[lo];
}

/** Python's draw order: the scales (copies x channels), the noise (copies x channels x length), the knot shifts. */
const timeseries: Augmentation = (samples, n, copies, rng, params, shape) => {
  const [channels, length] = shape;
  const size = channels * length;
  const total = n * copies;
  const knots = Math.trunc(Number(params.warp_knots));
  const scaling = f(Number(params.scaling));
  const jitterScale = f(Number(params.jitter));
  const scales = rng.standardNormalF32(total * channels).map((z) => f(1 + f(scaling * z)));
  const noise = rng.standardNormalF32(total * size);
  const shifts = rng.uniform(-Number(params.warp), Number(params.warp), total * knots);
  const x = samples as Float32Array;
  const out = new Float32Array((n + total) * size);
  out.set(x.subarray(0, n * size));
  // each window's spread per channel (np.std, float32)
  const spread = new Float32Array(n * channels);
  for (let row = 0; row < n * channels; row++) {
    const series = x.subarray(row * length, (row + 1) * length);
    let mean = 0;
    for (const v of series) mean += v;
    mean = f(mean / length);
    let squares = 0;
    for (const v of series) squares += f(v - mean) ** 2;
    spread[row] = f(Math.sqrt(f(squares / length)));
  }
  const step = (length - 1) / (knots + 1);
  const anchors = Float64Array.from({ length: knots + 2 }, (_, k) => k * step);
  const grid = Float64Array.from({ length }, (_, t) => t);
  const moved = new Float64Array(knots + 2);
  const where = new Float64Array(length);
  for (let j = 0; j < total; j++) {
    const src = j % n;
    moved.set(anchors);
    for (let k = 1; k <= knots; k++) moved[k] += shifts[j * knots + k - 1] * step;
    for (let t = 0; t < length; t++) where[t] = interp(t, anchors, moved); // output step -> source time
    for (let c = 0; c < channels; c++) {
      const series = x.subarray((src * channels + c) * length, (src * channels + c + 1) * length);
      const base = (n + j) * size + c * length;
      const sc = scales[j * channels + c];
      const sd = spread[src * channels + c];
      for (let t = 0; t < length; t++) {
        const warped = f(f(interp(where[t], grid, series)) * sc);
        out[base + t] = f(warped + f(f(noise[(j * channels + c) * length + t] * jitterScale) * sd));
      }
    }
  }
  return out;
};

/** Python's draw order: shifts, gains, SNRs, time-mask starts, band starts, then each copy's noise in turn. */
const audio: Augmentation = (samples, n, copies, rng, params, shape) => {
  const length = shape[1];
  const total = n * copies;
  const most = Math.trunc(Number(params.shift) * length);
  const shifts = rng.integers(-most, most + 1, total);
  const gainDb = Number(params.gain_db);
  const gains = rng.uniform(-gainDb, gainDb, total).map((db) => 10 ** (db / 20));
  const [low, high] = params.snr_db as number[];
  const snr = rng.uniform(low, high, total);
  const mask = Math.trunc(Number(params.time_mask) * length);
  const maskStart = rng.integers(0, length - mask + 1, total);
  const bins = Math.floor(length / 2) + 1;
  const band = Math.trunc(Number(params.freq_mask) * bins);
  const bandStart = rng.integers(0, bins - band + 1, total);
  const x = samples as Float32Array;
  const out = new Float32Array((n + total) * length);
  out.set(x.subarray(0, n * length));
  const clip = new Float32Array(length);
  for (let j = 0; j < total; j++) {
    const noise = rng.standardNormalF32(length); // Python draws it a chunk of copies at a time: the same stream
    const source = x.subarray((j % n) * length, (j % n + 1) * length);
    const shift = shifts[j];
    let squares = 0;
    for (let t = 0; t < length; t++) {
      const from = t - shift;
      clip[t] = from >= 0 && from < length ? f(source[from] * gains[j]) : 0;
      squares += f(clip[t] * clip[t]);
    }
    const power = f(Math.sqrt(f(squares / length))) / 10 ** (snr[j] / 20);
    for (let t = 0; t < length; t++) clip[t] = f(clip[t] + noise[t] * power);
    clip.fill(0, maskStart[j], maskStart[j] + mask);
    const spectrum = rfft(clip);
    spectrum.re.fill(0, bandStart[j], bandStart[j] + band);
    spectrum.im.fill(0, bandStart[j], bandStart[j] + band);
    const back = irfft(spectrum, length);
    const base = (n + j) * length;
    for (let t = 0; t < length; t++) out[base + t] = f(Math.min(1, Math.max(-1, back[t])));
  }
  return out;
};

const AUGMENTATIONS: Record<string, Augmentation> = { image, timeseries, audio };

/** The user's `n` samples and `copies` augmented versions of each, as the bundle's modality and `input.augment` make them. */
export function augment(spec: InputSpec, samples: Samples, n: number, copies: number, rng: NumpyRandom): Samples {
  return AUGMENTATIONS[modalityOf(spec).name](samples, n, copies, rng, augmentParams(spec), spec.shape);
}
