/* ort_step.c: run a fused bundle's decoder graph from C over a sequence of token chunks; print the logits.
 *
 * Usage: ort_step LIBONNXRUNTIME DECODER.onnx CASE.bin OUT.bin
 *
 * CASE.bin (little-endian): int64 header[8] = {layers, kv_heads, head_dim, hidden, slots, rows, chunks,
 * threads}; then per chunk: int64 S, float32 inputs_embeds[S * hidden], int64 position_ids[3 * S].
 * OUT.bin: float32 logits[rows] per chunk.
 *
 * The KV cache is 2 * layers buffers of (1, kv_heads, slots, head_dim) float32 allocated once and bound as both
 * past and present (GroupQueryAttention's shared-buffer mode: each chunk's rows are written in place at slots
 * L .. L+S-1, L read from attention_mask's sum); attention_mask is a prefix of one preallocated row of ones.
 * Written by tests/kernels/test_edge_ort.py, which compares OUT with the Python runtime's StaticDecoder.
 * Exit: 0 ok, 1 a run failed (message on stderr), 2 usage / file errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"
#include "ort_run.h"

enum { H_LAYERS, H_KV, H_HD, H_HIDDEN, H_SLOTS, H_ROWS, H_CHUNKS, H_THREADS, H_N };

static int read_exact(FILE *f, void *p, size_t bytes) { return fread(p, 1, bytes, f) == bytes ? 0 : -1; }

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s LIBONNXRUNTIME DECODER.onnx CASE.bin OUT.bin\n", argv[0]);
        return 2;
    }
    FILE *cf = fopen(argv[3], "rb"), *of = fopen(argv[4], "wb");
    int64_t h[H_N];
    if (!cf || !of || read_exact(cf, h, sizeof h)) {
        fprintf(stderr, "cannot read %s / write %s\n", argv[3], argv[4]);
        return 2;
    }
    for (int i = 0; i < H_N; i++)
        if (h[i] <= 0 || h[i] > (1 << 20)) {
            fprintf(stderr, "header field %d out of range: %lld\n", i, (long long)h[i]);
            return 2;
        }
    char err[1024] = "";
    nora_ort *ort = NULL;
    nora_graph *g = NULL;
    if (nora_ort_open(argv[1], &ort, err, sizeof err) ||
        nora_graph_open(ort, argv[2], (int)h[H_THREADS], &g, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        nora_ort_close(ort);
        return 1;
    }
    const size_t layers = (size_t)h[H_LAYERS], hidden = (size_t)h[H_HIDDEN], slots = (size_t)h[H_SLOTS];
    const size_t kv_floats = (size_t)(h[H_KV] * h[H_HD]) * slots;
    const size_t nt = 3 + 2 * layers;
    float *kv = calloc(2 * layers * kv_floats, sizeof(float));
    float *emb = malloc(slots * hidden * sizeof(float));
    float *logits = malloc((size_t)h[H_ROWS] * sizeof(float));
    int64_t *pos = malloc(3 * slots * sizeof(int64_t)), *mask = malloc(slots * sizeof(int64_t));
    nora_tensor *in = calloc(nt, sizeof *in), *out = calloc(1 + 2 * layers, sizeof *out);
    char(*names)[48] = calloc(4 * layers, sizeof *names);
    int rc = kv && emb && logits && pos && mask && in && out && names ? 0 : 2;
    int64_t kv_shape[4] = {1, h[H_KV], (int64_t)slots, h[H_HD]}, logit_shape[2] = {1, h[H_ROWS]};
    int64_t emb_shape[3] = {1, 0, (int64_t)hidden}, pos_shape[3] = {3, 1, 0}, mask_shape[2] = {1, 0};
    for (size_t i = 0; !rc && i < slots; i++) mask[i] = 1;
    for (size_t l = 0; !rc && l < layers; l++) {
        for (size_t k = 0; k < 2; k++) {  /* inputs 3.. past K/V; outputs 1.. present K/V on the same memory */
            size_t j = 2 * l + k;
            snprintf(names[2 * j], 48, "past_key_values.%zu.%s", l, k ? "value" : "key");
            snprintf(names[2 * j + 1], 48, "present.%zu.%s", l, k ? "value" : "key");
            in[3 + j] = (nora_tensor){names[2 * j], kv + j * kv_floats, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kv_shape, 4};
            out[1 + j] = (nora_tensor){names[2 * j + 1], kv + j * kv_floats, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                       kv_shape, 4};
        }
    }
    in[0] = (nora_tensor){"inputs_embeds", emb, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, emb_shape, 3};
    in[1] = (nora_tensor){"position_ids", pos, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, pos_shape, 3};
    in[2] = (nora_tensor){"attention_mask", mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, mask_shape, 2};
    out[0] = (nora_tensor){"logits", logits, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, logit_shape, 2};
    size_t held = 0;
    for (int64_t c = 0; !rc && c < h[H_CHUNKS]; c++) {
        int64_t s = 0;
        if (read_exact(cf, &s, sizeof s) || s <= 0 || held + (size_t)s > slots ||
            read_exact(cf, emb, (size_t)s * hidden * sizeof(float)) ||
            read_exact(cf, pos, 3 * (size_t)s * sizeof(int64_t))) {
            fprintf(stderr, "chunk %lld: bad length %lld or short file (held %zu of %zu slots)\n", (long long)c,
                    (long long)s, held, slots);
            rc = 2;
            break;
        }
        emb_shape[1] = pos_shape[2] = s;
        mask_shape[1] = (int64_t)held + s;
        if (nora_graph_run(g, in, nt, out, 1 + 2 * layers, err, sizeof err)) {
            fprintf(stderr, "chunk %lld: %s\n", (long long)c, err);
            rc = 1;
            break;
        }
        held += (size_t)s;
        if (fwrite(logits, sizeof(float), (size_t)h[H_ROWS], of) != (size_t)h[H_ROWS]) rc = 2;
    }
    fprintf(stderr, "onnxruntime %s: %lld chunks, %zu tokens\n", nora_ort_version(ort), (long long)h[H_CHUNKS], held);
    free(kv), free(emb), free(logits), free(pos), free(mask), free(in), free(out), free(names);
    nora_graph_close(g);
    nora_ort_close(ort);
    fclose(cf);
    if (fclose(of)) rc = 2;
    return rc;
}
