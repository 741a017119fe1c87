/**
 * The image preprocessing of a bundle (`input.preprocess`), ported bit for bit
 * from the Python toolkit (`toolkit/preprocess.py`, `toolkit/imaging.py`).
 *
 * Why bit for bit: the Local Expert is trained on samples that the Python
 * runtime, this SDK and the firmware each make from a person's images. If one
 * client normalised a glyph even one grey level differently, the samples a
 * model learns from would no longer look like what the device sees when it
 * predicts. So the same image must become the same 28x28 sample in every
 * client: `tests/fixtures/preprocess/golden.npz` pins the outputs, and
 * `test/preprocess.test.mjs` checks this port against them.
 *
 * Python computes these steps with numpy, vectorised over a batch; every step
 * is per image, so here they are plain loops over one image at a time. Where
 * numpy's rounding is observable, the port repeats numpy's arithmetic exactly:
 * float32 where Python casts to float32 (`Math.fround` at each operation),
 * numpy's pairwise summation order, `np.percentile`'s interpolation, round
 * half to even (`np.rint`, Python's `round`), and the summation orders of the
 * few dot products whose results are rounded to a pixel position. Two of those
 * orders (RGB(A) luminance, the centre of a resized glyph) are those of numpy
 * 2.x with OpenBLAS on x86-64, FMA included; they move a value by an ulp at
 * most, which decides a pixel only at an exact tie.
 */

import { SampleError } from "./errors.js";

/** Images as a person sees them, as Python's as_grey_float: float64 in [0,1]. */
export interface GreyBatch {
  data: Float64Array;
  count: number;
  height: number;
  width: number;
}

export interface PreparedBatch {
  /** count*canvas*canvas, white ink on black */
  images: Uint8Array;
  /** per image, "" or why it is blank */
  why: string[];
}

export interface Preprocessing {
  readonly name: string;
  /** output side (28) */
  readonly canvas: number;
  /** Never throws for a blank image: it is reported in `why` (output zeros), as Python's prepare_batch. */
  prepareBatch(grey: GreyBatch): PreparedBatch;
}

// numeric building blocks -----------------------------------------------------

const f32 = Math.fround;

