/* Answering with the mixture: GE, and where the gate says the input looks
 * like the user's writing, LE (device/mixture.py's `route`). */
#include <string.h>

#include "et_internal.h"

et_status et_personalization_alloc(const et_model *model, et_arena *arena, et_personalization *out) {
    if (!model || !arena || !out) return et_fail(ET_ERR_ARGUMENT, "et_personalization_alloc: a NULL argument");
    memset(out, 0, sizeof *out);
    out->le = (float *)et_arena_alloc(arena, model->le_params * sizeof(float));
    out->gn = (float *)et_arena_alloc(arena, model->gn_params * sizeof(float));
    if (!out->le || !out->gn)
        return et_fail_n(ET_ERR_ARENA, "a personalization needs ",
                         (long)((model->le_params + model->gn_params) * sizeof(float)), " bytes of arena");
    memcpy(out->le, model->le_initial, model->le_params * sizeof(float));
    memcpy(out->gn, model->gn_initial, model->gn_params * sizeof(float));
    out->threshold = model->gate_threshold;
    return ET_OK;
}

et_status et_predict(const et_model *model, et_arena *arena, const et_personalization *personalization,
                     const uint8_t *image, et_prediction *out) {
    size_t mark;
    float logits[64], le_logits[64], *le_features, *gn_features, *work_memory;
    et_expert_work work;
    et_status status;
    uint32_t k, best;
    if (!model || !arena || !image || !out) return et_fail(ET_ERR_ARGUMENT, "et_predict: a NULL argument");
    if (model->n_classes > 64) return et_fail(ET_ERR_MODEL, "the kernels take at most 64 labels");
    memset(out, 0, sizeof *out);
    mark = arena->used;
    le_features = (float *)et_arena_alloc(arena, model->tap_dim[ET_TAP_LE] * sizeof(float));
    gn_features = (float *)et_arena_alloc(arena, model->tap_dim[ET_TAP_GN] * sizeof(float));
    work_memory = (float *)et_arena_alloc(arena, et_experts_work_floats(model) * sizeof(float));
    if (!le_features || !gn_features || !work_memory) {
        arena->used = mark;
        return et_fail(ET_ERR_ARENA, "the arena is too small to predict");
    }
    status = et_ge_run(model, arena, image, logits, personalization ? le_features : NULL,
                       personalization ? gn_features : NULL);
    if (status == ET_OK && personalization) {
        uint16_t i;
        for (i = 0; i < model->n_layers; i++)   /* a tap shared by LE and GN was written once */
            if (model->layers[i].tap == 2) memcpy(gn_features, le_features, model->tap_dim[ET_TAP_GN] * sizeof(float));
        out->gate = et_sigmoid(et_gn_score(model, personalization->gn, gn_features));
        out->used_le = out->gate > personalization->threshold;
        if (out->used_le) {
            et_experts_work_init(model, work_memory, &work);
            et_le_forward(model, personalization->le, le_features, logits, &work, le_logits);
            memcpy(logits, le_logits, model->n_classes * sizeof(float));
        }
    }
    arena->used = mark;
    if (status != ET_OK) return status;
    for (best = 0, k = 1; k < model->n_classes; k++)
        if (logits[k] > logits[best]) best = k;
    out->label = (uint16_t)best;
    return ET_OK;
}
