/* The library's own tests, run by `make check` under AddressSanitizer and
 * UBSan against an exported model: bad sample files, failing and cut
 * storage, arenas too small, a model the kernels cannot run. Each must give
 * its error code and leave what was stored as it was. The comparisons with
 * the Python runtime are in tests/firmware/ (pytest). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgetailor.h"
#include "edgetailor_model.h"
#include "et_internal.h"

static int failures, checks;

#define CHECK(condition)                                                               \
    do {                                                                               \
        checks++;                                                                      \
        if (!(condition)) {                                                            \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, #condition,   \
                    et_last_error());                                                  \
            failures++;                                                                \
        }                                                                              \
    } while (0)

/* ---- in-memory storage with a failure after a budget of bytes */

typedef struct {
    uint8_t *bytes;
    uint32_t size;
    long write_budget;   /* bytes that may still be written; < 0: unlimited */
} memory_file;

static int memory_read(void *context, uint32_t offset, void *buffer, uint32_t length) {
    memory_file *f = (memory_file *)context;
    if (offset > f->size || length > f->size - offset) return -1;
    memcpy(buffer, f->bytes + offset, length);
    return 0;
}

static int memory_write(void *context, uint32_t offset, const void *buffer, uint32_t length) {
    memory_file *f = (memory_file *)context;
    uint32_t n = length;
    if (offset > f->size || length > f->size - offset) return -1;
    if (f->write_budget >= 0 && (long)n > f->write_budget) n = (uint32_t)f->write_budget;   /* a cut write */
    memcpy(f->bytes + offset, buffer, n);
    if (f->write_budget >= 0) f->write_budget -= (long)n;
    return n == length ? 0 : -1;
}

typedef struct {
    memory_file slot[2];
} memory_slots;

static int slots_read(void *c, int slot, uint32_t offset, void *buffer, uint32_t length) {
    return memory_read(&((memory_slots *)c)->slot[slot], offset, buffer, length);
}

static int slots_write(void *c, int slot, uint32_t offset, const void *buffer, uint32_t length) {
    return memory_write(&((memory_slots *)c)->slot[slot], offset, buffer, length);
}

static uint64_t arena_memory[(1u << 20) / 8u];

static void fill(et_personalization *p, float value) {
    uint32_t i;
    for (i = 0; i < et_model_data.le_params; i++) p->le[i] = value + (float)i;
    for (i = 0; i < et_model_data.gn_params; i++) p->gn[i] = -value - (float)i;
    p->threshold = value / 100.0f;
}

