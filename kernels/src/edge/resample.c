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
 *   - SSE2 (x86-64, the default there): weights split k = h * 2048 + l into int16 halves, two taps x three
 *     channels per pair of _mm_madd_epi16, int32 lanes modulo 2**32 (Pillow's sum fits int32, so the
 *     wrapped result is the sum); clip8 as (sum >> 22) saturated to int16 then uint8.
 *   - portable C (-DNORA_EDGE_NO_SIMD or non-x86, e.g. Jetson's aarch64): the vertical pass over whole rows
 *     (a fixed 16-wide inner loop compilers vectorize), the horizontal pass two rows per 64-bit multiply-add.
 * Memory per call (malloc'd, freed before returning): the tap tables, the weight tables of the SSE2 passes, the
 * first pass's image when both axes change, one int32 or uint64 row. No state: thread-safe.
 */
#include "resample.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) && !defined(NORA_EDGE_NO_SIMD)
#include <emmintrin.h> /* SSE2: every x86-64 CPU */
#define NE_SSE2 1
#else
#define NE_SSE2 0
#endif

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "the bicubic weights need FLT_EVAL_METHOD == 0 (no excess precision) to round like Pillow"
#endif

#define NE_PRECISION_BITS 22   /* Pillow: 32 - 8 - 2 */

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

/* One axis's taps (Pillow's bounds + fixed-point kk): output i reads count[i] inputs from first[i]. */
typedef struct ne_taps {
    int32_t ksize;
    int32_t *first;  /* (out,) */
    int32_t *count;  /* (out,) */
    int32_t *weight; /* (out, ksize), units of 2**-22 */
} ne_taps;

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

/* Pillow's clip8: floor(acc / 2**22) clipped to [0, 255] (no shift of a negative value). */
static inline uint8_t ne_clip8(int32_t acc) {
    if (acc <= 0) {
        return 0;
    }
    acc >>= NE_PRECISION_BITS;
    return acc > 255 ? 255 : (uint8_t)acc;
}

/* uint32 -> int32, two's complement (no implementation-defined conversion) */
static inline int32_t ne_i32(uint32_t u) {
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - 2147483648u) - INT32_MAX - 1;
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

#if NE_SSE2
/* Taps 2j and 2j+1 of one output (k[0..n), 0 past n) split as k = hi * 2048 + lo, lo in [0, 2048) (hi exact:
 * floor(k / 2048)); -1 when a high part does not fit int16 (never for bicubic weights, |k| <= ~1.3 * 2**22). */
static int ne_split_pair(const int32_t *k, int32_t n, int32_t j, int32_t hi[2], int32_t lo[2]) {
    for (int q = 0; q < 2; q++) {
        const int32_t w = 2 * j + q < n ? k[2 * j + q] : 0;
        lo[q] = (int32_t)((uint32_t)w & 2047u);
        hi[q] = (w - lo[q]) / 2048;
        if (hi[q] < INT16_MIN || hi[q] > INT16_MAX) {
            return -1;
        }
    }
    return 0;
}

/* The horizontal taps for _mm_madd_epi16: per output pixel, per pair of taps (k0, k1), 16 int16: the high parts
 * {h0, h1, h0, h1, h0, h1, 0, 0} then the low parts {l0, l1, ...}, where k = h * 2048 + l, l in [0, 2048).
 * An odd last tap pairs with weight 0. -1 when a weight's high part does not fit int16 (never for bicubic
 * weights, |k| <= ~1.3 * 2**22; the caller then runs the scalar pass). */
static int ne_wtab_fill(const ne_taps *t, int32_t out_w, int16_t *wt) {
    const int32_t np = (t->ksize + 1) / 2;
    for (int32_t xx = 0; xx < out_w; xx++) {
        const int32_t *k = t->weight + (size_t)xx * (size_t)t->ksize;
        const int32_t n = t->count[xx];
        for (int32_t j = 0; j < np; j++) {
            int16_t *e = wt + ((size_t)xx * (size_t)np + (size_t)j) * 16;
            int32_t hi[2], lo[2];
            if (ne_split_pair(k, n, j, hi, lo)) {
                return -1;
            }
            for (int c = 0; c < 3; c++) {
                e[2 * c] = (int16_t)hi[0];
                e[2 * c + 1] = (int16_t)hi[1];
                e[8 + 2 * c] = (int16_t)lo[0];
                e[8 + 2 * c + 1] = (int16_t)lo[1];
            }
            e[6] = e[7] = e[14] = e[15] = 0;
        }
    }
    return 0;
}

#if NE_HAVE_AVX2
/* The horizontal taps for the AVX2 pass: per output pixel, per quad of taps (k0..k3), 32 int16: the high parts
 * {h0 h1 h0 h1 h0 h1 0 0 | h2 h3 h2 h3 h2 h3 0 0}, then the low parts alike (ne_split_pair; taps past the count
 * weigh 0). -1 when a high part does not fit int16. */
static int ne_wtab4_fill(const ne_taps *t, int32_t out_w, int16_t *wt) {
    const int32_t nq = (t->ksize + 3) / 4;
    for (int32_t xx = 0; xx < out_w; xx++) {
        const int32_t *k = t->weight + (size_t)xx * (size_t)t->ksize;
        const int32_t n = t->count[xx];
        for (int32_t q = 0; q < nq; q++) {
            int16_t *e = wt + ((size_t)xx * (size_t)nq + (size_t)q) * 32;
            for (int half = 0; half < 2; half++) {
                int32_t hi[2], lo[2];
                if (ne_split_pair(k, n, 2 * q + half, hi, lo)) {
                    return -1;
                }
                int16_t *h = e + 8 * half, *l = e + 16 + 8 * half;
                for (int c = 0; c < 3; c++) {
                    h[2 * c] = (int16_t)hi[0];
                    h[2 * c + 1] = (int16_t)hi[1];
                    l[2 * c] = (int16_t)lo[0];
                    l[2 * c + 1] = (int16_t)lo[1];
                }
                h[6] = h[7] = l[6] = l[7] = 0;
            }
        }
    }
    return 0;
}
#endif

/* 8 bytes of a row from p[b]: one load where 8 bytes remain before the row's end (avail bytes from p), else a
 * copy of what remains (the taps themselves always lie inside the row). */
static inline __m128i ne_load8(const uint8_t *p, size_t b, size_t avail) {
    if (b + 8 <= avail) {
        return _mm_loadl_epi64((const __m128i *)(const void *)(p + b));
    }
    uint64_t u = 0;
    memcpy(&u, p + b, avail - b < 6 ? avail - b : 6);
    return _mm_loadl_epi64((const __m128i *)(const void *)&u);
}

/* pixels x, x+1 (r0 g0 b0 r1 g1 b1 from 8 loaded bytes) as int16 pairs r0 r1 g0 g1 b0 b1 . . */
static inline __m128i ne_pairs(__m128i v, __m128i zero) {
    const __m128i v16 = _mm_unpacklo_epi8(v, zero);
    return _mm_unpacklo_epi16(v16, _mm_srli_si128(v16, 6));
}

/* Pillow's clip8 of four int32 sums: (sum >> 22) saturated to int16, then to uint8 (floor, then [0, 255]) */
static inline uint32_t ne_clip8x4(__m128i ah, __m128i al, __m128i bias) {
    const __m128i s = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32(ah, 11), al), bias);
    const __m128i q = _mm_packs_epi32(_mm_srai_epi32(s, NE_PRECISION_BITS), _mm_setzero_si128());
    return (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(q, q));
}

