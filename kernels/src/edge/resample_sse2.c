/* resample_sse2.c — the SSE2 passes of the Pillow-exact bicubic resize (see resample.c for the scheme): the weight
 * tables (each int32 tap k split as k = h * 2048 + l into int16 halves for _mm_madd_epi16; also the AVX2 path's
 * quad table) and the horizontal / vertical passes. Compiled to nothing without SSE2 (non-x86, NORA_EDGE_NO_SIMD).
 */
#include "resample_impl.h"

#include <stdint.h>
#include <string.h>

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
int nora_edge_priv_wtab_fill(const ne_taps *t, int32_t out_w, int16_t *wt) {
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
int nora_edge_priv_wtab4_fill(const ne_taps *t, int32_t out_w, int16_t *wt) {
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
void nora_edge_priv_pass_h_sse2(const uint8_t *src, size_t sstride, int32_t rows, const ne_taps *t, int32_t out_w,
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
int nora_edge_priv_vtab_fill(const ne_taps *t, int32_t out_h, int32_t *vt) {
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
void nora_edge_priv_pass_v_sse2(const uint8_t *src, size_t sstride, size_t cols, const ne_taps *t, int32_t out_h,
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