/** Round half to even, as `np.rint` and Python's `round`. */
/** Python's round() and NumPy's rint: halves to even. */
export function roundHalfEven(x: number): number {
  const r = Math.round(x); // ties go up
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

const SPLITTER = 134217729; // 2^27 + 1: Veltkamp's split of a double into two 26-bit halves
const scratchView = new DataView(new ArrayBuffer(8));

/** a * b + c with a single rounding, as the FMA instruction that OpenBLAS uses
 * (JavaScript has no Math.fma): Boldo and Melquiond's emulation. With
 * a*b = p + e and p + c = s + se exactly (error-free transformations), the
 * result is s + (se + e), the inner sum rounded to odd so that the outer
 * rounding to nearest is the correct one. Tiny or huge operands, where the
 * transformations could underflow or overflow, are done exactly with BigInt. */
function fma(a: number, b: number, c: number): number {
  const p = a * b;
  if (c === 0) return p;
  if (p === 0 || !Number.isFinite(p) || !Number.isFinite(c)) return p + c;
  const magnitude = Math.abs(p);
  if (magnitude < 1e-290 || magnitude > 1e290 || Math.abs(c) > 1e290) return fmaExact(a, b, c);
  let t = SPLITTER * a;
  const ah = t - (t - a);
  const al = a - ah;
  t = SPLITTER * b;
  const bh = t - (t - b);
  const bl = b - bh;
  const e = ah * bh - p + ah * bl + al * bh + al * bl; // a*b = p + e exactly
  const s = p + c;
  const sv = s - p;
  const se = p - (s - sv) + (c - sv); // p + c = s + se exactly
  let u = se + e;
  const uv = u - se;
  const ue = se - (u - uv) + (e - uv); // se + e = u + ue exactly
  if (ue !== 0) u = roundToOdd(u, ue > 0);
  return s + u;
}

const oddView = new Float64Array(1);
const oddWords = new Uint32Array(oddView.buffer);
const LOW = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1 ? 0 : 1; // the word holding the last mantissa bit
const HIGH = 1 - LOW;

/** u (rounded to nearest, not exact) rounded to odd instead: if its last
 * mantissa bit is even, the neighbour on the side of the exact value. */
function roundToOdd(u: number, exactAbove: boolean): number {
  oddView[0] = u;
  if (oddWords[LOW] & 1) return u;
  if ((u > 0) === exactAbove) { // one ulp away from zero
    oddWords[LOW] += 1;
    if (oddWords[LOW] === 0) oddWords[HIGH] += 1;
  } else { // one ulp towards zero
    if (oddWords[LOW] === 0) oddWords[HIGH] -= 1;
    oddWords[LOW] -= 1;
  }
  return oddView[0];
}

function decompose(x: number): [bigint, number] {
  scratchView.setFloat64(0, x);
  const hi = scratchView.getUint32(0);
  const lo = scratchView.getUint32(4);
  const exponent = (hi >>> 20) & 0x7ff;
  let mantissa = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  if (exponent !== 0) mantissa |= 1n << 52n;
  const value = hi >>> 31 ? -mantissa : mantissa;
  return [value, exponent === 0 ? -1074 : exponent - 1075];
}

function pow2(e: number): number {
  scratchView.setUint32(0, ((e + 1023) << 20) >>> 0);
  scratchView.setUint32(4, 0);
  return scratchView.getFloat64(0);
}

function ldexp(x: number, e: number): number {
  while (e < -1000) { x *= pow2(-1000); e += 1000; }
  while (e > 1000) { x *= pow2(1000); e -= 1000; }
  return x * pow2(e);
}

function fmaExact(a: number, b: number, c: number): number {
  const [ma, ea] = decompose(a);
  const [mb, eb] = decompose(b);
  const [mc, ec] = decompose(c);
  const ep = ea + eb;
  let e = Math.min(ep, ec);
  let m = ((ma * mb) << BigInt(ep - e)) + (mc << BigInt(ec - e));
  if (m === 0n) return a * b + c;
  const negative = m < 0n;
  if (negative) m = -m;
  const bits = m.toString(2).length;
  if (bits > 64) { // keep 64 bits and a sticky bit: Number() then rounds as the exact value would
    const k = BigInt(bits - 64);
    const sticky = (m & ((1n << k) - 1n)) !== 0n ? 1n : 0n;
    m = (m >> k) | sticky;
    e += bits - 64;
  }
  const r = ldexp(Number(m), e); // Number(bigint) rounds to nearest, ties to even
  return negative ? -r : r;
}

/** numpy's pairwise summation (`np.add.reduce` over a contiguous run of n
 * values): 8 accumulators per block of at most 128, blocks halved recursively.
 * `round` is applied after every addition: identity for float64 arrays,
 * Math.fround for float32 ones (numpy sums those with float32 accumulators). */
function pairwise(a: Float64Array | Float32Array, start: number, n: number, stride: number, round: (x: number) => number): number {
  if (n < 8) {
    let res = 0;
    for (let i = 0; i < n; i++) res = round(res + a[start + i * stride]);
    return res;
  }
  if (n <= 128) {
    let r0 = a[start], r1 = a[start + stride], r2 = a[start + 2 * stride], r3 = a[start + 3 * stride];
    let r4 = a[start + 4 * stride], r5 = a[start + 5 * stride], r6 = a[start + 6 * stride], r7 = a[start + 7 * stride];
    const end = n - (n % 8);
    let i = 8;
    for (; i < end; i += 8) {
      const k = start + i * stride;
      r0 = round(r0 + a[k]); r1 = round(r1 + a[k + stride]); r2 = round(r2 + a[k + 2 * stride]); r3 = round(r3 + a[k + 3 * stride]);
      r4 = round(r4 + a[k + 4 * stride]); r5 = round(r5 + a[k + 5 * stride]);
      r6 = round(r6 + a[k + 6 * stride]); r7 = round(r7 + a[k + 7 * stride]);
    }
    let res = round(round(round(r0 + r1) + round(r2 + r3)) + round(round(r4 + r5) + round(r6 + r7)));
    for (; i < n; i++) res = round(res + a[start + i * stride]);
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return round(pairwise(a, start, n2, stride, round) + pairwise(a, start + n2 * stride, n - n2, stride, round));
}

const exact = (x: number): number => x;
const pairwise64 = (a: Float64Array, start: number, n: number, stride: number): number => pairwise(a, start, n, stride, exact);
const pairwise32 = (a: Float32Array, start: number, n: number, stride: number): number => pairwise(a, start, n, stride, f32);

/** `x.reshape(H', fh, W', fw).mean(axis=(1, 3))` of the top left (outH*fh) x
 * (outW*fw) of an image whose rows are `stride` apart. numpy adds each block
 * row by row (acc + pairwise sum of the row), except when the output is one
 * column wide: then it merges the two summed axes into one pairwise sum. */
function blockMean(src: Float64Array, stride: number, outH: number, outW: number, fh: number, fw: number): Float64Array;
function blockMean(src: Float32Array, stride: number, outH: number, outW: number, fh: number, fw: number): Float32Array;
function blockMean(src: Float64Array | Float32Array, stride: number, outH: number, outW: number, fh: number, fw: number): Float64Array | Float32Array {
  const single = src instanceof Float32Array;
  const out = single ? new Float32Array(outH * outW) : new Float64Array(outH * outW);
  const count = fh * fw;
  const block = single ? new Float32Array(outW === 1 ? count : 0) : new Float64Array(outW === 1 ? count : 0);
  for (let i = 0; i < outH; i++) {
    for (let j = 0; j < outW; j++) {
      let acc = 0;
      if (outW === 1) {
        for (let a = 0; a < fh; a++) {
          for (let b = 0; b < fw; b++) block[a * fw + b] = src[(i * fh + a) * stride + b];
        }
        acc = single ? pairwise32(block as Float32Array, 0, count, 1) : pairwise64(block as Float64Array, 0, count, 1);
      } else if (single) {
        for (let a = 0; a < fh; a++) acc = f32(acc + pairwise32(src as Float32Array, (i * fh + a) * stride + j * fw, fw, 1));
      } else {
        for (let a = 0; a < fh; a++) acc += pairwise64(src as Float64Array, (i * fh + a) * stride + j * fw, fw, 1);
      }
      out[i * outW + j] = acc / count; // a Float32Array store rounds as numpy's float32 mean does
    }
  }
  return out;
}

/** sum(x[i] * i): `np.einsum("nh,h->n", x, arange(h))` as numpy computes it
 * (two SIMD lanes, four vectors per step taken last to first, no FMA). */
function einsumIndexDot(x: Float64Array, n: number): number {
  let a0 = 0, a1 = 0, i = 0;
  for (; n - i >= 8; i += 8) {
    for (let k = 6; k >= 0; k -= 2) {
      a0 = x[i + k] * (i + k) + a0;
      a1 = x[i + k + 1] * (i + k + 1) + a1;
    }
  }
  for (; i < n; i += 2) {
    a0 = x[i] * i + a0;
    if (i + 1 < n) a1 = x[i + 1] * (i + 1) + a1;
  }
  return a0 + a1;
}

/** sum(x[i] * i): `x @ arange(n)` (cblas_ddot) as OpenBLAS's x86-64 kernel
 * computes it: blocks of 16 into 4x4 FMA accumulators, then the rest in order. */
function blasIndexDot(x: Float64Array, n: number): number {
  const n1 = n & -16;
  let dot = 0;
  if (n1 > 0) {
    const acc = new Float64Array(16);
    for (let i = 0; i < n1; i += 16) {
      for (let k = 0; k < 16; k++) acc[k] = fma(x[i + k], i + k, acc[k]);
    }
    const lane = (k: number, j: number): number => acc[4 * k + j] + acc[4 * k + j + 2];
    const s0 = lane(0, 0) + lane(1, 0) + (lane(2, 0) + lane(3, 0));
    const s1 = lane(0, 1) + lane(1, 1) + (lane(2, 1) + lane(3, 1));
    dot = s0 + s1;
  }
  for (let i = n1; i < n; i++) dot += x[i] * i;
  return dot;
}

/** `np.percentile(values, q * 100)` (method "linear") of sorted values. */
function percentileSorted(sorted: Float64Array, q: number): number {
  const n = sorted.length;
  const virtual = (n - 1) * q;
  let previous = Math.floor(virtual);
  let next = previous + 1;
  let gamma = virtual - previous;
  if (virtual >= n - 1) { // numpy takes the last value twice (and its index -1 into gamma)
    previous = next = n - 1;
    gamma = virtual + 1;
  }
  const a = sorted[previous];
  const b = sorted[next];
  const diff = b - a;
  // numpy's _lerp: from the nearer end, so that t = 1 gives b exactly
  return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
}

/** row_median: the median of sorted values (NaN for none). */
function medianSorted(sorted: Float64Array, count: number): number {
  if (count === 0) return NaN;
  return (sorted[(count - 1) >> 1] + sorted[count >> 1]) / 2.0;
}

/** `_filter`: a size x size min (or max) filter with edges replicated, done
 * separably with van Herk / Gil-Werman (three comparisons a pixel, whatever
 * the size). Min and max are exact, so any order gives numpy's result. */
function minMaxFilter(src: Float64Array, h: number, w: number, size: number, max: boolean): Float64Array {
  const half = size >> 1;
  const tmp = new Float64Array(h * w);
  const out = new Float64Array(h * w);
  const longest = Math.max(h, w) + size - 1;
  const pad = new Float64Array(longest);
  const prefix = new Float64Array(longest);
  const suffix = new Float64Array(longest);
  const line = (from: Float64Array, to: Float64Array, start: number, step: number, length: number): void => {
    const total = length + size - 1;
    for (let j = 0; j < total; j++) {
      const k = Math.min(Math.max(j - half, 0), length - 1);
      pad[j] = from[start + k * step];
    }
    for (let j = 0; j < total; j++) {
      const v = pad[j];
      if (j % size === 0) prefix[j] = v;
      else { const p = prefix[j - 1]; prefix[j] = max ? (v > p ? v : p) : (v < p ? v : p); }
    }
    for (let j = total - 1; j >= 0; j--) {
      const v = pad[j];
      if (j === total - 1 || (j + 1) % size === 0) suffix[j] = v;
      else { const s = suffix[j + 1]; suffix[j] = max ? (v > s ? v : s) : (v < s ? v : s); }
    }
    for (let i = 0; i < length; i++) {
      const a = suffix[i];
      const b = prefix[i + size - 1];
      to[start + i * step] = max ? (a > b ? a : b) : (a < b ? a : b);
    }
  };
  for (let r = 0; r < h; r++) line(src, tmp, r * w, 1, w);
  for (let c = 0; c < w; c++) line(tmp, out, c, w, h);
  return out;
}

/** otsu_thresholds for one image of values in [0, 1] (given as ink / peak). */
function otsuThreshold(ink: Float64Array, peak: number): number {
  const bins = 256;
  const hist = new Float64Array(bins);
  for (let k = 0; k < ink.length; k++) hist[Math.min(Math.trunc((ink[k] / peak) * bins), bins - 1)] += 1;
  const weight0 = new Float64Array(bins);
  const mass0 = new Float64Array(bins);
  let w = 0, m = 0;
  for (let b = 0; b < bins; b++) {
    w += hist[b];
    m += hist[b] * ((b + 0.5) / bins);
    weight0[b] = w;
    mass0[b] = m;
  }
  let best = 0, bestValue = -Infinity;
  for (let b = 0; b < bins - 1; b++) {
    const w0 = weight0[b];
    const w1 = w - w0;
    const mean0 = mass0[b] / Math.max(w0, 1e-12);
    const mean1 = (m - mass0[b]) / Math.max(w1, 1e-12);
    const d = mean0 - mean1;
    const between = w0 * w1 * (d * d);
    if (between > bestValue) { bestValue = between; best = b; } // argmax: the first maximum
  }
  return (best + 1) / bins;
}

/** 8-connected components of a mask: each pixel's component (-1 outside), each component's size and whether it touches the border. */
function connectedComponents(mask: Uint8Array, h: number, w: number): { labels: Int32Array; sizes: number[]; onBorder: boolean[] } {
  const labels = new Int32Array(h * w).fill(-1);
  const sizes: number[] = [];
  const onBorder: boolean[] = [];
  const stack = new Int32Array(h * w);
  for (let seed = 0; seed < h * w; seed++) {
    if (!mask[seed] || labels[seed] >= 0) continue;
    const label = sizes.length;
    let top = 0, size = 0, border = false;
    stack[top++] = seed;
    labels[seed] = label;
    while (top > 0) {
      const k = stack[--top];
      size++;
      const r = (k / w) | 0;
      const c = k - r * w;
      if (r === 0 || r === h - 1 || c === 0 || c === w - 1) border = true;
      for (let dr = -1; dr <= 1; dr++) {
        const rr = r + dr;
        if (rr < 0 || rr >= h) continue;
        for (let dc = -1; dc <= 1; dc++) {
          const cc = c + dc;
          if (cc < 0 || cc >= w) continue;
          const q = rr * w + cc;
          if (mask[q] && labels[q] < 0) { labels[q] = label; stack[top++] = q; }
        }
      }
    }
    sizes.push(size);
    onBorder.push(border);
  }
  return { labels, sizes, onBorder };
}

/** imaging.resize of a float32 image: area averaging when shrinking by a whole
 * factor, else (after an integer box filter for large factors) bilinear, all
 * in float32 as numpy computes it. */
function resize32(image: Float32Array, h: number, w: number, height: number, width: number): Float32Array {
  if (h >= height && w >= width && h % height === 0 && w % width === 0) {
    return blockMean(image, w, height, width, h / height, w / width);
  }
  let source = image;
  if (h > 2 * height || w > 2 * width) {
    const fh = Math.max(1, Math.floor(h / height));
    const fw = Math.max(1, Math.floor(w / width));
    const hh = Math.floor(h / fh), ww = Math.floor(w / fw);
    source = blockMean(image, w, hh, ww, fh, fw);
    h = hh;
    w = ww;
  }
  // rows = (arange(height, float32) + 0.5) * h / height - 0.5, clipped to [0, h - 1]: float32 at each step
  const coordinates = (length: number, side: number): Float32Array => {
    const out = new Float32Array(length);
    for (let k = 0; k < length; k++) {
      const v = f32(f32(f32(f32(k + 0.5) * side) / length) - 0.5);
      out[k] = Math.min(Math.max(v, 0), side - 1);
    }
    return out;
  };
  const rows = coordinates(height, h);
  const cols = coordinates(width, w);
  // bilinear_sample: the fractions and their products are float64 (numpy promotes
  // float32 - int64), each weight rounded to float32, then float32 sums of weight * value.
  const out = new Float32Array(height * width);
  for (let i = 0; i < height; i++) {
    const r0 = Math.floor(rows[i]);
    const fr = rows[i] - r0;
    for (let j = 0; j < width; j++) {
      const c0 = Math.floor(cols[j]);
      const fc = cols[j] - c0;
      let acc = 0;
      for (let dr = 0; dr < 2; dr++) {
        const wr = dr === 0 ? 1.0 - fr : fr;
        const rr = r0 + dr;
        for (let dc = 0; dc < 2; dc++) {
          const wc = dc === 0 ? 1.0 - fc : fc;
          const cc = c0 + dc;
          const value = rr < h && cc < w ? source[rr * w + cc] : 0;
          acc = f32(acc + f32(f32(wr * wc) * value));
        }
      }
      out[i * width + j] = acc;
    }
  }
  return out;
}

/** Python's f"{x:.3f}" (ties of the binary value to even, where toFixed goes up). */
function fixed3(x: number): string {
  const scaled = x * 1000;
  const floor = Math.floor(scaled);
  if (scaled - floor === 0.5 && Number.isInteger(x * 16)) return ((floor % 2 === 0 ? floor : floor + 1) / 1000).toFixed(3);
  return x.toFixed(3);
}

/** Python's repr of a float (0.08, 1e-05, 2.0). */
function pyFloat(x: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const [digits, expText] = x.toExponential().split("e");
  const exponent = Number(expText);
  if (exponent < -4 || exponent >= 16) {
    return `${digits}e${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  const text = String(x);
  return /[.e]/.test(text) ? text : `${text}.0`;
}

/** Python's f"{x:.3g}". */
function pyG3(x: number): string {
  if (x === 0) return "0";
  const [mantissa, expText] = x.toExponential(2).split("e");
  const exponent = Number(expText);
  const strip = (s: string): string => (s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s);
  if (exponent < -4 || exponent >= 3) {
    return `${strip(mantissa)}e${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  return strip(x.toFixed(2 - exponent));
}

// as_grey_float -----------------------------------------------------------------

const LUMA = [0.299, 0.587, 0.114]; // ITU-R 601, as Pillow's "L"

/** uint8 | uint16 | Uint8ClampedArray (0-255) | float32/float64 in [0,1]; channels 1 (grey), 3 (RGB) or 4 (RGBA: luminance ITU-R 601 0.299/0.587/0.114, alpha composited onto white), interleaved (N,H,W,C) order. Validates like Python (NaN/inf -> SampleError "the images contain NaN or infinite values", floats outside [0,1] -> SampleError naming the range and a hint, etc.). */
export function asGreyFloat(
  data: Uint8Array | Uint8ClampedArray | Uint16Array | Float32Array | Float64Array,
  count: number,
  height: number,
  width: number,
  channels = 1,
): GreyBatch {
  const dims = [count, height, width, channels];
  if (dims.some((d) => !Number.isSafeInteger(d) || d < 1)) {
    throw new SampleError(`an image must be (H, W) grey or (H, W, 3|4) colour, got shape (${dims.join(", ")})`,
      "give count, height, width and channels as positive whole numbers");
  }
  if (channels !== 1 && channels !== 3 && channels !== 4) {
    throw new SampleError(`images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got ${channels}`,
      "convert the images to grey, RGB or RGBA, interleaved in (N, H, W, C) order");
  }
  const expected = count * height * width * channels;
  if (data.length !== expected) {
    throw new SampleError(`${data.length} values do not make ${count} image(s) of ${height}x${width}x${channels} (${expected} values)`,
      "check the image size and the number of channels");
  }
  let scale: number;
  if (data instanceof Uint8Array || data instanceof Uint8ClampedArray) scale = 255.0;
  else if (data instanceof Uint16Array) scale = 65535.0;
  else if (data instanceof Float32Array || data instanceof Float64Array) {
    scale = 0;
    let lo = Infinity, hi = -Infinity;
    for (let k = 0; k < data.length; k++) {
      const v = data[k];
      if (!Number.isFinite(v)) throw new SampleError("the images contain NaN or infinite values", "drop or repair those images");
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (lo < 0.0 || hi > 1.0) {
      throw new SampleError(`float images must lie in [0, 1], got [${pyG3(lo)}, ${pyG3(hi)}]`,
        "divide 0-255 images by 255, or pass them as uint8");
    }
  } else {
    const kind = (data as object)?.constructor?.name ?? typeof data;
    throw new SampleError(`images must be uint8, uint16 or float in [0, 1], got ${kind}`,
      "pass a Uint8Array (0-255), Uint16Array, Float32Array or Float64Array (0-1)");
  }
  const pixels = count * height * width;
  const out = new Float64Array(pixels);
  const value = scale === 0 ? (k: number): number => data[k] : (k: number): number => data[k] / scale;
  if (channels === 1) {
    for (let k = 0; k < pixels; k++) out[k] = value(k);
    return { data: out, count, height, width };
  }
  // values[..., :3] @ [0.299, 0.587, 0.114] as numpy computes it: images one
  // pixel wide by numpy's own loop (in order, no FMA), wider ones by OpenBLAS's
  // gemv kernel (green first, then red and blue with FMA).
  for (let k = 0; k < pixels; k++) {
    const base = k * channels;
    const r = value(base), g = value(base + 1), b = value(base + 2);
    let grey = width === 1
      ? r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
      : fma(b, LUMA[2], fma(r, LUMA[0], g * LUMA[1]));
    if (channels === 4) {
      const alpha = value(base + 3);
      grey = grey * alpha + (1.0 - alpha);
    }
    out[k] = grey;
  }
  return { data: out, count, height, width };
}

// the preprocessings ------------------------------------------------------------

function checkBatch(grey: GreyBatch): void {
  const { data, count, height, width } = grey;
  if (![count, height, width].every((d) => Number.isSafeInteger(d) && d >= 0) || data.length !== count * height * width) {
    throw new SampleError(`a grey batch of ${count} image(s) of ${height}x${width} needs ${count * height * width} values, got ${data.length}`,
      "make the batch with asGreyFloat");
  }
}

export interface GlyphParams {
  canvas: number;
  box: number;
  working_size: number;
  min_contrast: number;
  background_window: number;
  noise_sigmas: number;
  min_component: number;
  border_keep: number;
  keep_radius: number;
  stretch_quantile: number;
}

const GLYPH_DEFAULTS: GlyphParams = {
  canvas: 28,
  box: 20,
  working_size: 112,
  min_contrast: 0.08,
  background_window: 1 / 2,
  noise_sigmas: 4.0,
  min_component: 0.04,
  border_keep: 0.5,
  keep_radius: 1 / 7,
  stretch_quantile: 0.9,
};

const WHOLE_PARAMS = new Set(["canvas", "box", "working_size"]);

/** `glyph-v1`: a handwritten glyph in any capture -> an MNIST-style sample (steps as GlyphPreprocessing.prepare_batch). */
class GlyphPreprocessing implements Preprocessing {
  readonly name = "glyph-v1";
  readonly canvas: number;
  readonly params: Readonly<GlyphParams>;

  constructor(params: GlyphParams) {
    this.params = Object.freeze({ ...params });
    this.canvas = params.canvas;
  }

  prepareBatch(grey: GreyBatch): PreparedBatch {
    checkBatch(grey);
    const { count, height, width } = grey;
    if (count > 0 && Math.min(height, width) < 2) {
      throw new SampleError(`an image must be 2-D and at least 2x2, got shape (${height}, ${width})`);
    }
    const side = this.canvas;
    const images = new Uint8Array(count * side * side);
    const why: string[] = [];
    for (let i = 0; i < count; i++) {
      const image = grey.data.subarray(i * height * width, (i + 1) * height * width);
      why.push(this.prepareOne(image, height, width, images.subarray(i * side * side, (i + 1) * side * side)));
    }
    return { images, why };
  }

  private prepareOne(input: Float64Array, height: number, width: number, out: Uint8Array): string {
    const p = this.params;
    // 1. Working size: area-average large captures by a whole factor.
    const factor = Math.ceil(Math.max(height, width) / p.working_size);
    let h = height, w = width;
    let grey: Float64Array = input;
    if (factor > 1) {
      const fh = Math.min(factor, height), fw = Math.min(factor, width);
      h = Math.floor(height / fh);
      w = Math.floor(width / fw);
      grey = blockMean(input, width, h, w, fh, fw);
    }
    const n = h * w;
    // 2. Polarity from the 0.1 %, 50 % and 99.9 % percentiles.
    const sorted = Float64Array.from(grey).sort();
    const low = percentileSorted(sorted, 0.1 / 100);
    const median = percentileSorted(sorted, 50 / 100);
    const high = percentileSorted(sorted, 99.9 / 100);
    const faint = high - low < p.min_contrast;
    if (median - low > high - median) grey = grey.map((v) => 1.0 - v);
    // 3. Background: a grey opening wider than any stroke, subtracted.
    const window = Math.max(3, roundHalfEven(Math.min(h, w) * p.background_window) | 1);
    const paperLevel = minMaxFilter(minMaxFilter(grey, h, w, window, false), h, w, window, true);
    const ink = new Float64Array(n);
    let peak = -Infinity;
    for (let k = 0; k < n; k++) {
      const v = grey[k] - paperLevel[k];
      ink[k] = v < 0 ? 0 : v;
      if (ink[k] > peak) peak = ink[k];
    }
    // 4. Otsu's threshold, and a noise floor (median + k robust sigmas) of the pixels under it.
    peak = Math.max(peak, 1e-12);
    const threshold = otsuThreshold(ink, peak) * peak;
    const paper = new Float64Array(n);
    let paperCount = 0;
    for (let k = 0; k < n; k++) if (ink[k] < threshold) paper[paperCount++] = ink[k];
    const paperSorted = paper.subarray(0, paperCount).sort();
    const centre = medianSorted(paperSorted, paperCount);
    for (let k = 0; k < paperCount; k++) paperSorted[k] = Math.abs(paperSorted[k] - centre);
    const spread = medianSorted(paperSorted.sort(), paperCount);
    let floor = centre + p.noise_sigmas * 1.4826 * spread;
    if (Number.isNaN(floor)) floor = 0; // np.nan_to_num: no pixel under the threshold
    for (let k = 0; k < n; k++) {
      const v = ink[k] - floor;
      ink[k] = v < 0 ? 0 : v;
    }
    // 5. Ink components: speckles and border smudges dropped.
    const mask = new Uint8Array(n);
    const cut = threshold - floor;
    if (!faint) for (let k = 0; k < n; k++) mask[k] = ink[k] >= cut && ink[k] > 0 ? 1 : 0;
    const { labels, sizes, onBorder } = connectedComponents(mask, h, w);
    let total = 0, interior = 0;
    for (let c = 0; c < sizes.length; c++) {
      total += sizes[c];
      if (!onBorder[c]) interior += sizes[c];
    }
    const keep = sizes.map((size, c) => {
      const smudge = onBorder[c] && interior >= p.border_keep * total && size < p.border_keep * total;
      return size >= Math.max(2.0, p.min_component * total) && !smudge;
    });
    const kept = new Float64Array(n);
    for (let k = 0; k < n; k++) kept[k] = labels[k] >= 0 && keep[labels[k]] ? 1 : 0;
    const radius = Math.max(1, roundHalfEven(Math.min(h, w) * p.keep_radius));
    const near = minMaxFilter(kept, h, w, 2 * radius + 1, true);
    for (let k = 0; k < n; k++) if (near[k] <= 0) ink[k] = 0;
    // 6. The ink's bounding box and mass.
    let r0 = h, r1 = 0, c0 = w, c1 = 0;
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        if (ink[r * w + c] !== 0) {
          if (r < r0) r0 = r;
          if (r >= r1) r1 = r + 1;
          if (c < c0) c0 = c;
          if (c >= c1) c1 = c + 1;
        }
      }
    }
    const mass = pairwise64(ink, 0, n, 1);
    if (faint) return `no ink: contrast ${fixed3(high - low)} < ${pyFloat(p.min_contrast)}`;
    if (mass <= 0) return total ? "only speckles or border smudges, no glyph" : "no ink above the noise";
    // 7. Fit the box into box x box, centre of mass at the canvas centre.
    const gh = r1 - r0, gw = c1 - c0;
    const scale = p.box / Math.max(gh, gw);
    const nh = Math.max(1, roundHalfEven(gh * scale));
    const nw = Math.max(1, roundHalfEven(gw * scale));
    let glyph: Float64Array;
    let cr: number, cc: number;
    if (nh !== gh || nw !== gw) {
      const crop = new Float32Array(gh * gw); // glyph.astype(np.float32)
      for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) crop[r * gw + c] = ink[(r0 + r) * w + c0 + c];
      glyph = Float64Array.from(resize32(crop, gh, gw, nh, nw));
      const weight = pairwise64(glyph, 0, nh * nw, 1);
      cr = blasIndexDot(rowSums(glyph, nh, nw), nh) / weight;
      cc = blasIndexDot(columnSums(glyph, nh, nw), nw) / weight;
    } else {
      glyph = new Float64Array(gh * gw);
      for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) glyph[r * gw + c] = ink[(r0 + r) * w + c0 + c];
      const denominator = Math.max(mass, 1e-300);
      cr = einsumIndexDot(rowSums(ink, h, w), h) / denominator - r0;
      cc = einsumIndexDot(columnSums(ink, h, w), w) / denominator - c0;
    }
    const side = this.canvas;
    const middle = (side - 1) / 2.0;
    // Python would fail on a NaN centre (a glyph that vanished in float32); centre the box instead.
    const top = Math.min(Math.max(Number.isFinite(cr) ? roundHalfEven(middle - cr) : (side - nh) >> 1, 0), side - nh);
    const left = Math.min(Math.max(Number.isFinite(cc) ? roundHalfEven(middle - cc) : (side - nw) >> 1, 0), side - nw);
    const canvas = new Float64Array(side * side);
    for (let r = 0; r < nh; r++) for (let c = 0; c < nw; c++) canvas[(top + r) * side + left + c] = glyph[r * nw + c];
    // 8. Contrast: the stretch_quantile ("higher") of the inked pixels becomes white.
    const inked = new Float64Array(side * side);
    let inkedCount = 0;
    for (let k = 0; k < side * side; k++) if (canvas[k] > 0.5 / 255.0) inked[inkedCount++] = canvas[k];
    let level = 1.0;
    if (inkedCount > 0) {
      const ordered = inked.subarray(0, inkedCount).sort();
      level = ordered[Math.ceil(p.stretch_quantile * Math.max(inkedCount - 1, 0))];
    }
    for (let k = 0; k < side * side; k++) out[k] = toByte(Math.min(canvas[k] / level, 1.0) * 255.0);
    return "";
  }
}

/** np.clip(np.rint(v), 0, 255).astype(np.uint8) */
function toByte(v: number): number {
  const r = roundHalfEven(v);
  return r < 0 ? 0 : r > 255 ? 255 : r;
}

/** image.sum(axis=1): a pairwise sum per row. */
function rowSums(image: Float64Array, h: number, w: number): Float64Array {
  const out = new Float64Array(h);
  for (let r = 0; r < h; r++) out[r] = pairwise64(image, r * w, w, 1);
  return out;
}

/** image.sum(axis=0): numpy adds the rows in order, unless the image is one
 * column wide (then it is one contiguous, pairwise, sum). */
function columnSums(image: Float64Array, h: number, w: number): Float64Array {
  if (w === 1) return Float64Array.of(pairwise64(image, 0, h, 1));
  const out = new Float64Array(w);
  for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) out[c] += image[r * w + c];
  return out;
}

