/* nora_edge.h: libnora_edge, NORA's runtime for firmware (C ABI over C/C++ inside; no Python).
 *
 * Data flow (one chunk):
 *   RGB frame (H, W, 3) uint8 --nora_edge_preprocess (Pillow-exact bicubic to the bundle's size, rescale,
 *   CLIP normalize, patchify)--> pixel_values (patches, 3*2*14*14) float32 --vision graph--> image embeddings
 *   instruction (UTF-8) --byte-level BPE (the bundle's tokenizer.json)--> prompt ids with image pads
 *   --decoder graph (onnxruntime C API, loaded at run time; the constant prompt prefix prefilled once)-->
 *   constrained greedy loop through libnora_fast (nora_fast.h) --> (T, D) float64 actions + token classes.
 *
 * Version: NORA_EDGE_ABI_MAJOR.NORA_EDGE_ABI_MINOR. A minor bump only adds functions or option fields at the
 * end of a struct (callers set .struct_size); a major bump breaks the ABI.
 *
 * Errors: every call returns a nora_edge_status; NORA_EDGE_OK is 0. The message of the last failure on the
 * calling thread is nora_edge_last_error() (valid until the thread's next call). A failed call leaves a policy
 * usable and never returns an action the model did not produce.
 */
#ifndef NORA_EDGE_H
#define NORA_EDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NORA_EDGE_ABI_MAJOR 0
#define NORA_EDGE_ABI_MINOR 1

#if defined(__GNUC__)
#define NORA_EDGE_API __attribute__((visibility("default")))
#else
#define NORA_EDGE_API
#endif

/* Status codes. They mirror the Python runtime's exceptions (nora_edge/errors.py). */
typedef enum nora_edge_status {
    NORA_EDGE_OK = 0,
    NORA_EDGE_ERR_INPUT = 1,          /* InputError: NULL pointer, bad size, empty instruction, unknown key */
    NORA_EDGE_ERR_BUNDLE = 2,         /* BundleError: missing / corrupt / tampered bundle file, bad manifest */
    NORA_EDGE_ERR_DETOKENIZE = 3,     /* DetokenizationError: the chunk's tokens do not decode */
    NORA_EDGE_ERR_FORCED = 4,         /* ForcedTokenError: the chunk needed forced tokens the options forbid */
    NORA_EDGE_ERR_UNSUPPORTED = 5,    /* a character or feature this build cannot handle exactly */
    NORA_EDGE_ERR_RUNTIME = 6,        /* onnxruntime or the system failed (message names the call) */
    NORA_EDGE_ERR_NOMEM = 7,          /* allocation failed */
} nora_edge_status;

/* The message of the calling thread's last failed call ("" if none). */
NORA_EDGE_API const char *nora_edge_last_error(void);

/* ---------------------------------------------------------------- preprocessing (no onnxruntime needed) */

/* Image preprocessing parameters, as the bundle manifest's "image" section gives them. */
typedef struct nora_edge_image_spec {
    int32_t height, width;            /* resize target (224, 224), multiples of patch_size * merge_size */
    int32_t patch_size;               /* 14 */
    int32_t temporal_patch_size;      /* 2 */
    int32_t merge_size;               /* 2 */
    float mean[3], std[3];            /* CLIP mean / std */
} nora_edge_image_spec;

/* Number of float32 values nora_edge_preprocess writes for a spec: (t*gh*gw) * (3*tp*p*p); 0 on a bad spec. */
NORA_EDGE_API size_t nora_edge_pixel_values_size(const nora_edge_image_spec *spec);

/* RGB frame (height, width, 3) uint8, row stride `stride` bytes (>= width*3) -> pixel_values float32, in the
 * exact order and rounding of the Python runtime (nora_edge/preprocess.py; bit-exact with Pillow's bicubic
 * resize and Qwen2VLImageProcessor). `out_len` is the capacity of `out` in floats. grid_thw (3,) may be NULL. */
NORA_EDGE_API nora_edge_status nora_edge_preprocess(const uint8_t *rgb, int32_t height, int32_t width,
                                                   size_t stride, const nora_edge_image_spec *spec,
                                                   float *out, size_t out_len, int64_t grid_thw[3]);

#ifdef __cplusplus
}
#endif

#endif /* NORA_EDGE_H */
