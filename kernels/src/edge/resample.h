/* resample.h — libnora_edge's Pillow-exact bicubic resize (internal; resample.c, resample_avx2.c).
 *
 * Paths, all bit-exact with Pillow (the same integers): "avx2" (resample_avx2.c, x86-64 with GCC/clang, chosen
 * at run time when the CPU has AVX2), "sse2" (every x86-64), "none" (the portable loops: non-x86 targets such
 * as Jetson's aarch64). The best one the build and CPU allow runs unless, read once at the first resize:
 *   NORA_EDGE_SIMD=avx2|sse2|none   asks for a path; one the build or CPU lacks falls back to the next best
 *                                   (avx2 -> sse2 -> none); any other value is ignored.
 * Build flags (EDGE_DEFS): -DNORA_EDGE_NO_AVX2 leaves the AVX2 path out; -DNORA_EDGE_NO_SIMD leaves out both. */
#ifndef NORA_EDGE_RESAMPLE_H
#define NORA_EDGE_RESAMPLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Pillow 13's pass order: vertical first when the height shrinks by more than twice what the width does
 * (nora_edge.preprocess.vertical_first). */
/* The AVX2 path is compiled (x86 + GCC/clang, no NORA_EDGE_NO_SIMD / NORA_EDGE_NO_AVX2). */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && defined(__SSE2__) && \
    !defined(NORA_EDGE_NO_SIMD) && !defined(NORA_EDGE_NO_AVX2)
#define NE_HAVE_AVX2 1
#else
#define NE_HAVE_AVX2 0
#endif

/* The path the next resize runs: "avx2", "sse2" or "none" (NORA_EDGE_SIMD read on the first call). Exported
 * from libnora_edge_pre.so so tests can check which path they exercised. */
__attribute__((visibility("default"))) const char *nora_edge_priv_resample_path(void);

#if NE_HAVE_AVX2
/* 1 when the CPU runs AVX2 (__builtin_cpu_supports). */
int nora_edge_priv_avx2_usable(void);
/* Horizontal pass (resample.c's ne_pass_h_sse2 contract): taps first/count (out_w,), wt = per output pixel nq
 * quads of 32 int16 (high parts {h0 h1 h0 h1 h0 h1 0 0 | h2 h3 ...}, then the low parts alike). */
void nora_edge_priv_pass_h_avx2(const uint8_t *src, size_t sstride, int32_t rows, const int32_t *first,
                                const int32_t *count, int32_t nq, int32_t out_w, uint8_t *dst, size_t dstride,
                                const int16_t *wt, size_t row_bytes);
/* Vertical pass (resample.c's ne_pass_v_sse2 contract): vt = resample.c's ne_vtab_fill table, weight (out_h,
 * ksize) for the scalar tail columns. */
void nora_edge_priv_pass_v_avx2(const uint8_t *src, size_t sstride, size_t cols, const int32_t *first,
                                const int32_t *count, const int32_t *weight, int32_t ksize, int32_t out_h,
                                uint8_t *dst, size_t dstride, const int32_t *vt);
#endif

int nora_edge_priv_vertical_first(int32_t in_h, int32_t in_w, int32_t out_h, int32_t out_w);

/* Image.resize((ow, oh), BICUBIC) of src (height, width, 3) uint8 with row stride `stride` into res (oh, ow, 3),
 * packed rows. Sizes in [1, 16384] and stride >= width * 3 (the caller checks). 0 on success, -1 when scratch
 * memory could not be allocated (res then holds garbage). */
int nora_edge_priv_resize_bicubic(const uint8_t *src, int32_t height, int32_t width, size_t stride, int32_t oh,
                                  int32_t ow, uint8_t *res);

#ifdef __cplusplus
}
#endif

#endif /* NORA_EDGE_RESAMPLE_H */