const CANVAS = 28;
const BOX = 20;

/** imaging.mnist_style of a float32 image: the ink (> 0.05) boxed into 20x20 on
 * a 28x28 canvas, then rolled so that its centre of mass is at the centre. */
function mnistStyle(image: Float32Array, h: number, w: number): Float32Array {
  const threshold = f32(0.05); // numpy 2 compares a float32 array with a Python float in float32
  let r0 = h, r1 = 0, c0 = w, c1 = 0;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      if (image[r * w + c] > threshold) {
        if (r < r0) r0 = r;
        if (r >= r1) r1 = r + 1;
        if (c < c0) c0 = c;
        if (c >= c1) c1 = c + 1;
      }
    }
  }
  const canvas = new Float32Array(CANVAS * CANVAS);
  if (r1 === 0) return canvas;
  const gh = r1 - r0, gw = c1 - c0;
  const crop = new Float32Array(gh * gw);
  for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) crop[r * gw + c] = image[(r0 + r) * w + c0 + c];
  const scale = BOX / Math.max(gh, gw);
  const nh = Math.max(1, roundHalfEven(gh * scale));
  const nw = Math.max(1, roundHalfEven(gw * scale));
  const glyph = resize32(crop, gh, gw, nh, nw);
  const top = (CANVAS - nh) >> 1, left = (CANVAS - nw) >> 1;
  for (let r = 0; r < nh; r++) for (let c = 0; c < nw; c++) canvas[(top + r) * CANVAS + left + c] = glyph[r * nw + c];
  // center_of_mass: float32 sums (pairwise over the canvas and each row, the
  // columns row by row), weighted by float64 indices, float64 pairwise totals.
  const total = pairwise32(canvas, 0, CANVAS * CANVAS, 1);
  let cr = (CANVAS - 1) / 2.0, cc = (CANVAS - 1) / 2.0;
  if (total > 0) {
    const byRow = new Float64Array(CANVAS);
    const byColumn = new Float64Array(CANVAS);
    const columns = new Float32Array(CANVAS);
    for (let r = 0; r < CANVAS; r++) {
      byRow[r] = pairwise32(canvas, r * CANVAS, CANVAS, 1) * r;
      for (let c = 0; c < CANVAS; c++) columns[c] = f32(columns[c] + canvas[r * CANVAS + c]);
    }
    for (let c = 0; c < CANVAS; c++) byColumn[c] = columns[c] * c;
    cr = pairwise64(byRow, 0, CANVAS, 1) / total;
    cc = pairwise64(byColumn, 0, CANVAS, 1) / total;
  }
  const shiftR = roundHalfEven((CANVAS - 1) / 2.0 - cr);
  const shiftC = roundHalfEven((CANVAS - 1) / 2.0 - cc);
  const rolled = new Float32Array(CANVAS * CANVAS); // np.roll: what leaves one side comes back on the other
  for (let r = 0; r < CANVAS; r++) {
    const rr = (((r + shiftR) % CANVAS) + CANVAS) % CANVAS;
    for (let c = 0; c < CANVAS; c++) {
      const ccol = (((c + shiftC) % CANVAS) + CANVAS) % CANVAS;
      rolled[rr * CANVAS + ccol] = Math.min(Math.max(canvas[r * CANVAS + c], 0), 1);
    }
  }
  return rolled;
}

