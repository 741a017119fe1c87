/* Sample files (`edgetailor export firmware-samples`), read through a
 * callback one record at a time: the set never has to fit in RAM. */
#include <string.h>

#include "et_internal.h"

static uint32_t le16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return le16(p) | (le16(p + 2) << 16); }

et_status et_samples_open(et_samples *samples, const et_model *model, et_reader reader, uint32_t size) {
    uint8_t header[ET_SAMPLES_HEADER_BYTES], chunk[64];
    uint32_t record, i, crc = 0, want_crc;
    if (!samples || !model || !reader.read) return et_fail(ET_ERR_ARGUMENT, "et_samples_open: a NULL argument");
    memset(samples, 0, sizeof *samples);
    if (size < ET_SAMPLES_HEADER_BYTES)
        return et_fail_n(ET_ERR_SAMPLES, "the sample file is ", (long)size, " bytes, shorter than its 24-byte header");
    if (reader.read(reader.context, 0, header, sizeof header))
        return et_fail(ET_ERR_IO, "reading the sample file's header failed");
    if (memcmp(header, "ETSM", 4) != 0)
        return et_fail(ET_ERR_SAMPLES, "not a sample file (its magic is not ETSM); write one with "
                                       "`edgetailor export firmware-samples`");
    if (le16(header + 4) != 1)
        return et_fail_n(ET_ERR_SAMPLES, "sample file version ", (long)le16(header + 4), " is not 1");
    samples->height = (uint16_t)le16(header + 6);
    samples->width = (uint16_t)le16(header + 8);
    samples->n_labels = (uint16_t)le16(header + 10);
    samples->count = le32(header + 12);
    want_crc = le32(header + 16);
    {
        uint32_t names = 0;
        uint16_t k;
        for (k = 0; k < model->n_classes; k++) {
            if (k) names = et_crc32(names, "\n", 1);
            names = et_crc32(names, model->labels[k], strlen(model->labels[k]));
        }
        if (le32(header + 20) != names)
            return et_fail(ET_ERR_SAMPLES, "the sample file was made for a bundle with other labels (or another "
                                           "order); export them with this bundle");
    }
    if (samples->height != model->in_h || samples->width != model->in_w)
        return et_fail_n(ET_ERR_SAMPLES, "the samples are not this GE's input size (width ", samples->width,
                         "); export them with this bundle");
    if (samples->n_labels != model->n_classes)
        return et_fail_n(ET_ERR_SAMPLES, "the sample file has ", samples->n_labels,
                         " labels, not this bundle's; export them with this bundle");
    if (samples->count == 0) return et_fail(ET_ERR_SAMPLES, "the sample file holds no samples");
    record = 1u + (uint32_t)samples->height * samples->width;
    if (samples->count > (0xFFFFFFFFu - ET_SAMPLES_HEADER_BYTES) / record ||
        ET_SAMPLES_HEADER_BYTES + samples->count * record != size)
        return et_fail_n(ET_ERR_SAMPLES, "the sample file's size does not match its count of ", (long)samples->count,
                         " samples (truncated or padded)");
    /* one pass: every label in range, and the CRC over the records */
    for (i = 0; i < samples->count; i++) {
        uint32_t offset = ET_SAMPLES_HEADER_BYTES + i * record, done = 0;
        while (done < record) {
            uint32_t n = record - done < sizeof chunk ? record - done : (uint32_t)sizeof chunk;
            if (reader.read(reader.context, offset + done, chunk, n))
                return et_fail_n(ET_ERR_IO, "reading sample ", (long)i, " failed");
            if (done == 0 && chunk[0] >= samples->n_labels)
                return et_fail_n(ET_ERR_SAMPLES, "sample ", (long)i, " has a label outside the bundle's labels");
            crc = et_crc32(crc, chunk, n);
            done += n;
        }
    }
    if (crc != want_crc) return et_fail(ET_ERR_SAMPLES, "the sample file's CRC does not match: it is damaged");
    samples->reader = reader;
    samples->size = size;
    return ET_OK;
}

et_status et_samples_read(const et_samples *samples, uint32_t index, uint8_t *label, uint8_t *pixels) {
    uint32_t pixels_n, offset;
    if (!samples || !samples->reader.read || !label || !pixels)
        return et_fail(ET_ERR_ARGUMENT, "et_samples_read: a NULL argument or an unopened sample file");
    if (index >= samples->count) return et_fail_n(ET_ERR_ARGUMENT, "no sample ", (long)index, " in the file");
    pixels_n = (uint32_t)samples->height * samples->width;
    offset = ET_SAMPLES_HEADER_BYTES + index * (1u + pixels_n);
    if (samples->reader.read(samples->reader.context, offset, label, 1) ||
        samples->reader.read(samples->reader.context, offset + 1, pixels, pixels_n))
        return et_fail_n(ET_ERR_IO, "reading sample ", (long)index, " failed");
    if (*label >= samples->n_labels)   /* the storage changed since it was opened */
        return et_fail_n(ET_ERR_SAMPLES, "sample ", (long)index, " has a label outside the bundle's labels");
    return ET_OK;
}