static void test_slots(void) {
    const et_model *model = &et_model_data;
    uint32_t bytes = et_slot_bytes(model);
    memory_slots storage;
    et_slots slots;
    et_arena arena;
    et_personalization a, b, got;
    et_model other = *model;
    et_arena_init(&arena, arena_memory, sizeof arena_memory);
    CHECK(et_personalization_alloc(model, &arena, &a) == ET_OK);
    CHECK(et_personalization_alloc(model, &arena, &b) == ET_OK);
    CHECK(et_personalization_alloc(model, &arena, &got) == ET_OK);
    storage.slot[0].bytes = calloc(bytes, 1);
    storage.slot[1].bytes = calloc(bytes, 1);
    storage.slot[0].size = storage.slot[1].size = bytes;
    storage.slot[0].write_budget = storage.slot[1].write_budget = -1;
    slots.context = &storage;
    slots.read = slots_read;
    slots.write = slots_write;
    slots.sync = NULL;

    CHECK(et_slots_load(model, slots, &got) == ET_ERR_NO_STATE);
    fill(&a, 1.0f);
    fill(&b, 2.0f);
    CHECK(et_slots_save(model, slots, &a) == ET_OK && a.sequence == 1);
    CHECK(et_slots_save(model, slots, &b) == ET_OK && b.sequence == 2);
    CHECK(et_slots_load(model, slots, &got) == ET_OK && got.sequence == 2 && got.le[3] == b.le[3] &&
          got.threshold == b.threshold);

    /* a write cut at every tenth of the record: the newest complete one stays */
    {
        uint32_t cut;
        for (cut = 0; cut < bytes; cut += bytes / 10u + 1u) {
            fill(&a, 3.0f);
            storage.slot[0].write_budget = storage.slot[1].write_budget = (long)cut;
            CHECK(et_slots_save(model, slots, &a) == ET_ERR_IO);
            storage.slot[0].write_budget = storage.slot[1].write_budget = -1;
            CHECK(et_slots_load(model, slots, &got) == ET_OK && got.sequence == 2 && got.le[0] == b.le[0]);
        }
    }
    /* a damaged newest slot: the other one is used */
    CHECK(et_slots_save(model, slots, &a) == ET_OK && a.sequence == 3);
    storage.slot[0].bytes[bytes / 2] ^= 0x40;   /* sequence 3 went to slot 0 */
    CHECK(et_slots_load(model, slots, &got) == ET_OK && got.sequence == 2);
    /* another bundle's records are refused, not read as this one's */
    other.bundle_id = "another-bundle";
    CHECK(et_slots_load(&other, slots, &got) == ET_ERR_MISMATCH);
    /* another bundle saving over the damaged slot, then this one saving again: its newest record stays until the
     * new one is complete, even though the other bundle's record is newer */
    CHECK(et_slots_save(&other, slots, &a) == ET_OK);
    fill(&b, 5.0f);
    storage.slot[0].write_budget = storage.slot[1].write_budget = 100;
    CHECK(et_slots_save(model, slots, &b) == ET_ERR_IO);
    storage.slot[0].write_budget = storage.slot[1].write_budget = -1;
    CHECK(et_slots_load(model, slots, &got) == ET_OK && got.sequence == 2);
    /* stored little-endian: the threshold's bytes follow the 80-byte header */
    {
        float expected = got.threshold;
        uint32_t bits;
        int slot = storage.slot[0].bytes[8] == 2 ? 0 : 1;
        memcpy(&bits, &expected, 4);
        CHECK(storage.slot[slot].bytes[80] == (uint8_t)bits && storage.slot[slot].bytes[83] == (uint8_t)(bits >> 24));
    }
    free(storage.slot[0].bytes);
    free(storage.slot[1].bytes);
}

/* ---- sample files */

static uint32_t sample_file(uint8_t *out, uint32_t count, int label_shift) {
    const uint32_t pixels = (uint32_t)et_model_data.in_h * et_model_data.in_w, record = 1u + pixels;
    uint32_t i, crc;
    memcpy(out, "ETSM", 4);
    out[4] = 1, out[5] = 0;
    out[6] = (uint8_t)et_model_data.in_h, out[7] = 0;
    out[8] = (uint8_t)et_model_data.in_w, out[9] = 0;
    out[10] = (uint8_t)et_model_data.n_classes, out[11] = 0;
    memcpy(out + 12, &count, 4);
    for (i = 0; i < count; i++) {
        uint8_t *r = out + ET_SAMPLES_HEADER_BYTES + i * record;
        uint32_t k;
        r[0] = (uint8_t)(label_shift ? (i + (uint32_t)label_shift) % 256u : i % et_model_data.n_classes);
        for (k = 0; k < pixels; k++) r[1 + k] = (uint8_t)((k * 7u + i * 13u) % 256u);
    }
    crc = et_crc32(0, out + ET_SAMPLES_HEADER_BYTES, count * record);
    memcpy(out + 16, &crc, 4);
    crc = 0;
    for (i = 0; i < et_model_data.n_classes; i++) {
        if (i) crc = et_crc32(crc, "\n", 1);
        crc = et_crc32(crc, et_model_data.labels[i], strlen(et_model_data.labels[i]));
    }
    memcpy(out + 20, &crc, 4);
    return ET_SAMPLES_HEADER_BYTES + count * record;
}

