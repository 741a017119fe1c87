/* Personalization: device/mixture.py's train_mixture in C, streaming.
 *
 * The Python runtime tabulates GE's outputs for every training input in RAM
 * (500 jittered user inputs and 300 replay glyphs of 410 floats: 1.3 MB).
 * Here each input's row (LE feature, GN feature, GE logits) is written once
 * to scratch storage, and the steps read back only the rows of their batch,
 * adding one row's gradient at a time. The random draws are NumPy's, in the
 * same order: where Python draws a whole array before using it (the jitter's
 * rotations, scales and shifts; GN's user and replay picks), copies of the
 * generator are set at each array's start and drawn in step instead, so RAM
 * never holds those arrays either. The time budget (max_seconds) has no
 * counterpart: a microcontroller has no shared clock, and the progress
 * callback can cancel. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "et_internal.h"

static int taps_shared(const et_model *model) {
    uint16_t i;
    for (i = 0; i < model->n_layers; i++)
        if (model->layers[i].tap == 2) return 1;
    return 0;
}

static uint32_t row_floats(const et_model *model) {
    return model->tap_dim[ET_TAP_LE] + (taps_shared(model) ? 0u : model->tap_dim[ET_TAP_GN]) + model->n_classes;
}


/* mixture.augmented_copies */
static uint32_t copies_for(const et_config *cfg, uint32_t n) {
    uint32_t limit = cfg->augment_until / (n ? n : 1u);
    limit = limit ? limit - 1u : 0u;
    return cfg->augment_copies < limit ? cfg->augment_copies : limit;
}

/* Sizes of everything personalizing n samples allocates, shared by the
 * allocation itself and et_personalize_arena_bytes. */
typedef struct {
    uint32_t n, copies, n_user, n_replay, rows;
    size_t labels, features, learning_le, learning_gn, result;
} plan;

static void make_plan(const et_model *model, const et_config *cfg, uint32_t n, plan *p) {
    const size_t row = ET_ALIGN8(row_floats(model) * sizeof(float));
    const size_t work = ET_ALIGN8(et_experts_work_floats(model) * sizeof(float));
    const size_t pixels = ET_ALIGN8((size_t)model->in_h * model->in_w);
    const size_t le = ET_ALIGN8(model->le_params * sizeof(float)), gn = ET_ALIGN8(model->gn_params * sizeof(float));
    p->n = n;
    p->copies = copies_for(cfg, n);
    p->n_user = n * (p->copies + 1u);
    p->n_replay = model->replay_count;
    p->rows = p->n_user + p->n_replay;
    p->labels = ET_ALIGN8((size_t)p->rows * sizeof(uint16_t));
    p->result = le + gn;    /* LE's trained weights wait here while GN trains */
    p->features = row + 2 * pixels + et_jitter_arena_bytes(model) + et_ge_arena_bytes(model);
    p->learning_le = ET_ALIGN8((size_t)p->n_user * sizeof(uint32_t)) + 3 * le + row + work;
    p->learning_gn = ET_ALIGN8((size_t)p->n_replay * sizeof(uint32_t)) + 3 * gn + row +
                     ET_ALIGN8((p->n_replay / 3u + 1u) * sizeof(float));   /* the calibration's scores */
}