/* Horizontal pass with SSE2: two taps x three channels per pair of _mm_madd_epi16 (high and low weight parts),
 * two rows per weight load, sum = (high << 11) + low + 2**21 in int32 lanes. All lane operations are modulo
 * 2**32 and Pillow's sum fits int32, so the result is Pillow's integer exactly. */
static void ne_pass_h_sse2(const uint8_t *src, size_t sstride, int32_t rows, const ne_taps *t, int32_t out_w,
                           uint8_t *dst, size_t dstride, const int16_t *wt, size_t row_bytes) {
    const int32_t np = (t->ksize + 1) / 2;
    const __m128i zero = _mm_setzero_si128(), bias = _mm_set1_epi32(1 << (NE_PRECISION_BITS - 1));
    for (int32_t y = 0; y < rows; y += 2) {
        const int two = y + 1 < rows;
        const uint8_t *sa = src + (size_t)y * sstride, *sb = two ? sa + sstride : sa;
        uint8_t *da = dst + (size_t)y * dstride, *db = two ? da + dstride : da;
        for (int32_t xx = 0; xx < out_w; xx++) {
            const size_t off = (size_t)t->first[xx] * 3, avail = row_bytes - off;
            const uint8_t *pa = sa + off, *pb = sb + off;
            const int16_t *e = wt + (size_t)xx * (size_t)np * 16;
            const int32_t pairs = (t->count[xx] + 1) / 2;
            __m128i aha = zero, ala = zero, ahb = zero, alb = zero;
            /* pairs whose 8-byte loads stay inside the row take the plain loop, the rest ne_load8 */
            const int32_t fast = avail >= 8 ? (int32_t)((avail - 8) / 6 + 1) : 0;
            int32_t j = 0;
            for (; j < pairs && j < fast; j++, e += 16) {
                const size_t b = (size_t)j * 6;
                const __m128i va = ne_pairs(_mm_loadl_epi64((const __m128i *)(const void *)(pa + b)), zero);
                const __m128i vb = ne_pairs(_mm_loadl_epi64((const __m128i *)(const void *)(pb + b)), zero);
                const __m128i wh = _mm_loadu_si128((const __m128i *)(const void *)e);
                const __m128i wl = _mm_loadu_si128((const __m128i *)(const void *)(e + 8));
                aha = _mm_add_epi32(aha, _mm_madd_epi16(va, wh));
                ala = _mm_add_epi32(ala, _mm_madd_epi16(va, wl));
                ahb = _mm_add_epi32(ahb, _mm_madd_epi16(vb, wh));
                alb = _mm_add_epi32(alb, _mm_madd_epi16(vb, wl));
            }
            for (; j < pairs; j++, e += 16) {
                const size_t b = (size_t)j * 6;
                const __m128i va = ne_pairs(ne_load8(pa, b, avail), zero);
                const __m128i vb = ne_pairs(ne_load8(pb, b, avail), zero);
                const __m128i wh = _mm_loadu_si128((const __m128i *)(const void *)e);
                const __m128i wl = _mm_loadu_si128((const __m128i *)(const void *)(e + 8));
                aha = _mm_add_epi32(aha, _mm_madd_epi16(va, wh));
                ala = _mm_add_epi32(ala, _mm_madd_epi16(va, wl));
                ahb = _mm_add_epi32(ahb, _mm_madd_epi16(vb, wh));
                alb = _mm_add_epi32(alb, _mm_madd_epi16(vb, wl));
            }
            const uint32_t qa = ne_clip8x4(aha, ala, bias);
            memcpy(da + 3 * xx, &qa, 3); /* little-endian lanes: r, g, b */
            if (two) {
                const uint32_t qb = ne_clip8x4(ahb, alb, bias);
                memcpy(db + 3 * xx, &qb, 3);
            }
        }
    }
}
#endif

