/* resample_avx2.c — the AVX2 passes of resample.c's Pillow-exact bicubic resize (see resample.h), compiled with
 * __attribute__((target("avx2"))) only, so the library keeps running on SSE2-only x86-64 CPUs: resample.c calls
 * them only when nora_edge_priv_avx2_usable() (GCC/clang __builtin_cpu_supports("avx2")) says so.
 *
 * Data flow (same integers as resample.c's SSE2 passes, twice the lanes):
 *   horizontal: per output pixel, per quad of taps, 16 source bytes broadcast to both 128-bit lanes and
 *     _mm256_shuffle_epi8'd to int16 pairs {r0 r1 g0 g1 b0 b1 0 0 | r2 r3 g2 g3 b2 b3 0 0}; _mm256_madd_epi16 with
 *     the weights' high and low int16 parts (k = h * 2048 + l, l in [0, 2048): resample.c's ne_split_pair); two
 *     rows per weight load; the two lanes added at the end; sum = (high << 11) + low + 2**21.
 *   vertical: 16 columns x two source rows per pair of _mm256_madd_epi16 (high, low parts), sums in registers.
 * All lane arithmetic is modulo 2**32 and Pillow's int32 sum fits int32, so the wrapped result is Pillow's sum;
 * clip8 = (sum >> 22) saturated to int16 then uint8 (floor, then [0, 255]), as Pillow's clip8.
 * Intel intrinsics: https://www.intel.com/content/www/us/en/docs/intrinsics-guide/index.html
 * Pillow: src/libImaging/Resample.c (ImagingResampleHorizontal_8bpc / ImagingResampleVertical_8bpc).
 */
#include "resample.h"

#include <string.h>

#if NE_HAVE_AVX2
#include <immintrin.h>

#define NE_PRECISION_BITS 22

int nora_edge_priv_avx2_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
}

/* 12 bytes of a row from p (avail bytes readable from p, >= 1) in a 16-byte vector: one load when 16 bytes
 * remain, else a copy of what remains (zero-filled; those bytes meet weight 0 or lie past the taps). */
__attribute__((target("avx2"))) static inline __m256i ne_quad(const uint8_t *p, size_t avail, __m256i ctl) {
    __m128i v;
    if (avail >= 16) {
        v = _mm_loadu_si128((const __m128i *)(const void *)p);
    } else {
        uint8_t b[16] = {0};
        memcpy(b, p, avail < 12 ? avail : 12);
        v = _mm_loadu_si128((const __m128i *)(const void *)b);
    }
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), ctl);
}

/* clip8 of two rows' r, g, b sums (high and low parts per row): both lanes of each row added, bias, floor
 * >> 22, [0, 255]; row a's bytes in *ra, row b's in *rb (little-endian: r, g, b, 0) */
__attribute__((target("avx2"))) static inline void ne_clip8_rgb2(__m256i ah, __m256i al, __m256i bh, __m256i bl,
                                                                 __m256i bias, uint32_t *ra, uint32_t *rb) {
    const __m256i sa = _mm256_add_epi32(_mm256_slli_epi32(ah, 11), al);
    const __m256i sb = _mm256_add_epi32(_mm256_slli_epi32(bh, 11), bl);
    const __m256i t = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_permute2x128_si256(sa, sb, 0x20), _mm256_permute2x128_si256(sa, sb, 0x31)), bias);
    const __m256i q = _mm256_packs_epi32(_mm256_srai_epi32(t, NE_PRECISION_BITS), _mm256_setzero_si256());
    const __m256i u = _mm256_packus_epi16(q, q); /* row a: bytes 0..2, row b: bytes 16..18 */
    *ra = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(u));
    *rb = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(u, 1));
}