/** `mnist-style-v0`: what bundles before 0.2 did (28x28 taken as they are, other sizes boxed MNIST-style). */
class MnistStyleV0 implements Preprocessing {
  readonly name = "mnist-style-v0";
  readonly canvas = CANVAS;

  prepareBatch(grey: GreyBatch): PreparedBatch {
    checkBatch(grey);
    const { count, height, width } = grey;
    const size = CANVAS * CANVAS;
    const images = new Uint8Array(count * size);
    for (let i = 0; i < count; i++) {
      const image = grey.data.subarray(i * height * width, (i + 1) * height * width);
      const out = images.subarray(i * size, (i + 1) * size);
      if (height === CANVAS && width === CANVAS) {
        for (let k = 0; k < size; k++) out[k] = toByte(image[k] * 255.0);
      } else {
        const sample = mnistStyle(Float32Array.from(image), height, width);
        for (let k = 0; k < size; k++) out[k] = toByte(f32(sample[k] * 255.0)); // float32 * 255 stays float32
      }
    }
    return { images, why: new Array<string>(count).fill("") };
  }
}

const KNOWN = ["glyph-v1", "mnist-style-v0"];

function pyRepr(value: unknown): string {
  if (value === undefined || value === null) return "None";
  if (typeof value === "string") return `'${value}'`;
  return JSON.stringify(value) ?? String(value);
}

