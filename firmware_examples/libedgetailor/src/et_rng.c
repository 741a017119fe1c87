/* NumPy's default_rng(seed) (SeedSequence, PCG64, Generator), bit for bit,
 * for the draws personalization makes: uniform, integers and permutation.
 *
 * Written by hand because "the same seed gives the same training" must hold
 * on every client, and no C library reproduces NumPy's streams. It follows
 * numpy/random/bit_generator.pyx, _pcg64.pyx and distributions.c, like the
 * TypeScript SDK's rng.ts; the 128-bit LCG runs on 64-bit halves, since
 * 32-bit targets have no __int128. */
#include "et_internal.h"

#define MULT_HI 0x2360ED051FC65DA4ull
#define MULT_LO 0x4385DF649FCCF645ull

/* The full 128-bit product of two 64-bit numbers. */
static void mul64(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo) {
    uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
    uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    uint64_t middle = (p00 >> 32) + (p01 & 0xFFFFFFFFu) + (p10 & 0xFFFFFFFFu);
    *lo = (middle << 32) | (p00 & 0xFFFFFFFFu);
    *hi = p11 + (p01 >> 32) + (p10 >> 32) + (middle >> 32);
}

/* state = state * MULTIPLIER + increment (mod 2^128) */
static void step(et_rng *rng) {
    uint64_t hi, lo;
    mul64(rng->state_lo, MULT_LO, &hi, &lo);
    hi += rng->state_hi * MULT_LO + rng->state_lo * MULT_HI;
    rng->state_lo = lo + rng->inc_lo;
    rng->state_hi = hi + rng->inc_hi + (rng->state_lo < lo);
}

static uint32_t mul32(uint32_t a, uint32_t b) { return (uint32_t)(a * b); }

/* SeedSequence(seed).generate_state(8, uint32). */
static void seed_sequence(uint64_t seed, uint32_t out[8]) {
    uint32_t entropy[2], pool[4], hash_const = 0x43b0d7e5u, const_b = 0x8b51f9ddu;
    int words = 0, i, src, dst;
    entropy[words++] = (uint32_t)seed;
    if (seed >> 32) entropy[words++] = (uint32_t)(seed >> 32);
#define HASHMIX(value, result)                      \
    do {                                            \
        uint32_t v_ = (value) ^ hash_const;         \
        hash_const = mul32(hash_const, 0x931e8875u); \
        v_ = mul32(v_, hash_const);                 \
        (result) = v_ ^ (v_ >> 16);                 \
    } while (0)
#define MIX(x, y, result)                                                   \
    do {                                                                    \
        uint32_t r_ = mul32(0xca01f9ddu, (x)) - mul32(0x4973f715u, (y));     \
        (result) = r_ ^ (r_ >> 16);                                         \
    } while (0)
    for (i = 0; i < 4; i++) HASHMIX(i < words ? entropy[i] : 0u, pool[i]);
    for (src = 0; src < 4; src++)
        for (dst = 0; dst < 4; dst++)
            if (src != dst) {
                uint32_t h;
                HASHMIX(pool[src], h);
                MIX(pool[dst], h, pool[dst]);
            }
    /* (entropy beyond four words never happens: a seed is at most two) */
    for (i = 0; i < 8; i++) {
        uint32_t value = pool[i % 4] ^ const_b;
        const_b = mul32(const_b, 0x58f38dedu);
        value = mul32(value, const_b);
        out[i] = value ^ (value >> 16);
    }
#undef HASHMIX
#undef MIX
}

void et_rng_seed(et_rng *rng, uint64_t seed) {
    uint32_t w[8];
    uint64_t val[4];
    int k;
    seed_sequence(seed, w);
    for (k = 0; k < 4; k++) val[k] = (uint64_t)w[2 * k] | ((uint64_t)w[2 * k + 1] << 32);
    /* pcg64_set_seed: initstate = val0:val1, initseq = val2:val3 */
    rng->inc_hi = (val[2] << 1) | (val[3] >> 63);
    rng->inc_lo = (val[3] << 1) | 1u;
    rng->state_hi = 0;
    rng->state_lo = 0;
    step(rng);
    rng->state_lo += val[1];
    rng->state_hi += val[0] + (rng->state_lo < val[1]);
    step(rng);
    rng->has_buffered = 0;
    rng->buffered = 0;
}

uint64_t et_rng_next64(et_rng *rng) {
    uint64_t x;
    unsigned rot;
    step(rng);
    x = rng->state_hi ^ rng->state_lo;
    rot = (unsigned)(rng->state_hi >> 58);
    return rot ? (x >> rot) | (x << (64u - rot)) : x;
}

uint32_t et_rng_next32(et_rng *rng) {
    uint64_t draw;
    if (rng->has_buffered) {
        rng->has_buffered = 0;
        return rng->buffered;
    }
    draw = et_rng_next64(rng);
    rng->has_buffered = 1;
    rng->buffered = (uint32_t)(draw >> 32);
    return (uint32_t)draw;
}

double et_rng_uniform(et_rng *rng, double low, double high) {
    double unit = (double)(et_rng_next64(rng) >> 11) * (1.0 / 9007199254740992.0);
    return low + (high - low) * unit;
}

uint32_t et_rng_bounded(et_rng *rng, uint32_t max) {
    uint32_t excl, leftover;
    uint64_t m;
    if (max == 0) return 0;
    if (max == 0xFFFFFFFFu) return et_rng_next32(rng);
    excl = max + 1u;
    m = (uint64_t)et_rng_next32(rng) * excl;
    leftover = (uint32_t)m;
    if (leftover < excl) {
        uint32_t threshold = (0xFFFFFFFFu - max) % excl;
        while (leftover < threshold) {
            m = (uint64_t)et_rng_next32(rng) * excl;
            leftover = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

/* random_interval: masked rejection, what Generator.shuffle draws with. */
static uint32_t interval(et_rng *rng, uint32_t max) {
    uint32_t mask = max, value;
    if (max == 0) return 0;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    do value = et_rng_next32(rng) & mask;
    while (value > max);
    return value;
}

void et_rng_permutation(et_rng *rng, uint32_t *out, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) out[i] = i;
    for (i = n ? n - 1 : 0; i > 0; i--) {
        uint32_t j = interval(rng, i), t = out[j];
        out[j] = out[i];
        out[i] = t;
    }
}