__attribute__((target("avx2"))) void nora_edge_priv_pass_h_avx2(const uint8_t *src, size_t sstride, int32_t rows,
                                                                const int32_t *first, const int32_t *count,
                                                                int32_t nq, int32_t out_w, uint8_t *dst,
                                                                size_t dstride, const int16_t *wt, size_t row_bytes) {
    /* lane 0: pixels 0, 1 as r0 r1 g0 g1 b0 b1 0 0 (int16); lane 1: pixels 2, 3 (bytes 6..11) */
    const __m256i ctl = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                         6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
    const __m256i bias = _mm256_set1_epi32(1 << (NE_PRECISION_BITS - 1));
    for (int32_t y = 0; y < rows; y += 2) {
        const int two = y + 1 < rows;
        const uint8_t *sa = src + (size_t)y * sstride, *sb = two ? sa + sstride : sa;
        uint8_t *da = dst + (size_t)y * dstride, *db = two ? da + dstride : da;
        for (int32_t xx = 0; xx < out_w; xx++) {
            const size_t off = (size_t)first[xx] * 3, avail = row_bytes - off;
            const uint8_t *pa = sa + off, *pb = sb + off;
            const int16_t *e = wt + (size_t)xx * (size_t)nq * 32;
            const int32_t quads = (count[xx] + 3) / 4;
            __m256i aha = _mm256_setzero_si256(), ala = aha, ahb = aha, alb = aha;
            /* quads whose 16-byte loads stay inside the row: 12 q + 16 <= avail */
            const int32_t fast = avail >= 16 ? (int32_t)((avail - 16) / 12 + 1) : 0;
            int32_t q = 0;
            for (; q < quads && q < fast; q++, e += 32) {
                const size_t b = (size_t)q * 12;
                const __m256i va = _mm256_shuffle_epi8(
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(pa + b))), ctl);
                const __m256i vb = _mm256_shuffle_epi8(
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(pb + b))), ctl);
                const __m256i wh = _mm256_loadu_si256((const __m256i *)(const void *)e);
                const __m256i wl = _mm256_loadu_si256((const __m256i *)(const void *)(e + 16));
                aha = _mm256_add_epi32(aha, _mm256_madd_epi16(va, wh));
                ala = _mm256_add_epi32(ala, _mm256_madd_epi16(va, wl));
                ahb = _mm256_add_epi32(ahb, _mm256_madd_epi16(vb, wh));
                alb = _mm256_add_epi32(alb, _mm256_madd_epi16(vb, wl));
            }
            for (; q < quads; q++, e += 32) {
                const size_t b = (size_t)q * 12;
                const __m256i va = ne_quad(pa + b, avail - b, ctl), vb = ne_quad(pb + b, avail - b, ctl);
                const __m256i wh = _mm256_loadu_si256((const __m256i *)(const void *)e);
                const __m256i wl = _mm256_loadu_si256((const __m256i *)(const void *)(e + 16));
                aha = _mm256_add_epi32(aha, _mm256_madd_epi16(va, wh));
                ala = _mm256_add_epi32(ala, _mm256_madd_epi16(va, wl));
                ahb = _mm256_add_epi32(ahb, _mm256_madd_epi16(vb, wh));
                alb = _mm256_add_epi32(alb, _mm256_madd_epi16(vb, wl));
            }
            uint32_t ra, rb;
            ne_clip8_rgb2(aha, ala, ahb, alb, bias, &ra, &rb);
            memcpy(da + 3 * xx, &ra, 3); /* little-endian lanes: r, g, b */
            if (two) {
                memcpy(db + 3 * xx, &rb, 3);
            }
        }
    }
}

__attribute__((target("avx2"))) void nora_edge_priv_pass_v_avx2(const uint8_t *src, size_t sstride, size_t cols,
                                                                const int32_t *first, const int32_t *count,
                                                                const int32_t *weight, int32_t ksize, int32_t out_h,
                                                                uint8_t *dst, size_t dstride, const int32_t *vt) {
    const int32_t np = (ksize + 1) / 2, bias = 1 << (NE_PRECISION_BITS - 1);
    const __m256i vbias = _mm256_set1_epi32(bias);
    for (int32_t yy = 0; yy < out_h; yy++) {
        const uint8_t *base = src + (size_t)first[yy] * sstride;
        const int32_t n = count[yy], pairs = (n + 1) / 2;
        const int32_t *e0 = vt + (size_t)yy * (size_t)np * 2;
        uint8_t *d = dst + (size_t)yy * dstride;
        size_t x = 0;
        for (; x + 16 <= cols; x += 16) {
            __m256i ah0 = _mm256_setzero_si256(), ah1 = ah0, al0 = ah0, al1 = ah0;
            const int32_t *e = e0;
            for (int32_t j = 0; j < pairs; j++, e += 2) {
                const uint8_t *ra = base + (size_t)(2 * j) * sstride;
                const uint8_t *rb = 2 * j + 1 < n ? ra + sstride : ra; /* odd last tap: weight 0 on a re-read */
                const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(ra + x));
                const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(rb + x));
                const __m256i lo16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)); /* a0 b0 .. a7 b7 */
                const __m256i hi16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)); /* a8 b8 .. a15 b15 */
                const __m256i wh = _mm256_set1_epi32(e[0]), wl = _mm256_set1_epi32(e[1]);
                ah0 = _mm256_add_epi32(ah0, _mm256_madd_epi16(lo16, wh));
                ah1 = _mm256_add_epi32(ah1, _mm256_madd_epi16(hi16, wh));
                al0 = _mm256_add_epi32(al0, _mm256_madd_epi16(lo16, wl));
                al1 = _mm256_add_epi32(al1, _mm256_madd_epi16(hi16, wl));
            }
            const __m256i s0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(ah0, 11), al0), vbias);
            const __m256i s1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(ah1, 11), al1), vbias);
            /* packs works per 128-bit lane: quads s0[0..3] s1[0..3] | s0[4..7] s1[4..7] -> reorder 0 2 1 3 */
            const __m256i q = _mm256_permute4x64_epi64(
                _mm256_packs_epi32(_mm256_srai_epi32(s0, NE_PRECISION_BITS), _mm256_srai_epi32(s1, NE_PRECISION_BITS)),
                0xD8);
            _mm_storeu_si128((__m128i *)(void *)(d + x),
                             _mm_packus_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        const int32_t *k = weight + (size_t)yy * (size_t)ksize;
        for (; x < cols; x++) { /* the last cols % 16 columns: Pillow's scalar loop */
            int32_t acc = bias;
            for (int32_t y = 0; y < n; y++) {
                acc += base[(size_t)y * sstride + x] * k[y];
            }
            d[x] = acc <= 0 ? 0 : (acc >> NE_PRECISION_BITS) > 255 ? 255 : (uint8_t)(acc >> NE_PRECISION_BITS);
        }
    }
}
#else
typedef int ne_avx2_unused; /* ISO C: no empty translation unit */
#endif