static void test_samples(void) {
    static uint8_t file[ET_SAMPLES_HEADER_BYTES + 12u * (1u + ET_MODEL_IN_H * ET_MODEL_IN_W)];
    memory_file f;
    et_samples samples;
    uint32_t size = sample_file(file, 12, 0);
    uint8_t label, pixels[ET_MODEL_IN_H * ET_MODEL_IN_W];
    f.bytes = file;
    f.size = size;
    f.write_budget = -1;
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_OK);
    CHECK(samples.count == 12 && et_samples_read(&samples, 11, &label, pixels) == ET_OK && label == 11 % ET_MODEL_CLASSES);
    CHECK(et_samples_read(&samples, 12, &label, pixels) == ET_ERR_ARGUMENT);
    /* truncated, padded, wrong magic, wrong version, damaged */
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size - 1) == ET_ERR_SAMPLES);
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, 7) == ET_ERR_SAMPLES);
    file[0] = 'X';
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    file[0] = 'E';
    file[4] = 2;
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    file[4] = 1;
    file[ET_SAMPLES_HEADER_BYTES + 5] ^= 1;
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    /* another bundle's labels (as many, another order) */
    size = sample_file(file, 12, 0);
    file[20] ^= 0x5a;
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    CHECK(strstr(et_last_error(), "other labels") != NULL);
    file[20] ^= 0x5a;
    /* a label outside the bundle's labels (with a matching CRC) */
    size = sample_file(file, 12, ET_MODEL_CLASSES - 3);
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    CHECK(strstr(et_last_error(), "label") != NULL);
    /* another input size */
    size = sample_file(file, 12, 0);
    file[6] = (uint8_t)(et_model_data.in_h + 1);
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_SAMPLES);
    /* storage that fails */
    file[6] = (uint8_t)et_model_data.in_h;
    f.size = 100;
    CHECK(et_samples_open(&samples, &et_model_data, (et_reader){&f, memory_read}, size) == ET_ERR_IO);
}

/* ---- personalizing: arena, scratch, cancel, config, model */

static int cancel_at_first(void *context, const char *stage, uint32_t done, uint32_t total) {
    (void)context, (void)stage, (void)done, (void)total;
    return 1;
}

static void test_personalize_errors(void) {
    static uint8_t file[ET_SAMPLES_HEADER_BYTES + 12u * (1u + ET_MODEL_IN_H * ET_MODEL_IN_W)];
    const et_model *model = &et_model_data;
    memory_file f, scratch_file;
    et_samples samples;
    et_config config = model->defaults;
    et_arena arena, small;
    et_personalization p;
    et_report report;
    et_scratch scratch;
    uint32_t size = sample_file(file, 12, 0);
    uint8_t image[ET_MODEL_IN_H * ET_MODEL_IN_W] = {0};
    float logits[ET_MODEL_CLASSES], first_le;
    static uint8_t tiny[64];
    f.bytes = file;
    f.size = size;
    f.write_budget = -1;
    CHECK(et_samples_open(&samples, model, (et_reader){&f, memory_read}, size) == ET_OK);
    config.le_epochs = 1;
    config.gn_steps = 2;
    scratch_file.size = et_scratch_bytes(model, &config, samples.count);
    scratch_file.bytes = malloc(scratch_file.size);
    scratch_file.write_budget = -1;
    scratch.context = &scratch_file;
    scratch.read = memory_read;
    scratch.write = memory_write;
    et_arena_init(&arena, arena_memory, sizeof arena_memory);
    CHECK(et_personalization_alloc(model, &arena, &p) == ET_OK);
    first_le = p.le[0];

    /* the compile-time bound holds */
    CHECK(et_personalize_arena_bytes(model, &config, ET_MAX_SAMPLES) +
              ET_ALIGN8((model->le_params + model->gn_params) * 4u) <=
          ET_PERSONALIZE_ARENA_BOUND(ET_MODEL_IN_H, ET_MODEL_IN_W, ET_MODEL_MAX_ACTIVATION, ET_MODEL_QUANTIZED,
                                     ET_MODEL_CLASSES, ET_MODEL_LE_DIM, ET_MODEL_GN_DIM, ET_MODEL_LE_HIDDEN,
                                     ET_MODEL_LE_PARAMS, ET_MODEL_GN_PARAMS, ET_MODEL_REPLAY,
                                     ET_MAX_SAMPLES * (ET_MODEL_AUGMENT_COPIES + 1u)));

    /* an arena too small: GE alone, then personalizing */
    et_arena_init(&small, tiny, sizeof tiny);
    CHECK(et_ge_run(model, &small, image, logits, NULL, NULL) == ET_ERR_ARENA);
    et_arena_init(&small, (uint8_t *)arena_memory + (1u << 19), et_personalize_arena_bytes(model, &config, 12) / 2u);
    CHECK(et_personalize(model, &config, &samples, scratch, &small, &p, &report, NULL, NULL) == ET_ERR_ARENA);
    CHECK(small.used == 0 && p.le[0] == first_le);

    /* scratch storage failing mid-way, and a cancel: nothing changes */
    scratch_file.write_budget = 5000;
    CHECK(et_personalize(model, &config, &samples, scratch, &arena, &p, &report, NULL, NULL) == ET_ERR_IO);
    scratch_file.write_budget = -1;
    CHECK(et_personalize(model, &config, &samples, scratch, &arena, &p, &report, cancel_at_first, NULL) ==
          ET_ERR_CANCELLED);
    CHECK(p.le[0] == first_le);

    /* configs out of range */
    config.le_learning_rate = NAN;
    CHECK(et_personalize(model, &config, &samples, scratch, &arena, &p, &report, NULL, NULL) == ET_ERR_ARGUMENT);
    config.le_learning_rate = model->defaults.le_learning_rate;
    config.batch_size = 0;
    CHECK(et_personalize(model, &config, &samples, scratch, &arena, &p, &report, NULL, NULL) == ET_ERR_ARGUMENT);
    config.batch_size = model->defaults.batch_size;

    /* and one that works, so the failures above were not the only outcome */
    CHECK(et_personalize(model, &config, &samples, scratch, &arena, &p, &report, NULL, NULL) == ET_OK);
    CHECK(report.le_steps >= 1 && report.gn_steps == 2 && isfinite(report.le_loss) && p.threshold >= 0.5f);
    CHECK(arena.used == ET_ALIGN8(model->le_params * 4u) + ET_ALIGN8(model->gn_params * 4u));
    free(scratch_file.bytes);
}

