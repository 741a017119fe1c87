/* The small things every module uses: status messages, the arena, CRC-32
 * and the replay glyphs' zero-run code. */
#include <string.h>

#include "et_internal.h"

static char last_error[192];

const char *et_last_error(void) { return last_error; }

const char *et_status_message(et_status status) {
    switch (status) {
    case ET_OK: return "ok";
    case ET_ERR_ARGUMENT: return "invalid argument";
    case ET_ERR_ARENA: return "the arena is too small";
    case ET_ERR_IO: return "a storage callback failed";
    case ET_ERR_SAMPLES: return "invalid sample file";
    case ET_ERR_MODEL: return "the model data is not one these kernels run";
    case ET_ERR_DIVERGED: return "training diverged";
    case ET_ERR_NO_STATE: return "no saved personalization";
    case ET_ERR_CANCELLED: return "cancelled";
    case ET_ERR_MISMATCH: return "the saved personalization belongs to another bundle";
    }
    return "unknown status";
}

static size_t append(size_t at, const char *text) {
    while (text && *text && at + 1 < sizeof last_error) last_error[at++] = *text++;
    last_error[at] = '\0';
    return at;
}

et_status et_fail(et_status status, const char *message) {
    append(0, message);
    return status;
}

et_status et_fail_n(et_status status, const char *before, long value, const char *after) {
    char digits[24];
    size_t n = 0, at = append(0, before);
    unsigned long magnitude = value < 0 ? 0ul - (unsigned long)value : (unsigned long)value;
    do {
        digits[n++] = (char)('0' + magnitude % 10u);
        magnitude /= 10u;
    } while (magnitude && n < sizeof digits - 1);
    if (value < 0) digits[n++] = '-';
    while (n && at + 1 < sizeof last_error) last_error[at++] = digits[--n];
    last_error[at] = '\0';
    append(at, after);
    return status;
}

void et_arena_init(et_arena *arena, void *memory, size_t size) {
    /* The base is aligned here so that every allocation is 8-byte aligned. */
    uintptr_t start = (uintptr_t)memory, aligned = (start + 7u) & ~(uintptr_t)7u;
    arena->base = (uint8_t *)aligned;
    arena->size = size > aligned - start ? size - (aligned - start) : 0;
    arena->used = 0;
    arena->peak = 0;
}

void *et_arena_alloc(et_arena *arena, size_t bytes) {
    size_t need = ET_ALIGN8(bytes);
    void *p;
    if (!arena || !arena->base || need < bytes || need > arena->size - arena->used) return NULL;
    p = arena->base + arena->used;
    arena->used += need;
    if (arena->used > arena->peak) arena->peak = arena->used;
    return p;
}

uint32_t et_crc32(uint32_t crc, const void *data, size_t length) {
    /* Bitwise CRC-32 (zlib's polynomial): no 1 KB table in flash, and the
     * sample and slot files it checks are read once per personalization. */
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
    while (length--) {
        int k;
        crc ^= *p++;
        for (k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

et_status et_replay_decode(const et_model *model, uint32_t index, uint8_t *pixels) {
    /* [zeros][literal count][literals...] pairs until the glyph is full; the
     * exporter checked that every glyph's code decodes to its pixels, and
     * this checks that it stays inside the data and always moves on. */
    uint32_t at = 0, total = (uint32_t)model->in_h * model->in_w, offset, end = model->replay_bytes;
    if (index >= model->replay_count || !model->replay_data || !model->replay_offsets)
        return et_fail_n(ET_ERR_MODEL, "no replay glyph ", (long)index, " in the model");
    offset = model->replay_offsets[index];
    while (at < total) {
        uint32_t zeros, literals;
        if (offset + 2u > end || offset + 2u < offset) return et_fail_n(ET_ERR_MODEL, "replay glyph ", (long)index, " is cut short");
        zeros = model->replay_data[offset];
        literals = model->replay_data[offset + 1u];
        offset += 2u;
        if (!zeros && !literals) return et_fail_n(ET_ERR_MODEL, "replay glyph ", (long)index, " has an empty run");
        if (zeros > total - at || literals > total - at - zeros || literals > end - offset)
            return et_fail_n(ET_ERR_MODEL, "replay glyph ", (long)index, " runs past its pixels or the data");
        memset(pixels + at, 0, zeros);
        at += zeros;
        memcpy(pixels + at, model->replay_data + offset, literals);
        offset += literals;
        at += literals;
    }
    return ET_OK;
}