#if NE_SSE2
/* The vertical taps for _mm_madd_epi16, per output row and pair of taps (k0, k1): two int32 holding the int16
 * pairs {h0, h1} and {l0, l1} (k = h * 2048 + l as in ne_wtab_fill; an odd last tap pairs with 0). -1 when a
 * high part does not fit int16. */
static int ne_vtab_fill(const ne_taps *t, int32_t out_h, int32_t *vt) {
    const int32_t np = (t->ksize + 1) / 2;
    for (int32_t yy = 0; yy < out_h; yy++) {
        const int32_t *k = t->weight + (size_t)yy * (size_t)t->ksize;
        const int32_t n = t->count[yy];
        for (int32_t j = 0; j < np; j++) {
            int32_t hi[2], lo[2];
            if (ne_split_pair(k, n, j, hi, lo)) {
                return -1;
            }
            const uint32_t h0 = (uint16_t)(int16_t)hi[0], h1 = (uint16_t)(int16_t)hi[1];
            int32_t *e = vt + ((size_t)yy * (size_t)np + (size_t)j) * 2;
            e[0] = ne_i32(h0 | h1 << 16);
            e[1] = ne_i32((uint32_t)lo[0] | (uint32_t)lo[1] << 16);
        }
    }
    return 0;
}

/* Vertical pass with SSE2: eight columns at a time, two source rows (taps) per pair of _mm_madd_epi16 (high and
 * low weight parts), the sums in registers; clip8 as (sum >> 22) saturated to int16 then to uint8, which is
 * Pillow's floor-and-clip. Loads stay inside each row (x + 8 <= cols); the last cols % 8 columns run scalar. */
