/* One jittered copy of a user sample, as device/mixture.py's `jitter` makes
 * it with toolkit/imaging.py's `affine_batch`: rotate and scale about the
 * centre, shift, bilinear sampling with a black border, all in float32 as
 * NumPy computes it, then rounded half to even back to uint8. The TypeScript
 * SDK's mixture.ts is the same port; keep the three in step. */
#include <math.h>
#include <string.h>

#include "et_internal.h"

float et_round_half_even(float x) { return rintf(x); }

/* A black border, a spare row, and one spare value: a sample clamped to the
 * bottom-right corner reads one past the spare row, weighted by 0. */
static size_t padded_floats(const et_model *model) { return (size_t)(model->in_h + 3) * (model->in_w + 2) + 1u; }

size_t et_jitter_arena_bytes(const et_model *model) { return ET_ALIGN8(padded_floats(model) * sizeof(float)); }

void et_jitter_one(const et_model *model, const uint8_t *image, double rotation, double scale, double ty, double tx,
                   float *padded, uint8_t *out) {
    const int h = (int)model->in_h, w = (int)model->in_w, stride = w + 2;
    const float cy = (float)((h - 1) / 2.0), cx = (float)((w - 1) / 2.0);
    const double theta = rotation * (3.14159265358979323846 / 180.0);
    const float cosv = (float)(cos(theta) / scale), sinv = (float)(sin(theta) / scale), msin = -sinv;
    const float fty = (float)ty, ftx = (float)tx;
    int r, c;
    memset(padded, 0, padded_floats(model) * sizeof(float));
    for (r = 0; r < h; r++)
        for (c = 0; c < w; c++) padded[(r + 1) * stride + c + 1] = (float)image[r * w + c] / 255.0f;
    for (r = 0; r < h; r++) {
        const float dy = ((float)r - cy) - fty;
        for (c = 0; c < w; c++) {
            const float dx = ((float)c - cx) - ftx;
            float rows = (msin * dx + cosv * dy) + cy, cols = (cosv * dx + sinv * dy) + cx;
            float fr, fc, top, bottom, value;
            int r0, c0, index;
            rows = rows < -1.0f ? -1.0f : rows > (float)h ? (float)h : rows;
            cols = cols < -1.0f ? -1.0f : cols > (float)w ? (float)w : cols;
            r0 = (int)floorf(rows);
            c0 = (int)floorf(cols);
            fr = rows - (float)r0;
            fc = cols - (float)c0;
            index = (r0 + 1) * stride + c0 + 1;
            top = padded[index];
            top = top + (padded[index + 1] - top) * fc;
            index += stride;
            bottom = padded[index];
            bottom = bottom + (padded[index + 1] - bottom) * fc;
            top = top + (bottom - top) * fr;
            value = et_round_half_even(top * 255.0f);
            out[r * w + c] = (uint8_t)(value >= 0.0f ? (value <= 255.0f ? value : 255.0f) : 0.0f);   /* NaN: 0 */
        }
    }
}
