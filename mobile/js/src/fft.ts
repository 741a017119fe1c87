/**
 * NumPy's `rfft` and `irfft` (numpy.fft, pocketfft) for clips of any length:
 * the audio augmentation masks a band of frequencies by zeroing it in the
 * spectrum, as `toolkit/modalities.py` does.
 *
 * Written here rather than taken from npm: the FFT packages there handle
 * powers of two only, and clips are a sample rate times seconds long (16000 =
 * 2^7 x 5^3). This is a mixed-radix Cooley-Tukey transform for lengths whose
 * prime factors are small, and Bluestein's chirp-z for the rest (a length
 * with a large prime factor), both in float64. pocketfft computes float32
 * clips in float32, so results agree with NumPy's to about 1e-6 of the
 * clip's scale, not bit for bit.
 */

const SMALL_PRIME = 61; // larger prime factors go through Bluestein's algorithm

interface Plan {
  n: number;
  factors: number[];
  cos: Float64Array; // cos and -sin of 2*pi*j/n
  sin: Float64Array;
  bluestein?: Bluestein;
}

interface Bluestein {
  size: number; // a power of two >= 2n - 1
  chirpRe: Float64Array; // exp(-i*pi*k^2/n)
  chirpIm: Float64Array;
  kernelRe: Float64Array; // the FFT of the conjugate chirp, wrapped
  kernelIm: Float64Array;
  inner: Plan;
}

const plans = new Map<number, Plan>();

function factorize(n: number): number[] {
  const out: number[] = [];
  for (const p of [4, 2, 3, 5]) {
    while (n % p === 0) {
      out.push(p);
      n /= p;
    }
  }
  for (let p = 7; p * p <= n; p += 2) {
    while (n % p === 0) {
      out.push(p);
      n /= p;
    }
  }
  if (n > 1) out.push(n);
  return out;
}

function plan(n: number): Plan {
  let p = plans.get(n);
  if (p) return p;
  const cos = new Float64Array(n);
  const sin = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    const angle = (2 * Math.PI * j) / n;
    cos[j] = Math.cos(angle);
    sin[j] = -Math.sin(angle);
  }
  const factors = factorize(n);
  p = { n, factors, cos, sin };
  if (factors.some((f) => f > SMALL_PRIME)) p.bluestein = bluestein(n);
  plans.set(n, p);
  return p;
}

function bluestein(n: number): Bluestein {
  let size = 1;
  while (size < 2 * n - 1) size *= 2;
  const chirpRe = new Float64Array(n);
  const chirpIm = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    const angle = (Math.PI * ((k * k) % (2 * n))) / n; // k^2 mod 2n keeps the angle exact for long clips
    chirpRe[k] = Math.cos(angle);
    chirpIm[k] = -Math.sin(angle);
  }
  const kernelRe = new Float64Array(size);
  const kernelIm = new Float64Array(size);
  kernelRe[0] = chirpRe[0];
  kernelIm[0] = -chirpIm[0];
  for (let k = 1; k < n; k++) {
    kernelRe[k] = kernelRe[size - k] = chirpRe[k];
    kernelIm[k] = kernelIm[size - k] = -chirpIm[k];
  }
  const inner = plan(size);
  const outRe = new Float64Array(size);
  const outIm = new Float64Array(size);
  transform(inner, kernelRe, kernelIm, 0, 1, size, outRe, outIm, 0);
  return { size, chirpRe, chirpIm, kernelRe: outRe, kernelIm: outIm, inner };
}

/**
 * Decimation in time: the DFT of the `n` values at `offset`, `offset + stride`, ...
 * of (re, im) into out[at .. at + n), by the plan's factors from `depth` on.
 */
