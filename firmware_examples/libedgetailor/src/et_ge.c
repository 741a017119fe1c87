/* GE inference: a table of layers (edgetailor_model.c) run by a handful of
 * kernels, fp32 or int8, in one buffer of the arena.
 *
 * The layers' activations ping-pong inside one buffer of max_activation
 * elements: a layer reads its input at one end and writes its output at the
 * other, so GE needs the largest (input + output) of any layer, not the sum.
 *
 * int8 follows ONNX Runtime's QDQ semantics for a `server compress` GE:
 * uint8 activations with a zero point, symmetric per-channel int8 weights,
 * an int32 bias on the grid in_scale * weight_scale, and the product
 * requantized with one float multiplier per output channel, rounded half to
 * even and clamped to 0..255 (which is also what makes a removed ReLU). */
#include <math.h>
#include <string.h>

#include "et_internal.h"

/* Each kernel in a function of its own: inlined into et_ge_run, their loops
 * ran out of the Cortex-M4's registers and spilled in the innermost loop. */
#if defined(__GNUC__)
#define KERNEL static __attribute__((noinline))
#else
#define KERNEL static
#endif

size_t et_ge_arena_bytes(const et_model *model) {
    return ET_ALIGN8((size_t)model->max_activation * (model->quantized ? 1u : sizeof(float)));
}

static int layer_is_runnable(const et_layer *layer) {
    switch (layer->op) {
    case ET_OP_CONV2D:
    case ET_OP_MAXPOOL:
        return layer->kernel_h && layer->kernel_w && layer->stride_h && layer->stride_w;
    case ET_OP_RELU:
    case ET_OP_FLATTEN:
    case ET_OP_LINEAR:
        return 1;
    default:
        return 0;
    }
}

/* Model data is trusted to be what `export firmware` wrote, but checked
 * anyway before a kernel indexes with it: a hand-edited or mismatched
 * edgetailor_model.c gets ET_ERR_MODEL, not an out-of-bounds read. */
static et_status check_layer(const et_model *model, const et_layer *L, uint16_t i, uint64_t in, uint64_t out) {
    const int in_place = L->op == ET_OP_FLATTEN || L->op == ET_OP_RELU;
    const int weighted = L->op == ET_OP_CONV2D || L->op == ET_OP_LINEAR;
    if (!layer_is_runnable(L)) return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " has an op these kernels lack");
    if (!in || !out) return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " has an empty shape");
    if ((in_place ? in : in + out) > model->max_activation)
        return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " needs more than max_activation");
    if (in_place && in != out) return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " changes its size in place");
    if (weighted && (model->quantized ? !L->weight_q || !L->multiplier : !L->weight))
        return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " has no weights for this model's kind (fp32 or int8)");
    if (L->op == ET_OP_CONV2D || L->op == ET_OP_MAXPOOL) {
        /* every window starts inside the padded input; a max-pool has no padding */
        uint64_t last_y = (uint64_t)(L->out_h - 1u) * L->stride_h, last_x = (uint64_t)(L->out_w - 1u) * L->stride_w;
        if (L->op == ET_OP_MAXPOOL &&
            (L->out_c > L->in_c || last_y + L->kernel_h > L->in_h || last_x + L->kernel_w > L->in_w))
            return et_fail_n(ET_ERR_MODEL, "GE layer ", i, ": a max-pool window leaves the input");
        if (L->op == ET_OP_CONV2D && (last_y > (uint64_t)L->in_h + 2u * L->pad_top ||
                                      last_x > (uint64_t)L->in_w + 2u * L->pad_left))
            return et_fail_n(ET_ERR_MODEL, "GE layer ", i, ": a convolution window leaves the padded input");
    }
    if (L->tap < -1 || L->tap > 2) return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " has an unknown tap code");
    if ((L->tap == ET_TAP_LE || L->tap == 2) && out != model->tap_dim[ET_TAP_LE])
        return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " is LE's feature but not tap_dim's size");
    if ((L->tap == ET_TAP_GN || L->tap == 2) && out != model->tap_dim[ET_TAP_GN])
        return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " is GN's feature but not tap_dim's size");
    return ET_OK;
}

