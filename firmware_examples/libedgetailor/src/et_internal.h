/* What the library's modules share and the public header does not show. */
#ifndef ET_INTERNAL_H
#define ET_INTERNAL_H

#include <float.h>

#include "edgetailor.h"

/* Parity with NumPy needs float32 arithmetic rounded at every step: no
 * fused multiply-adds (the Makefile passes -ffp-contract=off; clang also
 * honours the pragma) and no x87 extended precision. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "libedgetailor needs float arithmetic in float (FLT_EVAL_METHOD 0): on 32-bit x86 build with -msse2 -mfpmath=sse"
#endif

/* ---- errors: a status plus a message naming the problem (et_util.c) */
et_status et_fail(et_status status, const char *message);
/* The message, then a number and more text: "... 12 ..." without printf,
 * which on a microcontroller costs more flash than this library. */
et_status et_fail_n(et_status status, const char *before, long value, const char *after);

/* ---- the arena: a bump allocator with marks, 8-byte aligned (et_util.c) */
void *et_arena_alloc(et_arena *arena, size_t bytes);
#define ET_ALIGN8(n) (((size_t)(n) + 7u) & ~(size_t)7u)

/* ---- NumPy's default_rng(seed): SeedSequence + PCG64 + Generator (et_rng.c) */
typedef struct {
    uint64_t state_hi, state_lo, inc_hi, inc_lo;
    uint32_t buffered;
    int has_buffered;
} et_rng;

void et_rng_seed(et_rng *rng, uint64_t seed);
uint64_t et_rng_next64(et_rng *rng);
uint32_t et_rng_next32(et_rng *rng);            /* next_uint32: halves of a 64-bit draw, low first */
double et_rng_uniform(et_rng *rng, double low, double high);
uint32_t et_rng_bounded(et_rng *rng, uint32_t max);    /* integers(0, max + 1): Lemire on 32-bit draws */
void et_rng_permutation(et_rng *rng, uint32_t *out, uint32_t n);

/* ---- GE kernels (et_ge.c): the arena space et_ge_run needs */
size_t et_ge_arena_bytes(const et_model *model);

/* ---- the jitter of device/mixture.py (et_jitter.c): one warped copy, float32 as NumPy */
size_t et_jitter_arena_bytes(const et_model *model);
void et_jitter_one(const et_model *model, const uint8_t *image, double rotation, double scale, double ty, double tx,
                   float *padded, uint8_t *out);
float et_round_half_even(float x);

/* ---- LE and GN (et_experts.c): forward, and the gradient of one row added in */
typedef struct {
    float *slope, *z, *dz, *logits;   /* working rows, et_experts_work_floats(model) floats in all */
} et_expert_work;

size_t et_experts_work_floats(const et_model *model);
void et_experts_work_init(const et_model *model, float *memory, et_expert_work *work);
void et_le_forward(const et_model *model, const float *params, const float *features, const float *base_logits,
                   et_expert_work *work, float *logits);
/* LE's cross-entropy on one row; adds scale * d(loss)/d(params) into grad. Returns the row's loss. */
float et_le_backward(const et_model *model, const float *params, const float *features, const float *base_logits,
                     uint32_t label, float scale, et_expert_work *work, float *grad);
float et_gn_score(const et_model *model, const float *params, const float *features);
float et_gn_backward(const et_model *model, const float *params, const float *features, uint32_t target, float scale,
                     float *grad);
float et_sigmoid(float x);
/* One AdamW step as torch.optim.AdamW (and the bundle's step programs) take it; t counts from 1. */
void et_adamw_step(const et_adamw *opt, float lr, uint32_t t, uint32_t n, float *params, const float *grad, float *m,
                   float *v);

/* ---- replay glyphs (et_util.c) */
et_status et_replay_decode(const et_model *model, uint32_t index, uint8_t *pixels);

#endif
