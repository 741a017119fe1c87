/* The example application: personalize GE on a user's samples and evaluate.
 *
 *   example-host TRAIN_FILE TEST_FILE [options]        (make host)
 *   make qemu TRAIN=TRAIN_FILE TEST=TEST_FILE          (the same code on a Cortex-M4)
 *
 * It opens both sample files (`edgetailor export firmware-samples`), reads
 * the test set with GE alone, personalizes on the train set, saves the
 * result to two power-safe slots, loads it back, reads the test set with the
 * mixture, and prints one JSON line. Memory is one static arena of
 * ET_ARENA_BYTES (from the exported model's sizes). */
#include <string.h>

#include "edgetailor.h"
#include "edgetailor_model.h"
#include "platform.h"

#ifndef ET_ARENA_BYTES
#define ET_ARENA_BYTES                                                                                             \
    ET_PERSONALIZE_ARENA_BOUND(ET_MODEL_IN_H, ET_MODEL_IN_W, ET_MODEL_MAX_ACTIVATION, ET_MODEL_QUANTIZED,           \
                               ET_MODEL_CLASSES, ET_MODEL_LE_DIM, ET_MODEL_GN_DIM, ET_MODEL_LE_HIDDEN,              \
                               ET_MODEL_LE_PARAMS, ET_MODEL_GN_PARAMS, ET_MODEL_REPLAY,                             \
                               ET_MAX_SAMPLES * (ET_MODEL_AUGMENT_COPIES + 1u))
#endif

/* uint64_t: 8-byte aligned, so et_arena_init loses nothing to alignment */
static uint64_t arena_memory[(ET_ARENA_BYTES + 7u) / 8u];

static const char usage[] =
    "usage: example-host TRAIN_FILE TEST_FILE [options]    (on a board: make qemu TRAIN=... TEST=... ARGS=...)\n"
    "  Personalizes the exported GE on TRAIN_FILE's samples and prints one JSON line with the accuracy on\n"
    "  TEST_FILE before and after. Both files come from `edgetailor export firmware-samples`.\n"
    "options:\n"
    "  --seed N            personalization seed (default: the bundle's)\n"
    "  --le-epochs N       local-expert epochs (default: the bundle's)\n"
    "  --gn-steps N        gating-network steps (default: the bundle's)\n"
    "  --state PREFIX      personalization slots PREFIX.0 and PREFIX.1 (default: edgetailor-state)\n"
    "  --scratch FILE      scratch storage for GE's rows (default: edgetailor-scratch.bin)\n"
    "  --dump FILE         write each test sample's GE logits and routed answer (float32 x labels, float32 gate,\n"
    "                      u8 answer, u8 used LE, 2 bytes padding)\n"
    "  --quiet             no progress on standard error\n"
    "Relative paths are relative to the directory the example runs in. It writes the scratch file and the two\n"
    "state files there (about 1.6 KB of scratch per training input; remove them when done).\n";

/* ------------------------------------------------------------ formatting */

typedef struct {
    char text[1024];
    size_t used;
} line;

static void put(line *l, const char *s) {
    while (*s && l->used + 1 < sizeof l->text) l->text[l->used++] = *s++;
    l->text[l->used] = '\0';
}

static void put_uint(line *l, uint64_t value) {
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10u);
        value /= 10u;
    } while (value);
    while (n) {
        char c[2] = {digits[--n], '\0'};
        put(l, c);
    }
}

/* A number with `decimals` digits after the point (no printf: it would cost
 * the Cortex-M4 image more flash than the library). */
static void put_fixed(line *l, double value, int decimals) {
    uint64_t scale = 1, whole, fraction;
    int i;
    if (value != value) {
        put(l, "null");
        return;
    }
    if (value < 0) {
        put(l, "-");
        value = -value;
    }
    for (i = 0; i < decimals; i++) scale *= 10u;
    if (value > 1e15) value = 1e15;
    fraction = (uint64_t)(value * (double)scale + 0.5);
    whole = fraction / scale;
    fraction %= scale;
    put_uint(l, whole);
    if (!decimals) return;
    put(l, ".");
    for (scale /= 10u; scale; scale /= 10u) {
        char c[2] = {(char)('0' + (fraction / scale) % 10u), '\0'};
        put(l, c);
    }
}

static void put_key(line *l, const char *key) {
    put(l, l->used > 1 ? ",\"" : "\"");
    put(l, key);
    put(l, "\":");
}

/* ------------------------------------------------------------- storage */