static et_status check_model(const et_model *model) {
    uint64_t previous;
    uint16_t i;
    int le_taps = 0, gn_taps = 0;
    et_status status;
    if (!model || model->abi_version != ET_ABI_VERSION)
        return et_fail(ET_ERR_MODEL, "the model data was written for another libedgetailor version; re-export it");
    if (!model->n_layers || !model->layers) return et_fail(ET_ERR_MODEL, "the model has no layers; re-export it");
    if (model->quantized ? !model->input_q_lut : !model->input_lut)
        return et_fail(ET_ERR_MODEL, "the model has no input table; re-export it");
    previous = (uint64_t)model->in_h * model->in_w;
    if (!previous || previous > model->max_activation)
        return et_fail(ET_ERR_MODEL, "the model's input does not fit max_activation");
    for (i = 0; i < model->n_layers; i++) {
        const et_layer *L = &model->layers[i];
        uint64_t in = (uint64_t)L->in_c * L->in_h * L->in_w, out = (uint64_t)L->out_c * L->out_h * L->out_w;
        if (in != previous) return et_fail_n(ET_ERR_MODEL, "GE layer ", i, " does not read what the layer before wrote");
        if ((status = check_layer(model, L, i, in, out)) != ET_OK) return status;
        le_taps += L->tap == ET_TAP_LE || L->tap == 2;
        gn_taps += L->tap == ET_TAP_GN || L->tap == 2;
        previous = out;
    }
    if (le_taps != 1 || gn_taps != 1) return et_fail(ET_ERR_MODEL, "the model must have one LE and one GN feature");
    if (previous != model->n_classes || model->n_classes < 2 || model->n_classes > 64)
        return et_fail(ET_ERR_MODEL, "GE's last layer must give one value per label (2 to 64 labels)");
    return ET_OK;
}

/* ------------------------------------------------------------------ fp32 */

/* The kernel rows and columns of an output position that fall inside the
 * input (the rest is padding, which adds nothing): computed once per
 * position, so the inner loops have no bounds checks. */
typedef struct {
    int lo, hi;
} span;

static span valid(long start, uint32_t kernel, uint32_t size) {
    span s;
    s.lo = start < 0 ? (int)-start : 0;
    s.hi = start + (long)kernel > (long)size ? (int)((long)size - start) : (int)kernel;
    if (s.hi < s.lo) s.hi = s.lo;
    return s;
}

KERNEL void conv_f32(const et_layer *L, const float *in, float *out) {
    const uint32_t kh = L->kernel_h, kw = L->kernel_w, plane = (uint32_t)L->in_h * L->in_w;
    uint32_t o, c, y, x;
    for (o = 0; o < L->out_c; o++) {
        const float *w_o = L->weight + (size_t)o * L->in_c * kh * kw;
        for (y = 0; y < L->out_h; y++) {
            const long iy = (long)(y * L->stride_h) - L->pad_top;
            const span rows = valid(iy, kh, L->in_h);
            for (x = 0; x < L->out_w; x++) {
                const long ix = (long)(x * L->stride_w) - L->pad_left;
                const span cols = valid(ix, kw, L->in_w);
                float sum = L->bias ? L->bias[o] : 0.0f;
                for (c = 0; c < L->in_c; c++) {
                    const float *w = w_o + (size_t)c * kh * kw;
                    int ky, kx;
                    for (ky = rows.lo; ky < rows.hi; ky++) {
                        /* the row's first pixel; kx starts where ix + kx is inside it */
                        const float *row = in + c * plane + (size_t)(iy + ky) * L->in_w;
                        const float *w_row = w + ky * (int)kw;
                        for (kx = cols.lo; kx < cols.hi; kx++) sum += row[ix + kx] * w_row[kx];
                    }
                }
                out[((size_t)o * L->out_h + y) * L->out_w + x] = sum;
            }
        }
    }
}

KERNEL void linear_f32(const et_layer *L, const float *in, float *out) {
    uint32_t o, i, n_in = (uint32_t)L->in_c * L->in_h * L->in_w;
    for (o = 0; o < L->out_c; o++) {
        const float *w = L->weight + (size_t)o * n_in;
        float sum = L->bias ? L->bias[o] : 0.0f;
        for (i = 0; i < n_in; i++) sum += w[i] * in[i];
        out[o] = sum;
    }
}

