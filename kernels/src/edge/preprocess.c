/* preprocess.c — nora_edge_preprocess: one RGB frame -> the vision graph's pixel_values, bit-exact with the
 * Python runtime (nora_edge/preprocess.py), itself bit-exact with Pillow + transformers' Qwen2VLImageProcessor.
 *
 * Data flow:
 *   rgb (H, W, 3) uint8, row stride `stride`
 *   --nora_edge_priv_resize_bicubic (resample.c: Pillow's separable bicubic, bit-exact)--> (spec.height,
 *     spec.width, 3) uint8 (the frame itself when it already has that size)
 *   --per channel c and byte v, once per call: lut[c][v] = ((float)((double)v * (1/255)) - mean[c]) / std[c]
 *     (HF rescale in float64 then float32, normalize in float32: the same IEEE operations numpy performs)
 *   --patchify: rows in 2x2 merge-group order (gh/m, gw/m, m, m), each row (C, tp, p, p), the frame repeated
 *     tp times--> out (gh*gw, 3*tp*p*p) float32, grid_thw = {1, gh, gw}
 *
 * The caller gives the final size: the Python runtime resizes the frame once, to spec.output_size() (its
 * fetch_image target, which the image processor's smart_resize keeps for NORA's specs); nora_edge.preprocess
 * only takes this path when the two sizes agree.
 *
 * Memory: per call, malloc'd and freed before it returns (no state between calls, thread-safe): the resized
 * image (H' * W' * 3) plus resample.c's scratch; 480x640 -> 224x224: ~0.5 MB. Needs IEEE float/double without
 * excess precision (FLT_EVAL_METHOD 0) and -ffp-contract=off: a fused multiply-add would round differently from
 * numpy/Pillow.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "edge_error.h"
#include "nora_edge.h"
#include "resample.h"

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "nora_edge_preprocess needs FLT_EVAL_METHOD == 0 (no excess precision) to round like numpy"
#endif

#define NE_MAX_SIDE 16384  /* nora_edge.preprocess._MAX_SIDE: frame and target sides */
#define NE_MAX_TEMPORAL 64 /* temporal_patch_size cap (NORA: 2); bounds the output size */

/* a * b into *r unless it overflows size_t */
static int ne_mul(size_t a, size_t b, size_t *r) {
    if (a != 0 && b > SIZE_MAX / a) {
        return 0;
    }
    *r = a * b;
    return 1;
}

/* Validate a spec; NORA_EDGE_OK and the float count in *n, or NORA_EDGE_ERR_INPUT with the message set. */
static nora_edge_status ne_spec_size(const nora_edge_image_spec *s, const char *fn, size_t *n) {
    if (!s) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: spec is NULL", fn);
    }
    const struct {
        const char *name;
        int32_t value, hi;
    } ints[] = {
        {"patch_size", s->patch_size, NE_MAX_SIDE},
        {"merge_size", s->merge_size, NE_MAX_SIDE},
        {"temporal_patch_size", s->temporal_patch_size, NE_MAX_TEMPORAL},
        {"height", s->height, NE_MAX_SIDE},
        {"width", s->width, NE_MAX_SIDE},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        if (ints[i].value < 1 || ints[i].value > ints[i].hi) {
            return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: spec.%s = %d, must be in [1, %d]", fn,
                                       ints[i].name, (int)ints[i].value, (int)ints[i].hi);
        }
    }
    const int64_t factor = (int64_t)s->patch_size * s->merge_size;
    if (s->height % factor != 0 || s->width % factor != 0) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT,
                                   "%s: spec.height x spec.width = %d x %d, must be multiples of "
                                   "patch_size * merge_size = %lld",
                                   fn, (int)s->height, (int)s->width, (long long)factor);
    }
    for (int c = 0; c < 3; c++) {
        if (!isfinite(s->mean[c])) {
            return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: spec.mean[%d] = %g is not finite", fn, c,
                                       (double)s->mean[c]);
        }
        if (!isfinite(s->std[c]) || s->std[c] == 0.0f) {
            return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: spec.std[%d] = %g, must be finite and nonzero",
                                       fn, c, (double)s->std[c]);
        }
    }
    size_t v = 3;
    if (!ne_mul(v, (size_t)s->temporal_patch_size, &v) || !ne_mul(v, (size_t)s->height, &v) ||
        !ne_mul(v, (size_t)s->width, &v)) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: 3 * %d * %d * %d floats overflow size_t", fn,
                                   (int)s->temporal_patch_size, (int)s->height, (int)s->width);
    }
    *n = v; /* (gh*gw) rows of 3*tp*p*p = 3*tp*h*w */
    return NORA_EDGE_OK;
}

