/**
 * NumPy's `default_rng(seed)` (SeedSequence + PCG64 + Generator), bit for bit,
 * for the draws personalization makes: `uniform`, `integers`, `permutation`
 * and `standard_normal(dtype=float32)`.
 *
 * Why by hand: "the same seed gives the same training" must hold across
 * clients, so a phone and the Python runtime make the same jitter, batch order
 * and replay picks. No npm package reproduces NumPy's streams (SeedSequence's
 * hashing, PCG64's XSL-RR output, the buffered 32-bit draws and Lemire's
 * bounded integers), so this follows numpy/random/bit_generator.pyx,
 * _pcg64.pyx, distributions.c and _generator.pyx. The 128-bit LCG runs on
 * eight 16-bit limbs in ordinary numbers: BigInt costs ~10x as much per draw.
 * The tests compare every stream with NumPy's own output.
 */

const MASK32 = 0xffffffff;

// SeedSequence constants (numpy/random/bit_generator.pyx)
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const POOL_SIZE = 4;

const mul32 = (a: number, b: number): number => Math.imul(a, b) >>> 0;

function seedWords(seed: number | bigint): number[] {
  let n = BigInt(seed);
  if (n < 0n) throw new RangeError(`a seed must be a non-negative integer, got ${seed}`);
  const words: number[] = [];
  do {
    words.push(Number(n & 0xffffffffn));
    n >>= 32n;
  } while (n > 0n);
  return words;
}

/** SeedSequence(seed).generate_state(words, uint32). */
export function seedSequenceState(seed: number | bigint, words: number): Uint32Array {
  const entropy = seedWords(seed);
  let hashConst = INIT_A;
  const hashmix = (value: number): number => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    const result = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (result ^ (result >>> 16)) >>> 0;
  };
  const pool = new Array<number>(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL_SIZE; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  const out = new Uint32Array(words);
  let constB = INIT_B;
  for (let i = 0; i < words; i++) {
    let value = (pool[i % POOL_SIZE] ^ constB) >>> 0;
    constB = mul32(constB, MULT_B);
    value = mul32(value, constB);
    out[i] = (value ^ (value >>> 16)) >>> 0;
  }
  return out;
}

// PCG64's multiplier 0x2360ED051FC65DA44385DF649FCCF645, as 16-bit limbs, least significant first
const MULTIPLIER = [0xf645, 0x9fcc, 0xdf64, 0x4385, 0x5da4, 0x1fc6, 0xed05, 0x2360];

/** 16-bit limbs (least significant first) of a 128-bit number given as four 32-bit words (most significant first). */
function limbs(words: number[]): number[] {
  const out: number[] = [];
  for (let i = 3; i >= 0; i--) out.push(words[i] & 0xffff, words[i] >>> 16);
  return out;
}

export class Pcg64 {
  private state: number[];
  private readonly increment: number[];
  private hasUint32 = false;
  private buffered = 0;
  private readonly product = new Array<number>(8).fill(0);
  hi = 0; // the last 64-bit output, as two 32-bit halves
  lo = 0;

  /** pcg64_set_seed: state and increment from SeedSequence's four 64-bit words. */
  constructor(seed: number | bigint) {
    const w = seedSequenceState(seed, 8); // uint64 words are (w[2k] low, w[2k+1] high)
    const initState = limbs([w[1], w[0], w[3], w[2]]);
    const initSeq = limbs([w[5], w[4], w[7], w[6]]);
    // inc = (initseq << 1) | 1
    const inc = new Array<number>(8);
    let carry = 1;
    for (let i = 0; i < 8; i++) {
      const v = initSeq[i] * 2 + carry;
      inc[i] = v & 0xffff;
      carry = v >>> 16;
    }
    this.increment = inc;
    this.state = new Array<number>(8).fill(0);
    this.step();
    let c = 0;
    for (let i = 0; i < 8; i++) {
      const v = this.state[i] + initState[i] + c;
      this.state[i] = v & 0xffff;
      c = v >>> 16;
    }
    this.step();
  }

  /** state = state * MULTIPLIER + increment (mod 2^128). */
  private step(): void {
    const s = this.state;
    const p = this.product;
    for (let k = 0; k < 8; k++) {
      let sum = 0;
      for (let i = 0; i <= k; i++) sum += s[i] * MULTIPLIER[k - i];
      p[k] = sum; // < 8 * 2^32: exact in a double
    }
    let carry = 0;
    for (let k = 0; k < 8; k++) {
      const v = p[k] + this.increment[k] + carry;
      const low = v % 65536;
      s[k] = low;
      carry = (v - low) / 65536;
    }
  }

