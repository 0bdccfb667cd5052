/* resample.c — Pillow's bicubic resize of an RGB uint8 image, bit-exact (libImaging/Resample.c, Pillow 13),
 * for nora_edge_preprocess (see resample.h).
 *
 * Data flow: src (H, W, 3) uint8, row stride --taps per axis (precompute_coeffs + normalize_coeffs_8bpc: double
 * weights normalized per output pixel, 22-bit fixed point)--> horizontal and vertical passes (int32 sums, uint8
 * clip after each; vertical first when Pillow 13's rule says so, an axis of equal size skipped)--> dst (H', W', 3).
 * Horizontal first: only the source rows the vertical pass reads are resampled (Pillow's ybox_first..last).
 *
 * Integer sums are exact, so the tap order is free. Three implementations give Pillow's integers exactly
 * (chosen per call by ne_path: the best the build and CPU allow, or NORA_EDGE_SIMD; see resample.h):
 *   - AVX2 (resample_avx2.c, when the CPU has it): the SSE2 scheme on 256-bit vectors, four taps per madd in
 *     the horizontal pass, sixteen columns in the vertical one.
 *   - SSE2 (resample_sse2.c; x86-64 CPUs without AVX2): weights split k = h * 2048 + l into int16 halves,
 *     two taps x three channels per pair of _mm_madd_epi16, int32 lanes modulo 2**32 (Pillow's sum fits
 *     int32, so the wrapped result is the sum); clip8 as (sum >> 22) saturated to int16 then uint8.
 *   - portable C (-DNORA_EDGE_NO_SIMD or non-x86, e.g. Jetson's aarch64): the vertical pass over whole rows
 *     (a fixed 16-wide inner loop compilers vectorize), the horizontal pass two rows per 64-bit multiply-add.
 * Memory per call (malloc'd, freed before returning): the tap tables, the weight tables of the SSE2 passes, the
 * first pass's image when both axes change, one int32 or uint64 row. No state: thread-safe.
 */
#include "resample.h"
#include "resample_impl.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { NE_PATH_NONE = 0, NE_PATH_SSE2 = 1, NE_PATH_AVX2 = 2 };

/* The path resizes run: the best the build and CPU allow, capped by NORA_EDGE_SIMD (read once; a benign
 * first-use race computes the same value twice). */
static int ne_path(void) {
    static int cached = -1;
    int p = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (p >= 0) {
        return p;
    }
    int best = NE_SSE2 ? NE_PATH_SSE2 : NE_PATH_NONE;
#if NE_HAVE_AVX2
    if (nora_edge_priv_avx2_usable()) {
        best = NE_PATH_AVX2;
    }
#endif
    p = best;
    const char *env = getenv("NORA_EDGE_SIMD");
    if (env) {
        const int want = strcmp(env, "none") == 0 ? NE_PATH_NONE
                         : strcmp(env, "sse2") == 0 ? NE_PATH_SSE2
                         : strcmp(env, "avx2") == 0 ? NE_PATH_AVX2
                                                    : best;
        p = want < best ? want : best;
    }
    __atomic_store_n(&cached, p, __ATOMIC_RELAXED);
    return p;
}

const char *nora_edge_priv_resample_path(void) {
    static const char *const names[] = {"none", "sse2", "avx2"};
    return names[ne_path()];
}

#define NE_BICUBIC_SUPPORT 2.0 /* Pillow's BICUBIC filter support */

/* Pillow's bicubic_filter (Keys, a = -0.5). */
static double ne_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

