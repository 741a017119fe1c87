/* Saving a personalization so that a power loss cannot lose it: two slots,
 * each record carrying a sequence number and a CRC-32. A save writes the
 * slot that does not hold the newest valid record and syncs it; until the
 * write is complete its CRC does not match, so a cut write leaves the
 * previous record the newest valid one.
 *
 * A record, little-endian: "ETPZ", u32 version 1, u32 sequence, u32 payload
 * bytes, 64 bytes of bundle id (zero-padded), f32 threshold, LE's floats,
 * GN's floats, then u32 CRC-32 of everything before it. */
#include <string.h>

#include "et_internal.h"

#define HEADER 80u
#define ID_BYTES 64u

uint32_t et_slot_bytes(const et_model *model) {
    return HEADER + 4u + (model->le_params + model->gn_params) * 4u + 4u;
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void header_for(const et_model *model, uint32_t sequence, uint8_t *header) {
    size_t id = strlen(model->bundle_id);
    memset(header, 0, HEADER);
    memcpy(header, "ETPZ", 4);
    put32(header + 4, 1u);
    put32(header + 8, sequence);
    put32(header + 12, et_slot_bytes(model) - HEADER - 4u);
    memcpy(header + 16, model->bundle_id, id < ID_BYTES ? id : ID_BYTES);
}

/* The slot's record: 1 valid and this bundle's, 2 valid and another's, 0 none or damaged. */
static int inspect(const et_model *model, et_slots slots, int slot, uint32_t *sequence) {
    uint8_t header[HEADER], want[HEADER], chunk[64], tail[4];
    uint32_t total = et_slot_bytes(model), offset, crc;
    if (slots.read(slots.context, slot, 0, header, HEADER)) return 0;
    if (memcmp(header, "ETPZ", 4) != 0 || get32(header + 4) != 1u) return 0;
    if (get32(header + 12) != total - HEADER - 4u) return 0;
    crc = et_crc32(0, header, HEADER);
    for (offset = HEADER; offset < total - 4u;) {
        uint32_t n = total - 4u - offset < sizeof chunk ? total - 4u - offset : (uint32_t)sizeof chunk;
        if (slots.read(slots.context, slot, offset, chunk, n)) return 0;
        crc = et_crc32(crc, chunk, n);
        offset += n;
    }
    if (slots.read(slots.context, slot, total - 4u, tail, 4) || get32(tail) != crc) return 0;
    *sequence = get32(header + 8);
    header_for(model, *sequence, want);
    return memcmp(header + 16, want + 16, ID_BYTES) == 0 ? 1 : 2;
}

static int newer(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }   /* wraps after 2^31 saves */

static uint32_t float_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

static float bits_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

et_status et_slots_save(const et_model *model, et_slots slots, et_personalization *p) {
    uint8_t header[HEADER], value[4];
    uint32_t seq[2] = {0, 0}, sequence, i, offset, crc;
    int kind[2], slot;
    if (!model || !p || !p->le || !p->gn || !slots.read || !slots.write)
        return et_fail(ET_ERR_ARGUMENT, "et_slots_save: a NULL argument");
    kind[0] = inspect(model, slots, 0, &seq[0]);
    kind[1] = inspect(model, slots, 1, &seq[1]);
    /* Never overwrite this bundle's newest record: write the other slot, or,
     * where neither holds one of this bundle's, an empty or damaged one first. */
    if (kind[0] == 1 && kind[1] == 1) slot = newer(seq[0], seq[1]) ? 1 : 0;
    else if (kind[0] == 1 || kind[1] == 1) slot = kind[0] == 1 ? 1 : 0;
    else if (kind[0] == 0 || kind[1] == 0) slot = kind[0] == 0 ? 0 : 1;
    else slot = newer(seq[0], seq[1]) ? 1 : 0;
    sequence = 1u;   /* one more than any valid record, so the new one is the newest */
    if (kind[0]) sequence = seq[0] + 1u;
    if (kind[1] && (!kind[0] || newer(seq[1], seq[0]))) sequence = seq[1] + 1u;
    header_for(model, sequence, header);
    crc = et_crc32(0, header, HEADER);
    if (slots.write(slots.context, slot, 0, header, HEADER)) goto failed;
    offset = HEADER;
    for (i = 0; i < 1u + model->le_params + model->gn_params; i++, offset += 4) {
        float f = i == 0 ? p->threshold : i <= model->le_params ? p->le[i - 1u] : p->gn[i - 1u - model->le_params];
        put32(value, float_bits(f));   /* little-endian on every machine */
        crc = et_crc32(crc, value, 4);
        if (slots.write(slots.context, slot, offset, value, 4)) goto failed;
    }
    put32(value, crc);
    if (slots.write(slots.context, slot, offset, value, 4)) goto failed;
    if (slots.sync && slots.sync(slots.context, slot)) goto failed;
    p->sequence = sequence;
    return ET_OK;
failed:
    return et_fail_n(ET_ERR_IO, "writing personalization slot ", slot,
                     " failed; the previous personalization stays in use");
}

/* Copies the slot's record into p while checking its CRC again: storage that
 * changed since it was inspected is caught, not trusted. */
static int copy_record(const et_model *model, et_slots slots, int slot, et_personalization *p) {
    uint8_t header[HEADER], value[4];
    uint32_t i, crc;
    if (slots.read(slots.context, slot, 0, header, HEADER)) return -1;
    crc = et_crc32(0, header, HEADER);
    for (i = 0; i < 1u + model->le_params + model->gn_params; i++) {
        float f;
        if (slots.read(slots.context, slot, HEADER + 4u * i, value, 4)) return -1;
        crc = et_crc32(crc, value, 4);
        f = bits_float(get32(value));
        if (i == 0) p->threshold = f;
        else if (i <= model->le_params) p->le[i - 1u] = f;
        else p->gn[i - 1u - model->le_params] = f;
    }
    if (slots.read(slots.context, slot, HEADER + 4u * i, value, 4) || get32(value) != crc) return -1;
    return 0;
}

et_status et_slots_load(const et_model *model, et_slots slots, et_personalization *p) {
    uint32_t seq[2] = {0, 0};
    int kind[2], first, attempt;
    if (!model || !p || !p->le || !p->gn || !slots.read) return et_fail(ET_ERR_ARGUMENT, "et_slots_load: a NULL argument");
    kind[0] = inspect(model, slots, 0, &seq[0]);
    kind[1] = inspect(model, slots, 1, &seq[1]);
    if (kind[0] != 1 && kind[1] != 1) {
        if (kind[0] == 2 || kind[1] == 2)
            return et_fail(ET_ERR_MISMATCH, "the saved personalization was made with another bundle; "
                                            "personalize again with this one");
        return et_fail(ET_ERR_NO_STATE, "neither slot holds a valid personalization");
    }
    first = kind[0] == 1 && (kind[1] != 1 || newer(seq[0], seq[1])) ? 0 : 1;
    for (attempt = 0; attempt < 2; attempt++) {
        int slot = attempt ? 1 - first : first;
        if (kind[slot] != 1) continue;
        if (copy_record(model, slots, slot, p) == 0) {
            p->sequence = seq[slot];
            return ET_OK;
        }
    }
    return et_fail(ET_ERR_IO, "reading the personalization failed (the storage changed or failed while it was read); "
                              "p's weights are unspecified, load again or personalize again");
}
