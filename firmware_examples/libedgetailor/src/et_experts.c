/* The Local Expert and the Gating Network (server_side/experts.py): forward,
 * the cross-entropy gradient of one row, and AdamW. Training streams rows,
 * adding each one's gradient into one buffer, so a batch costs one row of
 * RAM; the update is the bundle's step program's, which is torch's AdamW.
 *
 * LE channel_mix: logits = base + U softplus(M f_p + m) + b at every
 * position p of a channel-major feature (f[c * positions + p]), with the
 * mixed rows concatenated position-major. LE lowrank: base + U (V f) + b
 * (rank 0: base + W f + b). GN: logits [0, s], s = w.f + b. */
#include <math.h>
#include <string.h>

#include "et_internal.h"

#define NO_OFFSET 0xFFFFFFFFu

float et_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* torch's softplus (beta 1, threshold 20); its slope, the sigmoid, from the same exp */
static float softplus(float x, float *slope) {
    float e;
    if (x > 20.0f) {
        *slope = 1.0f;
        return x;
    }
    e = expf(x);
    *slope = e / (1.0f + e);
    return log1pf(e);
}

static uint32_t positions(const et_model *model) {
    return model->le_channels ? model->tap_dim[ET_TAP_LE] / model->le_channels : 0;
}

/* width of LE's hidden row: channel_mix positions*width; lowrank rank (0: none) */
static uint32_t hidden(const et_model *model) {
    return model->le_kind == ET_LE_CHANNEL_MIX ? positions(model) * model->le_width : model->le_rank;
}

size_t et_experts_work_floats(const et_model *model) { return 3u * hidden(model) + model->n_classes; }

void et_experts_work_init(const et_model *model, float *memory, et_expert_work *work) {
    uint32_t n = hidden(model);
    work->slope = memory;
    work->z = memory + n;
    work->dz = memory + 2 * n;
    work->logits = memory + 3 * n;
}

void et_le_forward(const et_model *model, const float *params, const float *features, const float *base_logits,
                   et_expert_work *work, float *logits) {
    const uint32_t classes = model->n_classes, dim = model->tap_dim[ET_TAP_LE];
    const float *up_w = params + model->le_off_up_weight, *up_b = params + model->le_off_up_bias;
    uint32_t k, j, n = hidden(model);
    const float *x = work->z;   /* what U multiplies */
    if (model->le_kind == ET_LE_CHANNEL_MIX) {
        const uint32_t P = positions(model), W = model->le_width, C = model->le_channels;
        const float *mix_w = params + model->le_off_a_weight, *mix_b = params + model->le_off_a_bias;
        uint32_t p, w, c;
        for (p = 0; p < P; p++)
            for (w = 0; w < W; w++) {
                float sum = mix_b[w];
                for (c = 0; c < C; c++) sum += mix_w[w * C + c] * features[c * P + p];
                work->z[p * W + w] = softplus(sum, &work->slope[p * W + w]);
            }
    } else if (model->le_rank) {
        const float *down = params + model->le_off_a_weight;
        for (j = 0; j < n; j++) {
            float sum = 0.0f;
            uint32_t i;
            for (i = 0; i < dim; i++) sum += down[j * dim + i] * features[i];
            work->z[j] = sum;
        }
    } else {
        x = features;
        n = dim;
    }
    for (k = 0; k < classes; k++) {
        float sum = up_b[k];
        for (j = 0; j < n; j++) sum += up_w[k * n + j] * x[j];
        logits[k] = base_logits[k] + sum;
    }
}

/* Softmax minus one-hot of `logits`, times scale, into `d`; returns the cross-entropy. */
static float cross_entropy(const float *logits, uint32_t classes, uint32_t label, float scale, float *d) {
    float top = logits[0], total = 0.0f, log_total;
    uint32_t k;
    for (k = 1; k < classes; k++)
        if (logits[k] > top) top = logits[k];
    for (k = 0; k < classes; k++) total += d[k] = expf(logits[k] - top);
    /* total >= 1: the largest logit adds exp(0) */
    log_total = logf(total);   /* cppcheck-suppress invalidFunctionArg */
    for (k = 0; k < classes; k++) d[k] = (d[k] / total - (k == label ? 1.0f : 0.0f)) * scale;
    return log_total + top - logits[label];
}