static int file_read(void *context, uint32_t offset, void *buffer, uint32_t length) {
    return platform_read(context, offset, buffer, length);
}

static int file_write(void *context, uint32_t offset, const void *buffer, uint32_t length) {
    return platform_write(context, offset, buffer, length);
}

typedef struct {
    void *files[2];
} slot_files;

static int slot_read(void *context, int slot, uint32_t offset, void *buffer, uint32_t length) {
    return platform_read(((slot_files *)context)->files[slot], offset, buffer, length);
}

static int slot_write(void *context, int slot, uint32_t offset, const void *buffer, uint32_t length) {
    return platform_write(((slot_files *)context)->files[slot], offset, buffer, length);
}

static int slot_sync(void *context, int slot) { return platform_sync(((slot_files *)context)->files[slot]); }

/* --------------------------------------------------------------- errors */

static int fail(const char *what, et_status status) {
    line l;
    l.used = 0;
    l.text[0] = '\0';
    put(&l, "error: ");
    put(&l, what);
    put(&l, ": ");
    put(&l, et_last_error()[0] ? et_last_error() : et_status_message(status));
    put(&l, "\n");
    platform_error(l.text);
    return 1;
}

static int usage_error(const char *message, const char *argument) {
    platform_error("error: ");
    platform_error(message);
    if (argument) {
        platform_error(": ");
        platform_error(argument);
    }
    platform_error("\n");
    platform_error(usage);
    return 2;
}

static int parse_uint(const char *text, uint64_t *out) {
    uint64_t value = 0;
    if (!text || !*text) return -1;
    for (; *text; text++) {
        if (*text < '0' || *text > '9' || value > 1844674407370955160ull) return -1;
        value = value * 10u + (uint64_t)(*text - '0');
    }
    *out = value;
    return 0;
}

/* -------------------------------------------------------------- progress */

static int show_progress(void *context, const char *stage, uint32_t done, uint32_t total) {
    line l;
    if (context) return 0;   /* --quiet */
    l.used = 0;
    l.text[0] = '\0';
    put(&l, "\r  ");
    put(&l, stage);
    put(&l, " ");
    put_uint(&l, done);
    put(&l, "/");
    put_uint(&l, total);
    put(&l, done == total ? "      \n" : "      ");
    platform_error(l.text);
    return 0;
}

/* ----------------------------------------------------------- evaluation */

typedef struct {
    uint32_t right, used_le;
} tally;

static et_status evaluate(const et_samples *test, et_arena *arena, const et_personalization *p, void *dump,
                          tally *out) {
    uint8_t pixels[ET_MODEL_IN_H * ET_MODEL_IN_W], label;
    uint32_t i;
    out->right = out->used_le = 0;
    for (i = 0; i < test->count; i++) {
        et_prediction prediction;
        et_status status = et_samples_read(test, i, &label, pixels);
        if (status == ET_OK) status = et_predict(&et_model_data, arena, p, pixels, &prediction);
        if (status != ET_OK) return status;
        out->right += prediction.label == label;
        out->used_le += prediction.used_le;
        if (dump) {
            uint8_t record[ET_MODEL_CLASSES * 4 + 8];
            float logits[ET_MODEL_CLASSES];
            status = et_ge_run(&et_model_data, arena, pixels, logits, NULL, NULL);
            if (status != ET_OK) return status;
            memcpy(record, logits, sizeof logits);
            memcpy(record + sizeof logits, &prediction.gate, 4);
            record[sizeof logits + 4] = (uint8_t)prediction.label;
            record[sizeof logits + 5] = prediction.used_le;
            record[sizeof logits + 6] = record[sizeof logits + 7] = 0;
            if (platform_write(dump, i * (uint32_t)sizeof record, record, sizeof record))
                return ET_ERR_IO;
        }
    }
    return ET_OK;
}

static int open_samples(const char *path, et_samples *samples, void **file) {
    long size;
    et_status status;
    *file = platform_open(path, PLATFORM_READ);
    if (!*file) {
        platform_error("error: cannot open ");
        platform_error(path);
        platform_error(" (a relative path is relative to the directory the example runs in)\n");
        return 1;
    }
    size = platform_size(*file);
    if (size < 0) size = 0;
    status = et_samples_open(samples, &et_model_data, (et_reader){*file, file_read}, (uint32_t)size);
    if (status != ET_OK) return fail(path, status);
    return 0;
}