function transform(p: Plan, re: Float64Array, im: Float64Array, offset: number, stride: number, n: number,
                   outRe: Float64Array, outIm: Float64Array, at: number, depth = 0): void {
  if (n === 1) {
    outRe[at] = re[offset];
    outIm[at] = im[offset];
    return;
  }
  const radix = p.factors[depth];
  const m = n / radix;
  for (let r = 0; r < radix; r++) {
    transform(p, re, im, offset + r * stride, stride * radix, m, outRe, outIm, at + r * m, depth + 1);
  }
  const step = p.n / n; // W_n^j = W_N^(j * step)
  const tRe = new Float64Array(radix);
  const tIm = new Float64Array(radix);
  for (let k = 0; k < m; k++) {
    for (let r = 0; r < radix; r++) {
      const j = ((r * k) % n) * step;
      const yr = outRe[at + r * m + k];
      const yi = outIm[at + r * m + k];
      tRe[r] = yr * p.cos[j] - yi * p.sin[j];
      tIm[r] = yr * p.sin[j] + yi * p.cos[j];
    }
    for (let q = 0; q < radix; q++) {
      let sr = 0;
      let si = 0;
      for (let r = 0; r < radix; r++) {
        const j = ((r * q * m) % n) * step; // W_radix^(r*q)
        sr += tRe[r] * p.cos[j] - tIm[r] * p.sin[j];
        si += tRe[r] * p.sin[j] + tIm[r] * p.cos[j];
      }
      outRe[at + k + q * m] = sr;
      outIm[at + k + q * m] = si;
    }
  }
}

/** The forward DFT of (re, im), length n, in place of new arrays. */
function dft(re: Float64Array, im: Float64Array): { re: Float64Array; im: Float64Array } {
  const n = re.length;
  const p = plan(n);
  if (p.bluestein) {
    const b = p.bluestein;
    const aRe = new Float64Array(b.size);
    const aIm = new Float64Array(b.size);
    for (let k = 0; k < n; k++) {
      aRe[k] = re[k] * b.chirpRe[k] - im[k] * b.chirpIm[k];
      aIm[k] = re[k] * b.chirpIm[k] + im[k] * b.chirpRe[k];
    }
    const fRe = new Float64Array(b.size);
    const fIm = new Float64Array(b.size);
    transform(b.inner, aRe, aIm, 0, 1, b.size, fRe, fIm, 0);
    for (let k = 0; k < b.size; k++) { // multiply, conjugated so that the forward transform inverts
      const r = fRe[k] * b.kernelRe[k] - fIm[k] * b.kernelIm[k];
      const i = fRe[k] * b.kernelIm[k] + fIm[k] * b.kernelRe[k];
      fRe[k] = r;
      fIm[k] = -i;
    }
    transform(b.inner, fRe, fIm, 0, 1, b.size, aRe, aIm, 0);
    const outRe = new Float64Array(n);
    const outIm = new Float64Array(n);
    for (let k = 0; k < n; k++) {
      const cr = aRe[k] / b.size;
      const ci = -aIm[k] / b.size;
      outRe[k] = cr * b.chirpRe[k] - ci * b.chirpIm[k];
      outIm[k] = cr * b.chirpIm[k] + ci * b.chirpRe[k];
    }
    return { re: outRe, im: outIm };
  }
  const outRe = new Float64Array(n);
  const outIm = new Float64Array(n);
  transform(p, re, im, 0, 1, n, outRe, outIm, 0);
  return { re: outRe, im: outIm };
}

/** `np.fft.rfft(x)`: bins 0 .. floor(n/2) of a real signal's spectrum. */
export function rfft(x: ArrayLike<number>): { re: Float64Array; im: Float64Array } {
  const n = x.length;
  const { re, im } = dft(Float64Array.from(x), new Float64Array(n));
  const bins = Math.floor(n / 2) + 1;
  return { re: re.slice(0, bins), im: im.slice(0, bins) };
}

/** `np.fft.irfft(spectrum, n)`: the real signal of length n whose rfft is `spectrum` (its Hermitian extension). */
export function irfft(spectrum: { re: Float64Array; im: Float64Array }, n: number): Float64Array {
  const bins = Math.floor(n / 2) + 1;
  const re = new Float64Array(n);
  const im = new Float64Array(n);
  for (let k = 0; k < bins && k < spectrum.re.length; k++) {
    re[k] = spectrum.re[k];
    im[k] = -spectrum.im[k]; // conjugated: the inverse as a forward transform of the conjugate
  }
  for (let k = bins; k < n; k++) {
    re[k] = spectrum.re[n - k];
    im[k] = spectrum.im[n - k]; // conj(X[n - k]), conjugated again
  }
  // pocketfft ignores the imaginary parts of bin 0 and, for even n, of bin n/2
  im[0] = 0;
  if (n % 2 === 0) im[n / 2] = 0;
  const out = dft(re, im).re;
  for (let k = 0; k < n; k++) out[k] /= n;
  return out;
}