  /** The next 64-bit output (XSL-RR), left in `hi` and `lo`. */
  next64(): void {
    this.step();
    const s = this.state;
    const hi = ((s[7] << 16) | s[6]) >>> 0;
    const x1 = (hi ^ (((s[3] << 16) | s[2]) >>> 0)) >>> 0; // high 32 bits of (high64 ^ low64)
    const x0 = ((((s[5] << 16) | s[4]) >>> 0) ^ (((s[1] << 16) | s[0]) >>> 0)) >>> 0;
    const rot = hi >>> 26; // high64 >> 58
    // rotate the 64-bit (x1:x0) right by rot
    let a = x1;
    let b = x0;
    let r = rot;
    if (r >= 32) {
      [a, b] = [b, a];
      r -= 32;
    }
    if (r === 0) {
      this.hi = a;
      this.lo = b;
    } else {
      this.hi = ((a >>> r) | (b << (32 - r))) >>> 0;
      this.lo = ((b >>> r) | (a << (32 - r))) >>> 0;
    }
  }

  /** next_uint32: the low half of a 64-bit output, then its high half. */
  nextUint32(): number {
    if (this.hasUint32) {
      this.hasUint32 = false;
      return this.buffered;
    }
    this.next64();
    this.hasUint32 = true;
    this.buffered = this.hi;
    return this.lo;
  }

  /** next_double: the top 53 bits of a 64-bit output. */
  nextDouble(): number {
    this.next64();
    return (this.hi * 2097152 + (this.lo >>> 11)) / 9007199254740992;
  }
}

/**
 * The 256-layer ziggurat of NumPy's single-precision normals (Marsaglia and
 * Tsang 2000, as numpy/random/src/distributions/distributions.c draws them):
 * `ki` the 23-bit acceptance bounds, `wi` the layer widths, `fi` the density
 * at each layer. Computed from the two numbers that define the ziggurat
 * rather than pasted: NumPy's tables come from the same recurrence, and the
 * tests compare these normals with NumPy's own.
 */
const ZIGGURAT_R = 3.6541528853610088;   // where the tail begins
const ZIGGURAT_V = 0.00492867323399;     // each layer's area
const ZIGGURAT_INV_R_F = Math.fround(0.27366123732975828);
const ZIGGURAT_R_F = Math.fround(ZIGGURAT_R);

function zigguratTables(): { ki: Uint32Array; wi: Float32Array; fi: Float32Array } {
  const m1 = 2 ** 23;
  // NumPy's bounds are rounded to the nearest integer, not truncated (the tests find every one of them)
  const bound = (v: number) => Math.round(v);
  const ki = new Uint32Array(256);
  const wi = new Float32Array(256);
  const fi = new Float32Array(256);
  let dn = ZIGGURAT_R;
  let tn = dn;
  const q = ZIGGURAT_V / Math.exp(-0.5 * dn * dn);
  ki[0] = bound((dn / q) * m1);
  ki[1] = 0;
  wi[0] = q / m1;
  wi[255] = dn / m1;
  fi[0] = 1;
  fi[255] = Math.exp(-0.5 * dn * dn);
  for (let i = 254; i >= 1; i--) {
    dn = Math.sqrt(-2 * Math.log(ZIGGURAT_V / dn + Math.exp(-0.5 * dn * dn)));
    ki[i + 1] = bound((dn / tn) * m1);
    tn = dn;
    fi[i] = Math.exp(-0.5 * dn * dn);
    wi[i] = dn / m1;
  }
  return { ki, wi, fi };
}

let ziggurat: ReturnType<typeof zigguratTables> | null = null;

/** NumPy's `Generator` over PCG64: the draws the device's personalization makes, in NumPy's order. */
export class NumpyRandom {
  private readonly bits: Pcg64;

  constructor(seed: number | bigint) {
    this.bits = new Pcg64(seed);
  }

  /** `rng.uniform(low, high, n)`: low + (high - low) * U, in float64. */
  uniform(low: number, high: number, n: number): Float64Array {
    const out = new Float64Array(n);
    const range = high - low;
    for (let i = 0; i < n; i++) out[i] = low + range * this.bits.nextDouble();
    return out;
  }

