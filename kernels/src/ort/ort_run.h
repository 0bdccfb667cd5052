/* ort_run.h: onnxruntime's C API from libnora_edge, with the library loaded at run time (internal header).
 *
 * Data flow: nora_ort_open (dlopen the given libonnxruntime, OrtGetApiBase()->GetApi(ORT_API_VERSION), one
 * OrtEnv) -> nora_graph_open (one session per graph, intra-op threads, full graph optimization) ->
 * nora_graph_run: caller-owned host buffers wrapped as OrtValues without a copy and bound through an
 * OrtIoBinding, inputs and outputs alike; an output bound to the memory of an input is written in place
 * (the fused decoder's GroupQueryAttention KV buffers), so a decode step copies no cache.
 *
 * Errors: functions return 0 or -1 and write a message (naming the onnxruntime call) into err[errlen].
 */
#ifndef NORA_ORT_RUN_H
#define NORA_ORT_RUN_H

#include <stddef.h>
#include <stdint.h>

typedef struct nora_ort nora_ort;
typedef struct nora_graph nora_graph;

/* A tensor in caller-owned host memory: `elem` is an ONNXTensorElementDataType (1 float, 7 int64). */
typedef struct nora_tensor {
    const char *name;
    void *data;
    int elem;
    const int64_t *shape;
    size_t ndim;
} nora_tensor;

int nora_ort_open(const char *lib_path, nora_ort **out, char *err, size_t errlen);
void nora_ort_close(nora_ort *ort);
/* The onnxruntime version string of the loaded library. */
const char *nora_ort_version(const nora_ort *ort);

/* Whether the loaded library offers an execution provider by onnxruntime's name (e.g. "CUDAExecutionProvider");
 * the names it offers, comma-separated, into list (may be NULL). 1 / 0; -1 when the library cannot say. */
int nora_ort_has_provider(nora_ort *ort, const char *name, char *list, size_t listlen);

/* Where a graph runs. provider: NORA_ORT_CPU; NORA_ORT_CUDA (onnxruntime's CUDA EP on device_id; nodes it lacks
 * fall back to the CPU); NORA_ORT_TENSORRT (TensorRT EP first, then CUDA for the nodes TensorRT rejects, then CPU:
 * onnxruntime's documented order; trt_cache_dir, when set, keeps built engines across runs). */
enum { NORA_ORT_CPU = 0, NORA_ORT_CUDA = 1, NORA_ORT_TENSORRT = 2 };
typedef struct nora_graph_options {
    int threads;
    int provider;
    int device_id;
    const char *trt_cache_dir;
    int trt_fp16;
} nora_graph_options;

/* nora_graph_open on the CPU with `threads` intra-op threads. */
int nora_graph_open(nora_ort *ort, const char *onnx_path, int threads, nora_graph **out, char *err, size_t errlen);
int nora_graph_open_ex(nora_ort *ort, const char *onnx_path, const nora_graph_options *opt, nora_graph **out,
                       char *err, size_t errlen);
void nora_graph_close(nora_graph *g);
int nora_graph_run(nora_graph *g, const nora_tensor *in, size_t nin, const nora_tensor *out, size_t nout, char *err,
                   size_t errlen);

/* A persistent binding (the per-token path): values wrap caller memory once (nora_value_create); binding a value
 * by name replaces the previous one for that name; run allocates nothing in this layer (onnxruntime's Run uses its
 * own arena). Values must outlive the bindings that hold them. */
typedef struct nora_value nora_value;
typedef struct nora_binding nora_binding;
int nora_value_create(nora_ort *ort, const nora_tensor *t, nora_value **out, char *err, size_t errlen);
void nora_value_free(nora_value *v);
int nora_binding_create(nora_graph *g, nora_binding **out, char *err, size_t errlen);
void nora_binding_free(nora_binding *b);
int nora_binding_input(nora_binding *b, const char *name, const nora_value *v, char *err, size_t errlen);
int nora_binding_output(nora_binding *b, const char *name, const nora_value *v, char *err, size_t errlen);
int nora_binding_run(nora_binding *b, char *err, size_t errlen);

#endif