size_t nora_edge_pixel_values_size(const nora_edge_image_spec *spec) {
    size_t n = 0;
    return ne_spec_size(spec, "nora_edge_pixel_values_size", &n) == NORA_EDGE_OK ? n : 0;
}

/* Normalized patches from the resized image img (h, w, 3), row stride istride. */
static void ne_patchify(const uint8_t *img, size_t istride, const nora_edge_image_spec *s, float *out) {
    float lut[3][256];
    for (int c = 0; c < 3; c++) {
        for (int v = 0; v < 256; v++) {
            /* one IEEE operation per statement: float64 rescale, float32 cast, float32 subtract and divide */
            const float scaled = (float)((double)v * (1.0 / 255.0));
            const float centered = scaled - s->mean[c];
            lut[c][v] = centered / s->std[c];
        }
    }
    const int32_t p = s->patch_size, m = s->merge_size, tp = s->temporal_patch_size;
    const int32_t gh = s->height / p, gw = s->width / p;
    const size_t plane = (size_t)p * (size_t)p;
    float *o = out;
    for (int32_t bh = 0; bh < gh / m; bh++) {
        for (int32_t bw = 0; bw < gw / m; bw++) {
            for (int32_t mh = 0; mh < m; mh++) {
                for (int32_t mw = 0; mw < m; mw++) {
                    const size_t y0 = (size_t)(bh * m + mh) * (size_t)p, x0 = (size_t)(bw * m + mw) * (size_t)p;
                    for (int c = 0; c < 3; c++) {
                        const float *l = lut[c];
                        float *first = o;
                        for (int32_t py = 0; py < p; py++) {
                            const uint8_t *src = img + (y0 + (size_t)py) * istride + x0 * 3 + (size_t)c;
                            for (int32_t px = 0; px < p; px++) {
                                *o++ = l[src[3 * px]];
                            }
                        }
                        for (int32_t t = 1; t < tp; t++) { /* the still frame repeated along tp */
                            memcpy(o, first, plane * sizeof *o);
                            o += plane;
                        }
                    }
                }
            }
        }
    }
}

nora_edge_status nora_edge_preprocess(const uint8_t *rgb, int32_t height, int32_t width, size_t stride,
                                      const nora_edge_image_spec *spec, float *out, size_t out_len,
                                      int64_t grid_thw[3]) {
    static const char fn[] = "nora_edge_preprocess";
    if (!rgb) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: rgb is NULL", fn);
    }
    if (!out) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: out is NULL", fn);
    }
    if (height < 1 || height > NE_MAX_SIDE || width < 1 || width > NE_MAX_SIDE) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: frame %d x %d (height x width), sides must be in [1, %d]",
                                   fn, (int)height, (int)width, NE_MAX_SIDE);
    }
    const size_t row_bytes = (size_t)width * 3; /* input row */
    if (stride < row_bytes) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: stride %zu < width * 3 = %zu bytes", fn, stride,
                                   row_bytes);
    }
    if ((size_t)(height - 1) > (SIZE_MAX - row_bytes) / stride) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: stride %zu x %d rows overflows size_t", fn, stride,
                                   (int)height);
    }
    size_t need = 0;
    nora_edge_status st = ne_spec_size(spec, fn, &need);
    if (st != NORA_EDGE_OK) {
        return st;
    }
    if (out_len < need) {
        return nora_edge_priv_fail(NORA_EDGE_ERR_INPUT, "%s: out_len %zu < %zu floats needed for %d x %d", fn,
                                   out_len, need, (int)spec->height, (int)spec->width);
    }
    const int32_t oh = spec->height, ow = spec->width;
    const uint8_t *img = rgb; /* the image patchified and its stride */
    size_t istride = stride;
    uint8_t *res = NULL;
    if (height != oh || width != ow) {
        res = malloc((size_t)oh * (size_t)ow * 3);
        if (!res || nora_edge_priv_resize_bicubic(rgb, height, width, stride, oh, ow, res) != 0) {
            free(res);
            return nora_edge_priv_fail(NORA_EDGE_ERR_NOMEM, "%s: out of memory resizing %d x %d -> %d x %d", fn,
                                       (int)height, (int)width, (int)oh, (int)ow);
        }
        img = res;
        istride = (size_t)ow * 3;
    }
    ne_patchify(img, istride, spec, out);
    if (grid_thw) {
        grid_thw[0] = 1;
        grid_thw[1] = oh / spec->patch_size;
        grid_thw[2] = ow / spec->patch_size;
    }
    free(res);
    return NORA_EDGE_OK;
}
