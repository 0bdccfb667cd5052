/* resample.h — libnora_edge's Pillow-exact bicubic resize (internal; resample.c). */
#ifndef NORA_EDGE_RESAMPLE_H
#define NORA_EDGE_RESAMPLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Pillow 13's pass order: vertical first when the height shrinks by more than twice what the width does
 * (nora_edge.preprocess.vertical_first). */
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