static void ne_taps_free(ne_taps *t) {
    free(t->first);
    free(t->count);
    free(t->weight);
    memset(t, 0, sizeof *t);
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for box (0, in_size); 0 on success, -1 out of memory.
 * Sizes are <= NE_MAX_SIDE, so every product below fits in int/size_t. */
static int ne_taps_init(ne_taps *t, int32_t in_size, int32_t out_size) {
    /* Pillow: (double)(in1 - in0) / outSize with float in1 = in_size, in0 = 0 (exact for these sizes) */
    const double scale = (double)(float)in_size / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = NE_BICUBIC_SUPPORT * filterscale;
    const int32_t ksize = (int32_t)ceil(support) * 2 + 1;
    memset(t, 0, sizeof *t);
    t->ksize = ksize;
    t->first = malloc((size_t)out_size * sizeof *t->first);
    t->count = malloc((size_t)out_size * sizeof *t->count);
    t->weight = malloc((size_t)out_size * (size_t)ksize * sizeof *t->weight);
    double *k = malloc((size_t)ksize * sizeof *k);
    if (!t->first || !t->count || !t->weight || !k) {
        free(k);
        ne_taps_free(t);
        return -1;
    }
    for (int32_t xx = 0; xx < out_size; xx++) {
        const double center = 0.0 + (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        double ww = 0.0;
        int32_t xmin = (int32_t)(center - support + 0.5);
        int32_t xmax = (int32_t)(center + support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        if (xmax > ksize) { /* never for Pillow's arithmetic; keeps the table in bounds regardless */
            xmax = ksize;
        }
        for (int32_t x = 0; x < xmax; x++) {
            const double w = ne_bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        int32_t *kk = t->weight + (size_t)xx * (size_t)ksize;
        for (int32_t x = 0; x < ksize; x++) {
            double v = 0.0;
            if (x < xmax) {
                v = ww != 0.0 ? k[x] / ww : k[x];
            }
            /* C's (int)(v +- 0.5) truncation, as normalize_coeffs_8bpc */
            kk[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << NE_PRECISION_BITS))
                          : (int32_t)(0.5 + v * (1 << NE_PRECISION_BITS));
        }
        t->first[xx] = xmin;
        t->count[xx] = xmax < 0 ? 0 : xmax;
    }
    free(k);
    return 0;
}

/* Horizontal pass over `rows` rows: src (rows, in_w, 3) with stride sstride -> dst (rows, out_w, 3), dstride.
 * Two rows at a time in one uint64 (SWAR): row a's byte in the low half, row b's in the high half of pk[i], so
 * one 64-bit multiply-add by the sign-extended weight advances both sums. Modulo 2**64 the lane holds
 * S_a + S_b * 2**32 (S = Pillow's int32 sum, which fits int32), so S_a is the low 32 bits and S_b the high 32
 * bits of (lane - S_a): exact, the same integers as the one-row loop. pk: in_w * 3 uint64 of scratch. */
static void ne_pass_h(const uint8_t *src, size_t sstride, int32_t rows, const ne_taps *t, int32_t out_w,
                      uint8_t *dst, size_t dstride, uint64_t *restrict pk, size_t row_bytes) {
    const int32_t *restrict first = t->first, *restrict count = t->count, *restrict weight = t->weight;
    const size_t ksize = (size_t)t->ksize;
    const int32_t bias = 1 << (NE_PRECISION_BITS - 1);
    int32_t y = 0;
    for (; y + 1 < rows; y += 2) {
        const uint8_t *restrict a = src + (size_t)y * sstride, *restrict b = a + sstride;
        uint8_t *restrict da = dst + (size_t)y * dstride, *restrict db = da + dstride;
        for (size_t i = 0; i < row_bytes; i++) {
            pk[i] = (uint64_t)a[i] | (uint64_t)b[i] << 32;
        }
        for (int32_t xx = 0; xx < out_w; xx++) {
            const int32_t *restrict k = weight + (size_t)xx * ksize;
            const uint64_t *restrict p = pk + (size_t)first[xx] * 3;
            const int32_t n = count[xx];
            const uint64_t b64 = (uint64_t)bias | (uint64_t)bias << 32;
            uint64_t s0 = b64, s1 = b64, s2 = b64;
            for (int32_t x = 0; x < n; x++, p += 3) {
                const uint64_t w = (uint64_t)(int64_t)k[x];
                s0 += p[0] * w;
                s1 += p[1] * w;
                s2 += p[2] * w;
            }
            const uint64_t lanes[3] = {s0, s1, s2};
            for (int c = 0; c < 3; c++) {
                const int32_t lo = ne_i32((uint32_t)lanes[c]);
                da[3 * xx + c] = ne_clip8(lo);
                db[3 * xx + c] = ne_clip8(ne_i32((uint32_t)((lanes[c] - (uint64_t)(int64_t)lo) >> 32)));
            }
        }
    }
    for (; y < rows; y++) { /* the odd last row */
        const uint8_t *restrict s = src + (size_t)y * sstride;
        uint8_t *restrict d = dst + (size_t)y * dstride;
        for (int32_t xx = 0; xx < out_w; xx++) {
            const int32_t *restrict k = weight + (size_t)xx * ksize;
            const uint8_t *restrict p = s + (size_t)first[xx] * 3;
            const int32_t n = count[xx];
            int32_t s0 = bias, s1 = bias, s2 = bias;
            for (int32_t x = 0; x < n; x++, p += 3) {
                const int32_t w = k[x];
                s0 += p[0] * w;
                s1 += p[1] * w;
                s2 += p[2] * w;
            }
            d[3 * xx + 0] = ne_clip8(s0);
            d[3 * xx + 1] = ne_clip8(s1);
            d[3 * xx + 2] = ne_clip8(s2);
        }
    }
}

/* The horizontal pass: AVX2 (path) or SSE2 where the weight table was built (wt), else the portable two-row
 * loop (pk). */
static void ne_hpass(const uint8_t *src, size_t sstride, int32_t rows, const ne_taps *t, int32_t out_w,
                     uint8_t *dst, size_t dstride, const int16_t *wt, uint64_t *pk, size_t row_bytes, int path) {
#if NE_HAVE_AVX2
    if (wt && path == NE_PATH_AVX2) {
        nora_edge_priv_pass_h_avx2(src, sstride, rows, t->first, t->count, (t->ksize + 3) / 4, out_w, dst, dstride,
                                   wt, row_bytes);
        return;
    }
#endif
    (void)path;
#if NE_SSE2
    if (wt) {
        nora_edge_priv_pass_h_sse2(src, sstride, rows, t, out_w, dst, dstride, wt, row_bytes);
        return;
    }
#endif
    (void)wt;
    ne_pass_h(src, sstride, rows, t, out_w, dst, dstride, pk, row_bytes);
}

/* Vertical pass: src rows (stride sstride, `cols` bytes used each) -> dst (out_h, cols), dstride; acc holds
 * `cols` int32. Output row yy = sum over its taps of whole source rows (exact int32, so row-by-row order). */
static void ne_pass_v(const uint8_t *src, size_t sstride, size_t cols, const ne_taps *t, int32_t out_h,
                      uint8_t *dst, size_t dstride, int32_t *restrict acc) {
    for (int32_t yy = 0; yy < out_h; yy++) {
        const int32_t *k = t->weight + (size_t)yy * (size_t)t->ksize;
        const int32_t n = t->count[yy];
        for (size_t x = 0; x < cols; x++) {
            acc[x] = 1 << (NE_PRECISION_BITS - 1);
        }
        for (int32_t y = 0; y < n; y++) {
            const uint8_t *restrict s = src + (size_t)(t->first[yy] + y) * sstride;
            const int32_t w = k[y];
            size_t x = 0;
            for (; x + 16 <= cols; x += 16) { /* fixed trip count: vectorized even at -O2 */
                for (size_t j = 0; j < 16; j++) {
                    acc[x + j] += s[x + j] * w;
                }
            }
            for (; x < cols; x++) {
                acc[x] += s[x] * w;
            }
        }
        uint8_t *d = dst + (size_t)yy * dstride;
        for (size_t x = 0; x < cols; x++) {
            d[x] = ne_clip8(acc[x]);
        }
    }
}

/* The vertical pass: AVX2 (path) or SSE2 where the weight table was built (vt), else the portable row loop
 * (acc). */
static void ne_vpass(const uint8_t *src, size_t sstride, size_t cols, const ne_taps *t, int32_t out_h,
                     uint8_t *dst, size_t dstride, const int32_t *vt, int32_t *acc, int path) {
#if NE_HAVE_AVX2
    if (vt && path == NE_PATH_AVX2) {
        nora_edge_priv_pass_v_avx2(src, sstride, cols, t->first, t->count, t->weight, t->ksize, out_h, dst, dstride,
                                   vt);
        return;
    }
#endif
    (void)path;
#if NE_SSE2
    if (vt) {
        nora_edge_priv_pass_v_sse2(src, sstride, cols, t, out_h, dst, dstride, vt);
        return;
    }
#endif
    (void)vt;
    ne_pass_v(src, sstride, cols, t, out_h, dst, dstride, acc);
}

int nora_edge_priv_vertical_first(int32_t in_h, int32_t in_w, int32_t out_h, int32_t out_w) {
    const int64_t dh = (int64_t)in_h - out_h, dw = (int64_t)in_w - out_w;
    return dh > 0 && dh > dw * 2;
}

int nora_edge_priv_resize_bicubic(const uint8_t *src, int32_t height, int32_t width, size_t stride, int32_t oh,
                                  int32_t ow, uint8_t *res) {
    const size_t row_bytes = (size_t)width * 3; /* input row */
    const size_t out_row = (size_t)ow * 3; /* resized row */
    const int need_h = width != ow, need_v = height != oh;
    const int v_first = nora_edge_priv_vertical_first(height, width, oh, ow);
    ne_taps th = {0}, tv = {0};
    uint8_t *tmp = NULL;
    int32_t *acc = NULL;
    uint64_t *pk = NULL;
    int16_t *wt = NULL;
    int32_t *vt = NULL;
    const uint8_t *img = src;
    const size_t istride = stride;
    const int path = ne_path();
    int st = 0;
    if ((need_h && ne_taps_init(&th, width, ow)) || (need_v && ne_taps_init(&tv, height, oh))) {
        st = -1;
        goto done;
    }
    /* tmp holds the first pass of two */
    if (need_h && need_v) {
        tmp = malloc(v_first ? (size_t)oh * row_bytes : (size_t)height * out_row);
    }
#if NE_SSE2
    if (need_v && path != NE_PATH_NONE) {
        vt = malloc((size_t)oh * (size_t)((tv.ksize + 1) / 2) * 2 * sizeof *vt);
        if (vt && nora_edge_priv_vtab_fill(&tv, oh, vt) != 0) {
            free(vt);
            vt = NULL; /* a weight outside the split's range: the portable pass */
        }
    }
#endif
    if (need_v && !vt) {
        acc = malloc((v_first ? row_bytes : out_row) * sizeof *acc);
    }
#if NE_SSE2
    if (need_h && path != NE_PATH_NONE) {
        /* AVX2: (ksize + 3) / 4 quads x 32 int16 per pixel; SSE2: (ksize + 1) / 2 pairs x 16 */
        const size_t per = path == NE_PATH_AVX2 ? (size_t)((th.ksize + 3) / 4) * 32 : (size_t)((th.ksize + 1) / 2) * 16;
        wt = malloc((size_t)ow * per * sizeof *wt);
#if NE_HAVE_AVX2
        if (wt && path == NE_PATH_AVX2 && nora_edge_priv_wtab4_fill(&th, ow, wt) != 0) {
            free(wt);
            wt = NULL;
        }
#endif
        if (wt && path == NE_PATH_SSE2 && nora_edge_priv_wtab_fill(&th, ow, wt) != 0) {
            free(wt);
            wt = NULL; /* a weight outside the split's range: the portable pass */
        }
    }
#endif
    if (need_h && !wt) {
        pk = malloc(row_bytes * sizeof *pk);
    }
    if ((need_h && need_v && !tmp) || (need_v && !acc && !vt) || (need_h && !pk && !wt)) {
        st = -1;
        goto done;
    }
    if (need_h && need_v) {
        if (v_first) {
            ne_vpass(img, istride, row_bytes, &tv, oh, tmp, row_bytes, vt, acc, path);
            ne_hpass(tmp, row_bytes, oh, &th, ow, res, out_row, wt, pk, row_bytes, path);
        } else {
            /* only the source rows the vertical pass reads (Pillow's ybox_first..ybox_last) */
            const int32_t r0 = tv.first[0], r1 = tv.first[oh - 1] + tv.count[oh - 1];
            ne_hpass(img + (size_t)r0 * istride, istride, r1 - r0, &th, ow, tmp, out_row, wt, pk, row_bytes, path);
            for (int32_t i = 0; i < oh; i++) {
                tv.first[i] -= r0;
            }
            ne_vpass(tmp, out_row, out_row, &tv, oh, res, out_row, vt, acc, path);
        }
    } else if (need_h) {
        ne_hpass(img, istride, height, &th, ow, res, out_row, wt, pk, row_bytes, path);
    } else if (need_v) {
        ne_vpass(img, istride, row_bytes, &tv, oh, res, out_row, vt, acc, path);
    }
    if (!need_h && !need_v) {
        for (int32_t y = 0; y < height; y++) {
            memcpy(res + (size_t)y * out_row, src + (size_t)y * stride, out_row);
        }
    }
done:
    free(vt);
    free(wt);
    free(pk);
    free(acc);
    free(tmp);
    ne_taps_free(&th);
    ne_taps_free(&tv);
    return st;
}
