/*
 * libedgetailor: GE inference and on-device personalization (LE and GN) in
 * plain C99, for microcontrollers. The same math, defaults and seeded order
 * as the Python device runtime (device/mixture.py), so the same bundle,
 * samples and seed give the same personalization on a Cortex-M as on a PC.
 *
 * - No malloc: the model is const data written by `edgetailor export
 *   firmware` (edgetailor_model.c), and all working memory is one arena the
 *   caller provides, of a size known at compile time (ET_ARENA_BYTES in the
 *   generated edgetailor_model.h).
 * - The user's samples are read through a callback (flash, SD card, a host
 *   file); so are GE's outputs for each training input, which training
 *   re-reads at every step (et_scratch): RAM holds one row at a time, never
 *   the sample set.
 * - The personalized weights are written through a callback into one of two
 *   slots with a sequence number and a CRC-32, so a write cut by a power loss
 *   leaves the previous personalization in use (et_slots_*).
 *
 * Every function returns an et_status; et_status_message() says what it
 * means, and et_last_error() carries the detail of the last failure.
 */
#ifndef EDGETAILOR_H
#define EDGETAILOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ET_ABI_VERSION 1

typedef enum {
    ET_OK = 0,
    ET_ERR_ARGUMENT = 1,      /* a NULL pointer, a zero count, a config value out of range */
    ET_ERR_ARENA = 2,         /* the arena is smaller than the work needs */
    ET_ERR_IO = 3,            /* a storage callback failed (read, write or sync) */
    ET_ERR_SAMPLES = 4,       /* a sample file with the wrong magic, size, shape or label range */
    ET_ERR_MODEL = 5,         /* the model data is not one these kernels run (ABI, op, shape) */
    ET_ERR_DIVERGED = 6,      /* a loss became NaN or infinite: lower the learning rate */
    ET_ERR_NO_STATE = 7,      /* neither slot holds a valid personalization */
    ET_ERR_CANCELLED = 8,     /* the progress callback asked to stop */
    ET_ERR_MISMATCH = 9       /* a saved personalization belongs to another bundle */
} et_status;

/* ------------------------------------------------------------------ model */

typedef enum {
    ET_OP_CONV2D = 1,   /* NCHW, weights [out_c][in_c][kh][kw], group 1, dilation 1 */
    ET_OP_RELU = 2,
    ET_OP_MAXPOOL = 3,
    ET_OP_FLATTEN = 4,  /* NCHW is already channel-major: only the shape changes */
    ET_OP_LINEAR = 5    /* weights [out][in] (Gemm with transB) */
} et_op;

/* One GE layer. Shapes are fixed at export; the kernels never allocate. */
typedef struct {
    uint8_t op;
    uint8_t kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left;
    int8_t tap;                       /* -1, or the feature tap this layer's output is (ET_TAP_*) */
    uint16_t in_c, in_h, in_w;
    uint16_t out_c, out_h, out_w;
    /* fp32 models */
    const float *weight;
    const float *bias;
    /* int8 models: uint8 activations (scale, zero point) and symmetric
     * per-output-channel int8 weights; the int32 bias is on the grid
     * in_scale * weight_scale[c]; multiplier[c] = in_scale * weight_scale[c] / out_scale. */
    const int8_t *weight_q;
    const int32_t *bias_q;
    const float *multiplier;
    float out_scale;
    int32_t in_zero_point, out_zero_point;
} et_layer;

enum { ET_TAP_LE = 0, ET_TAP_GN = 1 };

typedef enum { ET_LE_CHANNEL_MIX = 1, ET_LE_LOWRANK = 2 } et_le_kind;

/* Doubles, as the manifest has them: the step programs compute in float32
 * with float32(beta) and float32(1 - beta), and 1 - float32(beta) differs. */
typedef struct {
    double beta1, beta2, eps, weight_decay;
} et_adamw;

/* personalize.* of the bundle's manifest: the defaults a device may override. */
typedef struct {
    uint32_t le_epochs, le_max_steps, batch_size, augment_copies, augment_until, gn_steps;
    float le_learning_rate, gn_learning_rate;   /* float32, as the step programs take them */
    double replay_weight, gate_generic_share;   /* float64, as Python rounds and interpolates with them */
    uint64_t seed;
} et_config;