int example_main(void) {
    int argc, i, quiet = 0;
    char **argv;
    const char *positional[2] = {NULL, NULL}, *state = "edgetailor-state", *scratch_path = "edgetailor-scratch.bin";
    const char *dump_path = NULL;
    char slot_path[2][256];
    int n_positional = 0;
    et_config config = et_model_data.defaults;
    et_samples train, test;
    void *train_file, *test_file, *scratch_file, *dump = NULL;
    slot_files slots;
    et_arena arena;
    et_personalization trained, loaded;
    et_report report;
    tally before, after;
    et_status status;
    uint64_t counted_start, counted_before, counted_personalize, counted_after;
    double seconds_start, seconds_before, seconds_personalize, seconds_after;
    size_t arena_peak;
    line l;

    platform_args(&argc, &argv);
    for (i = 1; i < argc; i++) {
        uint64_t value = 0;
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            platform_print(usage);
            return 0;
        } else if (!strcmp(a, "--quiet")) {
            quiet = 1;
        } else if (!strcmp(a, "--seed") || !strcmp(a, "--le-epochs") || !strcmp(a, "--gn-steps")) {
            if (i + 1 >= argc || parse_uint(argv[i + 1], &value)) return usage_error("this option needs a number", a);
            if (!strcmp(a, "--seed")) config.seed = value;
            else if (value == 0 || value > 1000000u) return usage_error("this option takes 1 to 1000000", a);
            else if (!strcmp(a, "--le-epochs")) config.le_epochs = (uint32_t)value;
            else config.gn_steps = (uint32_t)value;
            i++;
        } else if (!strcmp(a, "--state") || !strcmp(a, "--scratch") || !strcmp(a, "--dump")) {
            if (i + 1 >= argc) return usage_error("this option needs a value", a);
            if (!strcmp(a, "--state")) state = argv[++i];
            else if (!strcmp(a, "--scratch")) scratch_path = argv[++i];
            else dump_path = argv[++i];
        } else if (a[0] == '-' && a[1] == '-') {
            return usage_error("unknown option", a);
        } else if (n_positional < 2) {
            positional[n_positional++] = a;
        } else {
            return usage_error("too many arguments", a);
        }
    }
    if (n_positional != 2) return usage_error("give a TRAIN_FILE and a TEST_FILE", NULL);
    if (strlen(state) + 3 > sizeof slot_path[0]) return usage_error("--state is too long", state);
    for (i = 0; i < 2; i++) {
        strcpy(slot_path[i], state);
        strcat(slot_path[i], i ? ".1" : ".0");
    }

    et_arena_init(&arena, arena_memory, sizeof arena_memory);
    if (open_samples(positional[0], &train, &train_file) || open_samples(positional[1], &test, &test_file)) return 1;
    if (et_personalize_arena_bytes(&et_model_data, &config, train.count) +
            ET_ALIGN8_BYTES(4u * ET_MODEL_LE_PARAMS) + ET_ALIGN8_BYTES(4u * ET_MODEL_GN_PARAMS) > arena.size) {
        line m;
        m.used = 0;
        m.text[0] = '\0';
        put(&m, "error: personalizing ");
        put_uint(&m, train.count);
        put(&m, " samples needs a larger arena than this build's ");
        put_uint(&m, sizeof arena_memory);
        put(&m, " bytes; export the project again with a larger `edgetailor export firmware --max-samples`, or use "
                "fewer samples\n");
        platform_error(m.text);
        return 1;
    }
    scratch_file = platform_open(scratch_path, PLATFORM_CREATE);
    slots.files[0] = platform_open(slot_path[0], PLATFORM_UPDATE);
    slots.files[1] = platform_open(slot_path[1], PLATFORM_UPDATE);
    if (dump_path) dump = platform_open(dump_path, PLATFORM_CREATE);
    {
        const char *missing = !scratch_file ? scratch_path : !slots.files[0] ? slot_path[0]
                            : !slots.files[1] ? slot_path[1] : (dump_path && !dump) ? dump_path : NULL;
        if (missing) {
            platform_error("error: cannot create ");
            platform_error(missing);
            platform_error(" (is its directory there and writable? see --scratch, --state, --dump)\n");
            return 1;
        }
    }

    counted_start = platform_instructions();
    seconds_start = platform_seconds();
    if ((status = evaluate(&test, &arena, NULL, NULL, &before)) != ET_OK) return fail("reading with GE", status);
    counted_before = platform_instructions();
    seconds_before = platform_seconds();

    if ((status = et_personalization_alloc(&et_model_data, &arena, &trained)) != ET_OK ||
        (status = et_personalization_alloc(&et_model_data, &arena, &loaded)) != ET_OK)
        return fail("allocating", status);
    status = et_personalize(&et_model_data, &config, &train, (et_scratch){scratch_file, file_read, file_write}, &arena,
                            &trained, &report, show_progress, quiet ? (void *)&quiet : NULL);
    if (status != ET_OK) return fail("personalizing", status);
    counted_personalize = platform_instructions();
    seconds_personalize = platform_seconds();
    arena_peak = arena.peak;

    /* what a device does after a reboot: the newest complete slot */
    if ((status = et_slots_save(&et_model_data, (et_slots){&slots, slot_read, slot_write, slot_sync}, &trained)) != ET_OK)
        return fail("saving", status);
    if ((status = et_slots_load(&et_model_data, (et_slots){&slots, slot_read, slot_write, slot_sync}, &loaded)) != ET_OK)
        return fail("loading", status);
    if ((status = evaluate(&test, &arena, &loaded, NULL, &after)) != ET_OK) return fail("reading with the mixture", status);
    counted_after = platform_instructions();
    seconds_after = platform_seconds();
    if (dump && (status = evaluate(&test, &arena, &loaded, dump, &after)) != ET_OK) return fail("dumping", status);

    l.used = 0;
    l.text[0] = '\0';
    put(&l, "{");
    put_key(&l, "accuracy_before");
    put_fixed(&l, (double)before.right / test.count, 6);
    put_key(&l, "accuracy_after");
    put_fixed(&l, (double)after.right / test.count, 6);
    put_key(&l, "n");
    put_uint(&l, test.count);
    put_key(&l, "n_train");
    put_uint(&l, train.count);
    put_key(&l, "experts");
    put(&l, "{\"GE\":");
    put_uint(&l, test.count - after.used_le);
    put(&l, ",\"LE\":");
    put_uint(&l, after.used_le);
    put(&l, "}");
    put_key(&l, "le_steps");
    put_uint(&l, report.le_steps);
    put_key(&l, "le_epochs");
    put_uint(&l, report.le_epochs);
    put_key(&l, "gn_steps");
    put_uint(&l, report.gn_steps);
    put_key(&l, "training_inputs");
    put_uint(&l, report.n_training_inputs);
    put_key(&l, "replay");
    put_uint(&l, report.replay);
    put_key(&l, "le_loss");
    put_fixed(&l, report.le_loss, 6);
    put_key(&l, "gn_loss");
    put_fixed(&l, report.gn_loss, 6);
    put_key(&l, "threshold");
    put_fixed(&l, report.gate_threshold, 7);
    put_key(&l, "seed");
    put_uint(&l, config.seed);
    put_key(&l, "quantized");
    put(&l, ET_MODEL_QUANTIZED ? "true" : "false");
    put_key(&l, "platform");
    put(&l, "\"");
    put(&l, platform_name());
    put(&l, "\"");
    put_key(&l, "arena_bytes");
    put_uint(&l, sizeof arena_memory);
    put_key(&l, "arena_peak_bytes");
    put_uint(&l, arena_peak);
    if (platform_static_ram()) {
        put_key(&l, "static_ram_bytes");
        put_uint(&l, platform_static_ram());
        put_key(&l, "stack_peak_bytes");
        put_uint(&l, platform_stack_peak());
    }
    if (counted_after) {
        put_key(&l, "instructions");
        put(&l, "{\"per_inference_ge\":");
        put_uint(&l, (counted_before - counted_start) / test.count);
        put(&l, ",\"per_inference_mixture\":");
        put_uint(&l, (counted_after - counted_personalize) / test.count);
        put(&l, ",\"personalize\":");
        put_uint(&l, counted_personalize - counted_before);
        put(&l, ",\"per_training_sample\":");
        put_uint(&l, (counted_personalize - counted_before) / train.count);
        put(&l, "}");
    }
    if (seconds_after >= 0) {
        put_key(&l, "seconds");
        put(&l, "{\"per_inference_ge\":");
        put_fixed(&l, (seconds_before - seconds_start) / test.count, 7);
        put(&l, ",\"personalize\":");
        put_fixed(&l, seconds_personalize - seconds_before, 4);
        put(&l, ",\"per_training_sample\":");
        put_fixed(&l, (seconds_personalize - seconds_before) / train.count, 6);
        put(&l, "}");
    }
    put(&l, "}\n");
    platform_print(l.text);
    platform_close(train_file);
    platform_close(test_file);
    platform_close(scratch_file);
    platform_close(slots.files[0]);
    platform_close(slots.files[1]);
    if (dump) platform_close(dump);
    return 0;
}