  /** A uniform integer in [0, rng] (inclusive), by Lemire's method on 32-bit draws (rng < 2^32). */
  private bounded(rng: number): number {
    if (rng === 0) return 0;
    if (rng === MASK32) return this.bits.nextUint32();
    if (rng > MASK32) throw new RangeError("ranges of 2^32 or more are not supported");
    const excl = rng + 1;
    let draw = this.bits.nextUint32();
    let leftover = Math.imul(draw, excl) >>> 0;
    if (leftover < excl) {
      const threshold = (MASK32 - rng) % excl;
      while (leftover < threshold) {
        draw = this.bits.nextUint32();
        leftover = Math.imul(draw, excl) >>> 0;
      }
    }
    // the high 32 bits of draw * excl, exactly: split draw into 16-bit halves
    const high = Math.floor(draw / 65536) * excl;
    const low = (draw & 0xffff) * excl;
    return Math.floor((high + Math.floor(low / 65536)) / 65536);
  }

  /** `rng.integers(low, high, n)` (high exclusive), as int64 values. */
  integers(low: number, high: number, n: number): Int32Array | Float64Array {
    if (high <= low) throw new RangeError(`integers: high (${high}) must exceed low (${low})`);
    const out = high <= 2147483647 && low >= -2147483648 ? new Int32Array(n) : new Float64Array(n);
    const rng = high - low - 1;
    for (let i = 0; i < n; i++) out[i] = low + this.bounded(rng);
    return out;
  }

  /** random_interval: a uniform integer in [0, max] by masked rejection (what `shuffle` draws with). */
  private interval(max: number): number {
    if (max === 0) return 0;
    if (max > MASK32) throw new RangeError("intervals of 2^32 or more are not supported");
    let mask = max;
    mask |= mask >>> 1;
    mask |= mask >>> 2;
    mask |= mask >>> 4;
    mask |= mask >>> 8;
    mask |= mask >>> 16;
    mask >>>= 0;
    let value: number;
    do value = (this.bits.nextUint32() & mask) >>> 0;
    while (value > max);
    return value;
  }

  /** next_float: a float32 in [0, 1) from the top 24 bits of a 32-bit draw. */
  private nextFloat(): number {
    return (this.bits.nextUint32() >>> 8) / 16777216;
  }

  /**
   * `rng.standard_normal(n, dtype=np.float32)`: random_standard_normal_f, one
   * 32-bit draw per value almost always (8 bits pick the layer, one the sign,
   * 23 the position), float32 arithmetic where NumPy's C uses floats.
   */
  standardNormalF32(n: number): Float32Array {
    const { ki, wi, fi } = (ziggurat ??= zigguratTables());
    const f = Math.fround;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      for (;;) {
        const r = this.bits.nextUint32();
        const idx = r & 0xff;
        const sign = (r >>> 8) & 1;
        const rabs = (r >>> 9) & 0x7fffff;
        let x = f(rabs * wi[idx]);
        if (sign) x = -x;
        if (rabs < ki[idx]) {
          out[i] = x;
          break;
        }
        if (idx === 0) {
          let value = 0;
          // The tail beyond R (one draw in ~4000), by exponentials. NumPy takes log1pf from the C library,
          // which is not correctly rounded, so these values may differ from NumPy's by an ulp, as NumPy's
          // own differ between platforms; the stream stays in step.
          for (;;) {
            const xx = f(-ZIGGURAT_INV_R_F * f(Math.log1p(-this.nextFloat())));
            const yy = f(-f(Math.log1p(-this.nextFloat())));
            if (f(yy + yy) > f(xx * xx)) {
              value = (rabs >>> 8) & 1 ? -f(ZIGGURAT_R_F + xx) : f(ZIGGURAT_R_F + xx);
              break;
            }
          }
          out[i] = value;
          break;
        }
        if (f(f(f(fi[idx - 1] - fi[idx]) * this.nextFloat()) + fi[idx]) < Math.exp(-0.5 * x * x)) {
          out[i] = x;
          break;
        }
      }
    }
    return out;
  }

  /** `rng.permutation(n)`: a Fisher-Yates shuffle of 0..n-1 from the end, as `Generator.shuffle` does. */
  permutation(n: number): Int32Array {
    const out = new Int32Array(n);
    for (let i = 0; i < n; i++) out[i] = i;
    for (let i = n - 1; i > 0; i--) {
      const j = this.interval(i);
      const t = out[j];
      out[j] = out[i];
      out[i] = t;
    }
    return out;
  }
}