static size_t max3(size_t a, size_t b, size_t c) {
    size_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* GE's rows fit 32-bit offsets into scratch storage (4 GB): checked before make_plan's 32-bit counts. */
static int fits(const et_model *model, const et_config *config, uint32_t n) {
    uint64_t rows = (uint64_t)n * (copies_for(config, n) + 1u) + model->replay_count;
    return rows * row_floats(model) * sizeof(float) <= 0xFFFFFFFFu;
}

uint32_t et_scratch_bytes(const et_model *model, const et_config *config, uint32_t n_samples) {
    plan p;
    if (!model || !config || !fits(model, config, n_samples)) return 0;   /* 0: more than 4 GB */
    make_plan(model, config, n_samples, &p);
    return p.rows * row_floats(model) * (uint32_t)sizeof(float);
}

size_t et_personalize_arena_bytes(const et_model *model, const et_config *config, uint32_t n_samples) {
    plan p;
    if (!model || !config) return 0;
    make_plan(model, config, n_samples, &p);
    return ET_ALIGN8(model->le_params * sizeof(float)) + ET_ALIGN8(model->gn_params * sizeof(float)) + p.labels +
           p.result + max3(p.features, p.learning_le, p.learning_gn);
}

static et_status check_config(const et_model *model, const et_config *c) {
    if (!(c->le_epochs && c->le_max_steps && c->batch_size && c->gn_steps))
        return et_fail(ET_ERR_ARGUMENT, "le_epochs, le_max_steps, batch_size and gn_steps must be > 0");
    /* bounds that keep every count below in 32 bits (and a mistyped setting from running for days) */
    if (c->le_epochs > 1000000u || c->le_max_steps > 10000000u || c->batch_size > 65536u || c->gn_steps > 1000000u ||
        c->augment_copies > 1000u || c->augment_until > 100000000u)
        return et_fail(ET_ERR_ARGUMENT, "a personalize setting is out of range (le_epochs <= 1e6, le_max_steps <= 1e7, "
                                        "batch_size <= 65536, gn_steps <= 1e6, augment_copies <= 1000, "
                                        "augment_until <= 1e8)");
    if (!(c->le_learning_rate > 0.0f && c->le_learning_rate <= 1.0f && c->gn_learning_rate > 0.0f &&
          c->gn_learning_rate <= 1.0f))
        return et_fail(ET_ERR_ARGUMENT, "the learning rates must be in (0, 1]");
    if (!(c->replay_weight >= 0.0 && c->replay_weight <= 64.0))
        return et_fail(ET_ERR_ARGUMENT, "replay_weight must be in [0, 64]");
    if (!(c->gate_generic_share >= 0.0 && c->gate_generic_share < 1.0))
        return et_fail(ET_ERR_ARGUMENT, "gate_generic_share must be in [0, 1)");
    if (model->n_classes < 2 || model->n_classes > 64)
        return et_fail_n(ET_ERR_MODEL, "the model has ", model->n_classes, " labels; the kernels take 2 to 64");
    if (model->replay_count < 3) return et_fail(ET_ERR_MODEL, "the model carries fewer than 3 replay glyphs");
    return ET_OK;
}

/* GE's rows in scratch storage, and where each part of a row is: worked out
 * once, not per row in the training loops. */
typedef struct {
    const et_model *model;
    et_scratch scratch;
    uint32_t row_bytes, gn_at, logits_at;   /* bytes a row; floats into a row */
    int shared;                             /* LE and GN read the same feature, stored once */
} table;

static et_status read_row(const table *t, uint32_t row, float *out) {
    if (t->scratch.read(t->scratch.context, row * t->row_bytes, out, t->row_bytes))
        return et_fail_n(ET_ERR_IO, "reading training row ", (long)row, " from scratch storage failed");
    return ET_OK;
}

static uint16_t argmax(const float *values, uint32_t n) {
    uint32_t k, best = 0;
    for (k = 1; k < n; k++)
        if (values[k] > values[best]) best = k;
    return (uint16_t)best;
}

/* np.quantile(values, q) of float32 values: linear interpolation with
 * NumPy's lerp in float32, as NumPy 2 computes it (see mixture.ts). */
static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float quantile(float *values, uint32_t n, double q) {
    /* NumPy 2 keeps the interpolation weight in float64 and casts it (and 1 - it) to float32 */
    double index = q * (double)(n - 1u), weight;
    uint32_t below = (uint32_t)floor(index), above = below + 1u < n ? below + 1u : n - 1u;
    float a, b, diff;
    qsort(values, n, sizeof(float), compare_floats);
    weight = index - (double)below;
    a = values[below];
    b = values[above];
    diff = b - a;
    return weight >= 0.5 ? b - diff * (float)(1.0 - weight) : a + diff * (float)weight;
}

static int say(et_progress_fn progress, void *context, const char *stage, uint32_t done, uint32_t total) {
    return progress ? progress(context, stage, done, total) : 0;
}

/* GE's outputs for every training input, written to scratch; labels_all gets
 * the user's labels, then GE's own answers for the replay glyphs. */
static et_status tabulate(const table *t, const et_samples *samples, const plan *p,
                          et_rng *rng, et_arena *arena, uint16_t *labels_all, et_progress_fn progress, void *ctx) {
    const et_model *model = t->model;
    const uint32_t pixels = (uint32_t)model->in_h * model->in_w, total = p->n * p->copies;
    float *row = (float *)et_arena_alloc(arena, row_floats(model) * sizeof(float));
    uint8_t *image = (uint8_t *)et_arena_alloc(arena, pixels), *warped = (uint8_t *)et_arena_alloc(arena, pixels);
    float *padded = (float *)et_arena_alloc(arena, et_jitter_arena_bytes(model));
    et_rng rotations = *rng, scales, shifts;
    uint32_t r, k;
    if (!row || !image || !warped || !padded) return et_fail(ET_ERR_ARENA, "the arena is too small for GE's rows");
    /* rng.uniform(-6, 6, total), then (0.95, 1.05, total), then (-1, 1, (total, 2)) */
    for (k = 0; k < total; k++) et_rng_next64(rng);
    scales = *rng;
    for (k = 0; k < total; k++) et_rng_next64(rng);
    shifts = *rng;
    for (k = 0; k < 2 * total; k++) et_rng_next64(rng);
    for (r = 0; r < p->rows; r++) {
        const uint8_t *input = image;
        uint8_t label = 0;
        et_status status;
        if (r < p->n_user) {
            uint32_t source = r < p->n ? r : (r - p->n) % p->n;
            if ((status = et_samples_read(samples, source, &label, image)) != ET_OK) return status;
            if (r >= p->n) {
                double rotation = et_rng_uniform(&rotations, -6.0, 6.0), scale = et_rng_uniform(&scales, 0.95, 1.05);
                double ty = et_rng_uniform(&shifts, -1.0, 1.0), tx = et_rng_uniform(&shifts, -1.0, 1.0);
                et_jitter_one(model, image, rotation, scale, ty, tx, padded, warped);
                input = warped;
            }
        } else if ((status = et_replay_decode(model, r - p->n_user, image)) != ET_OK) {
            return status;
        }
        status = et_ge_run(model, arena, input, row + t->logits_at, row, t->shared ? NULL : row + t->gn_at);
        if (status != ET_OK) return status;
        labels_all[r] = r < p->n_user ? label : argmax(row + t->logits_at, model->n_classes);
        if (t->scratch.write(t->scratch.context, r * t->row_bytes, row, t->row_bytes))
            return et_fail_n(ET_ERR_IO, "writing training row ", (long)r, " to scratch storage failed");
        if ((r % 16u == 15u || r + 1 == p->rows) && say(progress, ctx, "features", r + 1, p->rows))
            return et_fail(ET_ERR_CANCELLED, "cancelled while computing GE's features");
    }
    return ET_OK;
}

static et_status train_le(const table *t, const et_config *cfg, const plan *p, et_rng *rng, et_arena *arena,
                          const uint16_t *labels_all, float *le, et_report *report, et_progress_fn progress,
                          void *ctx) {
    const et_model *model = t->model;
    const uint32_t n_params = model->le_params;
    const uint32_t per_batch = cfg->batch_size < p->n_user ? cfg->batch_size : p->n_user;
    const uint32_t replay_per_batch = (uint32_t)rint((double)per_batch * cfg->replay_weight);
    const uint32_t steps_per_epoch = (p->n_user + per_batch - 1u) / per_batch;
    uint32_t epochs = cfg->le_max_steps / steps_per_epoch, epoch, k, j, t_step = 0;
    uint32_t *order = (uint32_t *)et_arena_alloc(arena, p->n_user * sizeof(uint32_t));
    float *grad = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *m = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *v = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *row = (float *)et_arena_alloc(arena, row_floats(model) * sizeof(float));
    float *work_memory = (float *)et_arena_alloc(arena, et_experts_work_floats(model) * sizeof(float));
    float loss = NAN;
    et_expert_work work;
    if (!order || !grad || !m || !v || !row || !work_memory)
        return et_fail(ET_ERR_ARENA, "the arena is too small for the local expert's training");
    et_experts_work_init(model, work_memory, &work);
    memset(m, 0, n_params * sizeof(float));
    memset(v, 0, n_params * sizeof(float));
    epochs = epochs < 1u ? 1u : epochs;
    epochs = cfg->le_epochs < epochs ? cfg->le_epochs : epochs;   /* mixture.le_epochs_for */
    for (epoch = 0; epoch < epochs; epoch++) {
        et_rng_permutation(rng, order, p->n_user);
        /* rng.integers(0, n_replay, (steps_per_epoch, replay_per_batch)) is drawn step by step below */
        for (k = 0; k < steps_per_epoch; k++) {
            uint32_t first = k * per_batch, last = first + per_batch < p->n_user ? first + per_batch : p->n_user;
            uint32_t rows = last - first + replay_per_batch;
            float scale = 1.0f / (float)rows, total = 0.0f;
            memset(grad, 0, n_params * sizeof(float));
            for (j = 0; j < rows; j++) {
                uint32_t index = j < last - first ? order[first + j] : p->n_user + et_rng_bounded(rng, p->n_replay - 1u);
                et_status status = read_row(t, index, row);
                if (status != ET_OK) return status;
                total += et_le_backward(model, le, row, row + t->logits_at, labels_all[index], scale, &work,
                                        grad);
            }
            et_adamw_step(&model->le_optimizer, cfg->le_learning_rate, ++t_step, n_params, le, grad, m, v);
            loss = total / (float)rows;
        }
        if (say(progress, ctx, "local expert", epoch + 1, epochs))
            return et_fail(ET_ERR_CANCELLED, "cancelled while training the local expert");
    }
    if (!isfinite(loss))
        return et_fail(ET_ERR_DIVERGED, "local-expert training diverged (its loss is not finite): lower "
                                        "le_learning_rate, or check the samples for mislabelled or blank images; "
                                        "the previous personalization stays in use");
    report->le_epochs = epochs;
    report->le_steps = t_step;
    report->le_loss = loss;
    return ET_OK;
}

static et_status train_gn(const table *t, const et_config *cfg, const plan *p, et_rng *rng, et_arena *arena,
                          float *gn, float *threshold, et_report *report, et_progress_fn progress, void *ctx) {
    const et_model *model = t->model;
    const uint32_t n_params = model->gn_params, held = p->n_replay / 3u, kept = p->n_replay - held;
    uint32_t half = cfg->batch_size / 2u, step, j, report_every = cfg->gn_steps / 20u;
    uint32_t *order = (uint32_t *)et_arena_alloc(arena, p->n_replay * sizeof(uint32_t));
    float *grad = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *m = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *v = (float *)et_arena_alloc(arena, n_params * sizeof(float));
    float *row = (float *)et_arena_alloc(arena, row_floats(model) * sizeof(float));
    float *scores, loss = NAN, q;
    uint64_t picks;
    et_rng user_picks, replay_picks;
    if (!order || !grad || !m || !v || !row)
        return et_fail(ET_ERR_ARENA, "the arena is too small for the gating network's training");
    memset(m, 0, n_params * sizeof(float));
    memset(v, 0, n_params * sizeof(float));
    et_rng_permutation(rng, order, p->n_replay);   /* the first third is held out for calibration */
    half = half < p->n_user ? half : p->n_user;
    half = half < kept ? half : kept;
    half = half ? half : 1u;
    report_every = report_every ? report_every : 1u;
    /* rng.integers(0, n_user, (gn_steps, half)), then rng.integers(0, len(kept), (gn_steps, half)):
     * the second array's draws start where the first's end, so find that point once. */
    user_picks = *rng;
    for (picks = 0; picks < (uint64_t)cfg->gn_steps * half; picks++) et_rng_bounded(rng, p->n_user - 1u);
    replay_picks = *rng;
    for (step = 0; step < cfg->gn_steps; step++) {
        float scale = 1.0f / (float)(2u * half), total = 0.0f;
        memset(grad, 0, n_params * sizeof(float));
        for (j = 0; j < 2u * half; j++) {
            uint32_t index = j < half ? et_rng_bounded(&user_picks, p->n_user - 1u)
                                      : p->n_user + order[held + et_rng_bounded(&replay_picks, kept - 1u)];
            et_status status = read_row(t, index, row);
            if (status != ET_OK) return status;
            total += et_gn_backward(model, gn, row + t->gn_at, j < half ? 1u : 0u, scale, grad);
        }
        et_adamw_step(&model->gn_optimizer, cfg->gn_learning_rate, step + 1u, n_params, gn, grad, m, v);
        loss = total / (float)(2u * half);
        if (((step + 1u) % report_every == 0 || step + 1u == cfg->gn_steps) &&
            say(progress, ctx, "gating network", step + 1u, cfg->gn_steps))
            return et_fail(ET_ERR_CANCELLED, "cancelled while training the gating network");
    }
    if (!isfinite(loss))
        return et_fail(ET_ERR_DIVERGED, "gating-network training diverged (its loss is not finite): lower "
                                        "gn_learning_rate; the previous personalization stays in use");
    report->gn_steps = cfg->gn_steps;
    report->gn_loss = loss;
    /* calibration: raise the threshold until at most gate_generic_share of the held-out glyphs go to LE */
    *threshold = model->gate_threshold;
    if (held) {
        scores = (float *)et_arena_alloc(arena, (held + 1u) * sizeof(float));
        if (!scores) return et_fail(ET_ERR_ARENA, "the arena is too small for the gate's calibration");
        for (j = 0; j < held; j++) {
            et_status status = read_row(t, p->n_user + order[j], row);
            if (status != ET_OK) return status;
            scores[j] = et_sigmoid(et_gn_score(model, gn, row + t->gn_at));
        }
        q = quantile(scores, held, 1.0 - cfg->gate_generic_share);
        *threshold = (float)fmin(0.99, fmax((double)model->gate_threshold, (double)q));
    }
    report->gate_threshold = *threshold;
    return ET_OK;
}

et_status et_personalize(const et_model *model, const et_config *config, const et_samples *samples,
                         et_scratch scratch, et_arena *arena, et_personalization *out, et_report *report,
                         et_progress_fn progress, void *progress_context) {
    plan p;
    table t;
    et_rng rng;
    et_report local;
    size_t start, mark;
    uint16_t *labels_all;
    float *le, *gn, threshold = 0.0f;
    et_status status;
    if (!model || !config || !samples || !arena || !out || !out->le || !out->gn || !scratch.read || !scratch.write)
        return et_fail(ET_ERR_ARGUMENT, "et_personalize: a NULL argument (model, config, samples, arena, output "
                                        "or a scratch callback)");
    if (!samples->reader.read || samples->count == 0)
        return et_fail(ET_ERR_ARGUMENT, "et_personalize: the samples were not opened with et_samples_open");
    if ((status = check_config(model, config)) != ET_OK) return status;
    if (!fits(model, config, samples->count))
        return et_fail(ET_ERR_ARGUMENT, "too many samples: GE's rows would pass 4 GB of scratch storage");
    make_plan(model, config, samples->count, &p);
    if (!report) report = &local;
    memset(report, 0, sizeof *report);
    report->n_samples = p.n;
    report->n_training_inputs = p.n_user;
    report->augment_copies = p.copies;
    report->replay = p.n_replay;
    start = arena->used;
    labels_all = (uint16_t *)et_arena_alloc(arena, p.rows * sizeof(uint16_t));
    le = (float *)et_arena_alloc(arena, model->le_params * sizeof(float));
    gn = (float *)et_arena_alloc(arena, model->gn_params * sizeof(float));
    if (!labels_all || !le || !gn) {
        arena->used = start;
        return et_fail_n(ET_ERR_ARENA, "personalizing these samples needs ",
                         (long)et_personalize_arena_bytes(model, config, p.n), " bytes of arena");
    }
    memcpy(le, model->le_initial, model->le_params * sizeof(float));
    memcpy(gn, model->gn_initial, model->gn_params * sizeof(float));
    t.model = model;
    t.scratch = scratch;
    t.row_bytes = row_floats(model) * (uint32_t)sizeof(float);
    t.shared = taps_shared(model);
    t.gn_at = t.shared ? 0u : model->tap_dim[ET_TAP_LE];
    t.logits_at = row_floats(model) - model->n_classes;
    et_rng_seed(&rng, config->seed);
    mark = arena->used;
    status = tabulate(&t, samples, &p, &rng, arena, labels_all, progress, progress_context);
    arena->used = mark;
    if (status == ET_OK) status = train_le(&t, config, &p, &rng, arena, labels_all, le, report, progress,
                                           progress_context);
    arena->used = mark;
    if (status == ET_OK) status = train_gn(&t, config, &p, &rng, arena, gn, &threshold, report, progress,
                                           progress_context);
    if (status == ET_OK) {
        /* only now does the result replace what `out` held */
        memcpy(out->le, le, model->le_params * sizeof(float));
        memcpy(out->gn, gn, model->gn_params * sizeof(float));
        out->threshold = threshold;
    } else if (status == ET_ERR_ARENA) {
        status = et_fail_n(ET_ERR_ARENA, "personalizing these samples needs ",
                           (long)et_personalize_arena_bytes(model, config, p.n), " bytes of arena");
    }
    arena->used = start;
    return status;
}