typedef struct {
    uint32_t abi_version;
    const char *bundle_id;          /* the bundle's id: a saved personalization is bound to it */
    const char *manifest_sha256;
    uint8_t quantized;              /* 1: int8 kernels (weight_q, bias_q, multiplier) */
    uint16_t in_h, in_w;            /* one channel of uint8 pixels */
    const float *input_lut;         /* fp32: pixel value -> normalized input, as InputSpec.normalize */
    const uint8_t *input_q_lut;     /* int8: pixel value -> quantized input */
    uint16_t n_layers;
    const et_layer *layers;
    uint16_t n_classes;
    const char *const *labels;
    float logits_scale;             /* int8: logits = (q - zero_point) * scale */
    int32_t logits_zero_point;
    uint16_t tap_dim[2];            /* ET_TAP_LE, ET_TAP_GN */
    float tap_scale[2];             /* int8: features = (q - zero_point) * scale */
    int32_t tap_zero_point[2];
    uint32_t max_activation;        /* largest layer input + output, in elements */
    /* Local Expert */
    uint8_t le_kind;
    uint16_t le_channels, le_width, le_rank;
    uint32_t le_params;
    /* offsets into LE's flat parameters (sorted by name, as the manifest);
     * channel_mix: mix.weight [width][channels], mix.bias, up.weight [classes][positions*width], up.bias;
     * lowrank: down.weight [rank][dim] (rank > 0), up.weight [classes][rank or dim], up.bias */
    uint32_t le_off_a_weight, le_off_a_bias, le_off_up_weight, le_off_up_bias;
    const float *le_initial;
    et_adamw le_optimizer;
    /* Gating Network: score.weight [dim], score.bias */
    uint32_t gn_params, gn_off_weight, gn_off_bias;
    const float *gn_initial;
    et_adamw gn_optimizer;
    float gate_threshold;
    et_config defaults;
    /* replay glyphs: count, and each one's zero-run coded bytes at replay_data + replay_offsets[i] */
    uint32_t replay_count;
    uint32_t replay_bytes;
    const uint8_t *replay_data;
    const uint32_t *replay_offsets;
} et_model;

/* ---------------------------------------------------------------- storage */

/* Reads `length` bytes at `offset`; returns 0 on success. */
typedef int (*et_read_fn)(void *context, uint32_t offset, void *buffer, uint32_t length);
typedef int (*et_write_fn)(void *context, uint32_t offset, const void *buffer, uint32_t length);

typedef struct {
    void *context;
    et_read_fn read;
} et_reader;

/* Scratch storage for GE's outputs on every training input (a file, an SD
 * card region, external flash): written once per personalization, read at
 * every step. et_scratch_bytes() says how much it needs. */
typedef struct {
    void *context;
    et_read_fn read;
    et_write_fn write;
} et_scratch;

/* Two slots for the personalized weights; `slot` is 0 or 1. `sync` (may be
 * NULL) makes what was written durable before the slot counts as written. */
typedef struct {
    void *context;
    int (*read)(void *context, int slot, uint32_t offset, void *buffer, uint32_t length);
    int (*write)(void *context, int slot, uint32_t offset, const void *buffer, uint32_t length);
    int (*sync)(void *context, int slot);
} et_slots;

/* ---------------------------------------------------------------- samples */

/* A sample file (edgetailor export firmware-samples), little-endian:
 *   0  "ETSM"        magic
 *   4  u16 version   1
 *   6  u16 height, u16 width, u16 n_labels
 *  12  u32 count
 *  16  u32 crc32 of the records
 *  20  u32 crc32 of the bundle's label names joined by "\n": a file made for another bundle with as
 *      many labels, or with another label order, is refused
 *  24  count records of [u8 label][height*width u8 pixels, row-major, white ink on black]
 */
#define ET_SAMPLES_HEADER_BYTES 24u

typedef struct {
    et_reader reader;
    uint32_t size;          /* the file's size in bytes, to check the count against */
    uint32_t count;
    uint16_t height, width, n_labels;
} et_samples;

/* Checks the header (magic, version, shape against the model, size) and
 * every record's label and the CRC, reading one record at a time. */
et_status et_samples_open(et_samples *samples, const et_model *model, et_reader reader, uint32_t size);
et_status et_samples_read(const et_samples *samples, uint32_t index, uint8_t *label, uint8_t *pixels);

/* ---------------------------------------------------------------- arena */

typedef struct {
    uint8_t *base;
    size_t size, used, peak;
} et_arena;

void et_arena_init(et_arena *arena, void *memory, size_t size);

/* ------------------------------------------------------------- inference */

/* GE's logits (n_classes floats) and, if non-NULL, its two feature taps for
 * one uint8 image (in_h * in_w). */
et_status et_ge_run(const et_model *model, et_arena *arena, const uint8_t *image, float *logits,
                    float *le_features, float *gn_features);

/* A personalization: LE's and GN's weights and the gate's threshold. */
typedef struct {
    float *le;            /* model->le_params floats */
    float *gn;            /* model->gn_params floats */
    float threshold;
    uint32_t sequence;    /* the slot record's number, grows with each save */
} et_personalization;

/* Space for a personalization's weights in the arena (stays until the arena is reset). */
et_status et_personalization_alloc(const et_model *model, et_arena *arena, et_personalization *out);