static void ne_pass_v_sse2(const uint8_t *src, size_t sstride, size_t cols, const ne_taps *t, int32_t out_h,
                           uint8_t *dst, size_t dstride, const int32_t *vt) {
    const int32_t np = (t->ksize + 1) / 2, bias = 1 << (NE_PRECISION_BITS - 1);
    const __m128i zero = _mm_setzero_si128(), vbias = _mm_set1_epi32(bias);
    for (int32_t yy = 0; yy < out_h; yy++) {
        const uint8_t *base = src + (size_t)t->first[yy] * sstride;
        const int32_t n = t->count[yy], pairs = (n + 1) / 2;
        const int32_t *e0 = vt + (size_t)yy * (size_t)np * 2;
        uint8_t *d = dst + (size_t)yy * dstride;
        size_t x = 0;
        for (; x + 8 <= cols; x += 8) {
            __m128i ah0 = zero, ah1 = zero, al0 = zero, al1 = zero;
            const int32_t *e = e0;
            for (int32_t j = 0; j < pairs; j++, e += 2) {
                const uint8_t *ra = base + (size_t)(2 * j) * sstride;
                const uint8_t *rb = 2 * j + 1 < n ? ra + sstride : ra; /* odd last tap: weight 0 on a re-read */
                const __m128i a = _mm_loadl_epi64((const __m128i *)(const void *)(ra + x));
                const __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)(rb + x));
                const __m128i ab = _mm_unpacklo_epi8(a, b); /* a0 b0 a1 b1 ... a7 b7 */
                const __m128i lo16 = _mm_unpacklo_epi8(ab, zero), hi16 = _mm_unpackhi_epi8(ab, zero);
                const __m128i wh = _mm_set1_epi32(e[0]), wl = _mm_set1_epi32(e[1]);
                ah0 = _mm_add_epi32(ah0, _mm_madd_epi16(lo16, wh));
                ah1 = _mm_add_epi32(ah1, _mm_madd_epi16(hi16, wh));
                al0 = _mm_add_epi32(al0, _mm_madd_epi16(lo16, wl));
                al1 = _mm_add_epi32(al1, _mm_madd_epi16(hi16, wl));
            }
            const __m128i s0 = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32(ah0, 11), al0), vbias);
            const __m128i s1 = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32(ah1, 11), al1), vbias);
            const __m128i q = _mm_packs_epi32(_mm_srai_epi32(s0, NE_PRECISION_BITS), _mm_srai_epi32(s1, NE_PRECISION_BITS));
            _mm_storel_epi64((__m128i *)(void *)(d + x), _mm_packus_epi16(q, q));
        }
        const int32_t *k = t->weight + (size_t)yy * (size_t)t->ksize;
        for (; x < cols; x++) {
            int32_t acc = bias;
            for (int32_t y = 0; y < n; y++) {
                acc += base[(size_t)y * sstride + x] * k[y];
            }
            d[x] = ne_clip8(acc);
        }
    }
}
#endif

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
        ne_pass_h_sse2(src, sstride, rows, t, out_w, dst, dstride, wt, row_bytes);
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
        ne_pass_v_sse2(src, sstride, cols, t, out_h, dst, dstride, vt);
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
        if (vt && ne_vtab_fill(&tv, oh, vt) != 0) {
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
        if (wt && path == NE_PATH_AVX2 && ne_wtab4_fill(&th, ow, wt) != 0) {
            free(wt);
            wt = NULL;
        }
#endif
        if (wt && path == NE_PATH_SSE2 && ne_wtab_fill(&th, ow, wt) != 0) {
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