/** The preprocessing a bundle's manifest `input.preprocess` describes (a dict with `name` and the parameters; a string or undefined means "mnist-style-v0", as Python's from_spec). Unknown name -> SampleError with a hint listing the known ones. */
export function preprocessingFrom(spec: unknown): Preprocessing {
  if (spec === null || typeof spec !== "object" || Array.isArray(spec)) return new MnistStyleV0();
  const fields = spec as Record<string, unknown>;
  const name = fields.name;
  if (name === "mnist-style-v0") return new MnistStyleV0();
  if (name !== "glyph-v1") {
    throw new SampleError(`the bundle asks for preprocessing ${pyRepr(name)}, which this edgetailor does not know`,
      `known: ${KNOWN.join(", ")}; upgrade edgetailor`);
  }
  const params: GlyphParams = { ...GLYPH_DEFAULTS };
  for (const key of Object.keys(GLYPH_DEFAULTS) as (keyof GlyphParams)[]) {
    const value = fields[key];
    if (value === undefined) continue;
    if (typeof value !== "number" || !Number.isFinite(value) || (WHOLE_PARAMS.has(key) && (!Number.isSafeInteger(value) || value < 1))) {
      throw new SampleError(`the bundle's glyph-v1 parameter ${key} is ${pyRepr(value)}, not a ${WHOLE_PARAMS.has(key) ? "positive whole number" : "number"}`,
        "re-export the bundle with a current edgetailor");
    }
    params[key] = value;
  }
  if (params.box > params.canvas) {
    throw new SampleError(`the bundle's glyph-v1 box (${params.box}) is larger than its canvas (${params.canvas})`,
      "re-export the bundle with a current edgetailor");
  }
  return new GlyphPreprocessing(params);
}