typedef struct {
    uint16_t label;       /* the answer */
    uint8_t used_le;      /* 1: LE answered (gate above the threshold) */
    float gate;           /* P(LE should answer); 0 without a personalization */
} et_prediction;

/* GE alone (personalization NULL), or GE, LE and GN routed by the gate. */
et_status et_predict(const et_model *model, et_arena *arena, const et_personalization *personalization,
                     const uint8_t *image, et_prediction *out);

/* ---------------------------------------------------------- personalizing */

typedef struct {
    uint32_t n_samples, n_training_inputs, augment_copies, replay, le_epochs, le_steps, gn_steps;
    float le_loss, gn_loss, gate_threshold;
} et_report;

/* Progress: stage "features", "local expert" or "gating network"; return
 * nonzero to cancel (ET_ERR_CANCELLED; nothing is changed). */
typedef int (*et_progress_fn)(void *context, const char *stage, uint32_t done, uint32_t total);

/* Bytes of scratch storage a personalization of n_samples needs. */
uint32_t et_scratch_bytes(const et_model *model, const et_config *config, uint32_t n_samples);
/* Bytes of arena a personalization of n_samples needs, its result included. */
size_t et_personalize_arena_bytes(const et_model *model, const et_config *config, uint32_t n_samples);

/* An upper bound of et_personalize_arena_bytes plus a second personalization
 * (what the example holds), at compile time, from the exported model's
 * macros (edgetailor_model.h); max_inputs is samples * (augment_copies + 1).
 * The library's tests check that it bounds the function. */
#define ET_ALIGN8_BYTES(n) ((((size_t)(n)) + 7u) & ~(size_t)7u)
#define ET_MAX3_(a, b, c) ((a) > (b) ? ((a) > (c) ? (a) : (c)) : ((b) > (c) ? (b) : (c)))
#define ET_ROW_BYTES_(classes, le_dim, gn_dim) ET_ALIGN8_BYTES(4u * ((le_dim) + (gn_dim) + (classes)))
#define ET_PERSONALIZE_ARENA_BOUND(in_h, in_w, max_activation, quantized, classes, le_dim, gn_dim, le_hidden,     \
                                   le_params, gn_params, replay, max_inputs)                                      \
    (3u * (ET_ALIGN8_BYTES(4u * (le_params)) + ET_ALIGN8_BYTES(4u * (gn_params))) +                                \
     ET_ALIGN8_BYTES(2u * ((max_inputs) + (replay))) +                                                            \
     ET_MAX3_(ET_ROW_BYTES_(classes, le_dim, gn_dim) + 2u * ET_ALIGN8_BYTES((in_h) * (in_w)) +                    \
                  ET_ALIGN8_BYTES(4u * (((in_h) + 3u) * ((in_w) + 2u) + 1u)) +                                    \
                  ET_ALIGN8_BYTES((max_activation) * ((quantized) ? 1u : 4u)),                                     \
              ET_ALIGN8_BYTES(4u * (max_inputs)) + 3u * ET_ALIGN8_BYTES(4u * (le_params)) +                        \
                  ET_ROW_BYTES_(classes, le_dim, gn_dim) + ET_ALIGN8_BYTES(4u * (3u * (le_hidden) + (classes))),   \
              ET_ALIGN8_BYTES(4u * (replay)) + 3u * ET_ALIGN8_BYTES(4u * (gn_params)) +                            \
                  ET_ROW_BYTES_(classes, le_dim, gn_dim) + ET_ALIGN8_BYTES(4u * ((replay) / 3u + 1u))))

/* Trains LE and GN on the samples into `out` (from et_personalization_alloc).
 * The arena's working space is released before returning. */
et_status et_personalize(const et_model *model, const et_config *config, const et_samples *samples,
                         et_scratch scratch, et_arena *arena, et_personalization *out, et_report *report,
                         et_progress_fn progress, void *progress_context);

/* ----------------------------------------------------- saving and loading */

/* Writes `p` to the slot not holding the newest valid record, syncs it, and
 * only then does it count: a failed or cut write leaves the previous one. */
et_status et_slots_save(const et_model *model, et_slots slots, et_personalization *p);
/* The newest valid record of this bundle (ET_ERR_NO_STATE if none; ET_ERR_MISMATCH if
 * only another bundle's). Its CRC is checked again as it is copied; if that fails for
 * both slots, the weights in p are unspecified (ET_ERR_IO). */
et_status et_slots_load(const et_model *model, et_slots slots, et_personalization *p);
uint32_t et_slot_bytes(const et_model *model);

/* ------------------------------------------------------------------ misc */

const char *et_status_message(et_status status);
/* The detail of the last failure in this thread of control (a static buffer). */
const char *et_last_error(void);
uint32_t et_crc32(uint32_t crc, const void *data, size_t length);

#ifdef __cplusplus
}
#endif

#endif /* EDGETAILOR_H */