static void test_model_checks(void) {
    static et_layer layers[64];
    et_model broken = et_model_data;
    et_arena arena;
    uint8_t image[ET_MODEL_IN_H * ET_MODEL_IN_W] = {0};
    float logits[ET_MODEL_CLASSES];
    et_arena_init(&arena, arena_memory, sizeof arena_memory);
    CHECK(et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_OK);
    broken.abi_version = 99;
    CHECK(et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_ERR_MODEL);
    broken = et_model_data;
    memcpy(layers, et_model_data.layers, et_model_data.n_layers * sizeof(et_layer));
    layers[1].op = 42;   /* an op the kernels lack */
    broken.layers = layers;
    CHECK(et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_ERR_MODEL);
    CHECK(et_ge_run(&et_model_data, &arena, NULL, logits, NULL, NULL) == ET_ERR_ARGUMENT);
    /* a tap code out of range, a layer that does not read what the one before wrote, a max-pool past its input */
    memcpy(layers, et_model_data.layers, et_model_data.n_layers * sizeof(et_layer));
    layers[0].tap = 7;
    CHECK(et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_ERR_MODEL);
    memcpy(layers, et_model_data.layers, et_model_data.n_layers * sizeof(et_layer));
    layers[1].in_c = (uint16_t)(layers[1].in_c + 1);
    CHECK(et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_ERR_MODEL);
    {
        uint16_t i;
        memcpy(layers, et_model_data.layers, et_model_data.n_layers * sizeof(et_layer));
        for (i = 0; i < et_model_data.n_layers; i++)
            if (layers[i].op == ET_OP_MAXPOOL) {
                layers[i].out_h = (uint16_t)(layers[i].out_h + 4);
                break;
            }
        CHECK(i == et_model_data.n_layers || et_ge_run(&broken, &arena, image, logits, NULL, NULL) == ET_ERR_MODEL);
    }
    /* replay glyphs whose code runs past the data */
    {
        uint8_t pixels[ET_MODEL_IN_H * ET_MODEL_IN_W];
        broken = et_model_data;
        broken.replay_bytes = broken.replay_offsets[broken.replay_count - 1];
        CHECK(et_replay_decode(&broken, broken.replay_count - 1, pixels) == ET_ERR_MODEL);
        CHECK(et_replay_decode(&et_model_data, et_model_data.replay_count - 1, pixels) == ET_OK);
        CHECK(et_replay_decode(&et_model_data, et_model_data.replay_count, pixels) == ET_ERR_MODEL);
    }
}

int main(void) {
    test_slots();
    test_samples();
    test_personalize_errors();
    test_model_checks();
    if (failures) {
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("libedgetailor: all %d checks passed\n", checks);
    return 0;
}