KERNEL void maxpool_f32(const et_layer *L, const float *in, float *out) {
    uint32_t c, y, x, ky, kx;
    for (c = 0; c < L->out_c; c++)
        for (y = 0; y < L->out_h; y++)
            for (x = 0; x < L->out_w; x++) {
                float best = -INFINITY;
                for (ky = 0; ky < L->kernel_h; ky++)
                    for (kx = 0; kx < L->kernel_w; kx++) {
                        float v = in[((size_t)c * L->in_h + y * L->stride_h + ky) * L->in_w + x * L->stride_w + kx];
                        if (v > best || v != v) best = v;   /* NaN propagates, as in ONNX Runtime */
                    }
                out[((size_t)c * L->out_h + y) * L->out_w + x] = best;
            }
}

/* ------------------------------------------------------------------ int8 */

static uint8_t requantize(int32_t acc, float multiplier, int32_t zero_point) {
    float scaled = rintf((float)acc * multiplier);   /* round half to even in the default mode */
    int32_t q;
    if (!(scaled <= 512.0f)) return scaled > 512.0f ? 255 : 0;   /* NaN too */
    if (scaled < -512.0f) return 0;
    q = (int32_t)scaled + zero_point;
    return (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
}

KERNEL void conv_q8(const et_layer *L, const uint8_t *in, uint8_t *out) {
    const uint32_t kh = L->kernel_h, kw = L->kernel_w, plane = (uint32_t)L->in_h * L->in_w;
    const int32_t zp = L->in_zero_point;
    uint32_t o, c, y, x;
    for (o = 0; o < L->out_c; o++) {
        const int8_t *w_o = L->weight_q + (size_t)o * L->in_c * kh * kw;
        for (y = 0; y < L->out_h; y++) {
            const long iy = (long)(y * L->stride_h) - L->pad_top;
            const span rows = valid(iy, kh, L->in_h);
            for (x = 0; x < L->out_w; x++) {
                const long ix = (long)(x * L->stride_w) - L->pad_left;
                const span cols = valid(ix, kw, L->in_w);
                int32_t acc = L->bias_q ? L->bias_q[o] : 0;
                for (c = 0; c < L->in_c; c++) {
                    const int8_t *w = w_o + (size_t)c * kh * kw;
                    int ky, kx;
                    for (ky = rows.lo; ky < rows.hi; ky++) {   /* padding is the zero point: adds 0 */
                        const uint8_t *row = in + c * plane + (size_t)(iy + ky) * L->in_w;
                        const int8_t *w_row = w + ky * (int)kw;
                        for (kx = cols.lo; kx < cols.hi; kx++) acc += ((int32_t)row[ix + kx] - zp) * w_row[kx];
                    }
                }
                out[((size_t)o * L->out_h + y) * L->out_w + x] = requantize(acc, L->multiplier[o], L->out_zero_point);
            }
        }
    }
}

KERNEL void linear_q8(const et_layer *L, const uint8_t *in, uint8_t *out) {
    uint32_t o, i, n_in = (uint32_t)L->in_c * L->in_h * L->in_w;
    int32_t zp = L->in_zero_point;
    for (o = 0; o < L->out_c; o++) {
        const int8_t *w = L->weight_q + (size_t)o * n_in;
        int32_t acc = L->bias_q ? L->bias_q[o] : 0;
        for (i = 0; i < n_in; i++) acc += ((int32_t)in[i] - zp) * w[i];
        out[o] = requantize(acc, L->multiplier[o], L->out_zero_point);
    }
}

KERNEL void maxpool_q8(const et_layer *L, const uint8_t *in, uint8_t *out) {
    uint32_t c, y, x, ky, kx;
    for (c = 0; c < L->out_c; c++)
        for (y = 0; y < L->out_h; y++)
            for (x = 0; x < L->out_w; x++) {
                uint8_t best = 0;
                for (ky = 0; ky < L->kernel_h; ky++)
                    for (kx = 0; kx < L->kernel_w; kx++) {
                        uint8_t v = in[((size_t)c * L->in_h + y * L->stride_h + ky) * L->in_w + x * L->stride_w + kx];
                        if (v > best) best = v;
                    }
                out[((size_t)c * L->out_h + y) * L->out_w + x] = best;
            }
}

/* --------------------------------------------------------------- running */

static void copy_tap(const et_model *model, int which, const void *values, uint32_t n, float *out) {
    uint32_t i;
    if (!out) return;
    if (!model->quantized) {
        memcpy(out, values, n * sizeof(float));
        return;
    }
    for (i = 0; i < n; i++)
        out[i] = (float)((int32_t)((const uint8_t *)values)[i] - model->tap_zero_point[which]) * model->tap_scale[which];
}

et_status et_ge_run(const et_model *model, et_arena *arena, const uint8_t *image, float *logits, float *le_features,
                    float *gn_features) {
    size_t mark, element = model && model->quantized ? 1u : sizeof(float);
    uint8_t *buffer;
    void *start;
    uint32_t pixels, i, in_at = 0, in_n;
    et_status status;
    uint16_t k;
    if (!model || !arena || !image || !logits) return et_fail(ET_ERR_ARGUMENT, "et_ge_run: a NULL argument");
    if ((status = check_model(model)) != ET_OK) return status;
    mark = arena->used;
    start = et_arena_alloc(arena, et_ge_arena_bytes(model));
    buffer = (uint8_t *)start;
    if (!start)
        return et_fail_n(ET_ERR_ARENA, "GE needs ", (long)et_ge_arena_bytes(model), " more bytes of arena");
    pixels = (uint32_t)model->in_h * model->in_w;
    if (model->quantized)
        for (i = 0; i < pixels; i++) buffer[i] = model->input_q_lut[image[i]];
    else
        for (i = 0; i < pixels; i++) ((float *)start)[i] = model->input_lut[image[i]];
    in_n = pixels;
    for (k = 0; k < model->n_layers; k++) {
        const et_layer *L = &model->layers[k];
        uint32_t out_n = (uint32_t)L->out_c * L->out_h * L->out_w;
        /* the output goes at the other end of the buffer from the input */
        uint32_t out_at = in_at == 0 ? model->max_activation - out_n : 0;
        void *in = buffer + (size_t)in_at * element, *out = buffer + (size_t)out_at * element;
        switch (L->op) {
        case ET_OP_FLATTEN:
            out_at = in_at;   /* NCHW is channel-major already */
            break;
        case ET_OP_RELU:
            out_at = in_at;   /* in place */
            if (model->quantized) {
                uint8_t *q = (uint8_t *)in, floor_q = (uint8_t)L->in_zero_point;
                for (i = 0; i < out_n; i++) q[i] = q[i] < floor_q ? floor_q : q[i];
            } else {
                float *v = (float *)in;
                for (i = 0; i < out_n; i++) v[i] = v[i] > 0.0f ? v[i] : (v[i] != v[i] ? v[i] : 0.0f);
            }
            break;
        case ET_OP_CONV2D:
            if (model->quantized) conv_q8(L, (const uint8_t *)in, (uint8_t *)out);
            else conv_f32(L, (const float *)in, (float *)out);
            break;
        case ET_OP_MAXPOOL:
            if (model->quantized) maxpool_q8(L, (const uint8_t *)in, (uint8_t *)out);
            else maxpool_f32(L, (const float *)in, (float *)out);
            break;
        case ET_OP_LINEAR:
            if (model->quantized) linear_q8(L, (const uint8_t *)in, (uint8_t *)out);
            else linear_f32(L, (const float *)in, (float *)out);
            break;
        default:
            break;
        }
        in_at = out_at;
        in_n = out_n;
        if (L->tap == ET_TAP_LE || L->tap == 2) copy_tap(model, ET_TAP_LE, buffer + (size_t)in_at * element, in_n, le_features);
        if (L->tap == ET_TAP_GN || L->tap == 2) copy_tap(model, ET_TAP_GN, buffer + (size_t)in_at * element, in_n, gn_features);
    }
    if (model->quantized)
        for (i = 0; i < in_n; i++)
            logits[i] = (float)((int32_t)buffer[in_at + i] - model->logits_zero_point) * model->logits_scale;
    else
        memcpy(logits, buffer + (size_t)in_at * element, in_n * sizeof(float));
    arena->used = mark;
    return ET_OK;
}