float et_le_backward(const et_model *model, const float *params, const float *features, const float *base_logits,
                     uint32_t label, float scale, et_expert_work *work, float *grad) {
    const uint32_t classes = model->n_classes, dim = model->tap_dim[ET_TAP_LE];
    const float *up_w = params + model->le_off_up_weight;
    float d[64], loss;
    uint32_t k, j, n = hidden(model);
    const float *x = work->z;
    if (classes > 64) return NAN;   /* et_personalize refuses such models before training */
    et_le_forward(model, params, features, base_logits, work, work->logits);
    loss = cross_entropy(work->logits, classes, label, scale, d);
    if (model->le_kind != ET_LE_CHANNEL_MIX && !model->le_rank) {
        x = features;
        n = dim;
    }
    for (k = 0; k < classes; k++) {
        float *g = grad + model->le_off_up_weight + k * n;
        grad[model->le_off_up_bias + k] += d[k];
        for (j = 0; j < n; j++) g[j] += d[k] * x[j];
    }
    if (model->le_kind != ET_LE_CHANNEL_MIX && !model->le_rank) return loss;
    for (j = 0; j < n; j++) {
        float sum = 0.0f;
        for (k = 0; k < classes; k++) sum += up_w[k * n + j] * d[k];
        work->dz[j] = sum;
    }
    if (model->le_kind == ET_LE_CHANNEL_MIX) {
        const uint32_t P = positions(model), W = model->le_width, C = model->le_channels;
        float *g_w = grad + model->le_off_a_weight, *g_b = grad + model->le_off_a_bias;
        uint32_t p, w, c;
        for (p = 0; p < P; p++)
            for (w = 0; w < W; w++) {
                float dh = work->dz[p * W + w] * work->slope[p * W + w];
                g_b[w] += dh;
                for (c = 0; c < C; c++) g_w[w * C + c] += dh * features[c * P + p];
            }
    } else {
        float *g_down = grad + model->le_off_a_weight;
        uint32_t i;
        for (j = 0; j < n; j++)
            for (i = 0; i < dim; i++) g_down[j * dim + i] += work->dz[j] * features[i];
    }
    return loss;
}

float et_gn_score(const et_model *model, const float *params, const float *features) {
    const float *w = params + model->gn_off_weight;
    float sum = params[model->gn_off_bias];
    uint32_t i, dim = model->tap_dim[ET_TAP_GN];
    for (i = 0; i < dim; i++) sum += w[i] * features[i];
    return sum;
}

float et_gn_backward(const et_model *model, const float *params, const float *features, uint32_t target, float scale,
                     float *grad) {
    float logits[2], d[2], loss;
    uint32_t i, dim = model->tap_dim[ET_TAP_GN];
    float *g = grad + model->gn_off_weight;
    logits[0] = 0.0f;
    logits[1] = et_gn_score(model, params, features);
    loss = cross_entropy(logits, 2, target, scale, d);
    grad[model->gn_off_bias] += d[1];
    for (i = 0; i < dim; i++) g[i] += d[1] * features[i];
    return loss;
}

void et_adamw_step(const et_adamw *opt, float lr, uint32_t t, uint32_t n, float *params, const float *grad, float *m,
                   float *v) {
    /* the step program's constants: float32(beta), float32(1 - beta) from the doubles */
    const float b1 = (float)opt->beta1, b2 = (float)opt->beta2, c1 = (float)(1.0 - opt->beta1),
                c2 = (float)(1.0 - opt->beta2), eps = (float)opt->eps, decay = (float)opt->weight_decay;
    const float tf = (float)t, step = lr / (1.0f - powf(b1, tf)), root = sqrtf(1.0f - powf(b2, tf));
    uint32_t i;
    for (i = 0; i < n; i++) {
        if (decay != 0.0f) params[i] = params[i] * (1.0f - lr * decay);
        m[i] = b1 * m[i] + c1 * grad[i];
        v[i] = b2 * v[i] + c2 * grad[i] * grad[i];
        params[i] = params[i] - step * m[i] / (sqrtf(v[i]) / root + eps);
    }
}
