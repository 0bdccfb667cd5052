/* resample_impl.h — internals shared by resample.c, resample_sse2.c (and the AVX2 table it builds): the tap
 * tables, Pillow's fixed point, the SSE2 switch and the SSE2 passes. Not part of any ABI. */
#ifndef NORA_EDGE_RESAMPLE_IMPL_H
#define NORA_EDGE_RESAMPLE_IMPL_H

#include <float.h>
#include <stddef.h>
#include <stdint.h>

#include "resample.h"

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

/* One axis's taps (Pillow's bounds + fixed-point kk): output i reads count[i] inputs from first[i]. */
typedef struct ne_taps {
    int32_t ksize;
    int32_t *first;  /* (out,) */
    int32_t *count;  /* (out,) */
    int32_t *weight; /* (out, ksize), units of 2**-22 */
} ne_taps;

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

#if NE_SSE2
/* Weight tables (-1 when a tap's high part does not fit int16: never for bicubic weights; the caller then runs
 * the scalar passes): wt per output pixel, per pair of taps, 16 int16 {h0 h1 h0 h1 h0 h1 0 0, l0 l1 ...};
 * vt per output row, per pair of taps, the int32s {h0|h1<<16, l0|l1<<16}. */
int nora_edge_priv_wtab_fill(const ne_taps *t, int32_t out_w, int16_t *wt);
int nora_edge_priv_vtab_fill(const ne_taps *t, int32_t out_h, int32_t *vt);
#if NE_HAVE_AVX2
/* The AVX2 horizontal table: per output pixel, per quad of taps, 32 int16 (two wt pairs per 128-bit lane). */
int nora_edge_priv_wtab4_fill(const ne_taps *t, int32_t out_w, int16_t *wt);
#endif
/* Horizontal pass: src (rows, in_w, 3) -> dst (rows, out_w, 3), two rows per weight load. */
void nora_edge_priv_pass_h_sse2(const uint8_t *src, size_t sstride, int32_t rows, const ne_taps *t, int32_t out_w,
                                uint8_t *dst, size_t dstride, const int16_t *wt, size_t row_bytes);
/* Vertical pass: eight columns at a time, the last cols % 8 scalar. */
void nora_edge_priv_pass_v_sse2(const uint8_t *src, size_t sstride, size_t cols, const ne_taps *t, int32_t out_h,
                                uint8_t *dst, size_t dstride, const int32_t *vt);
#endif

#endif /* NORA_EDGE_RESAMPLE_IMPL_H */
