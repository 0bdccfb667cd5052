/* ort_run.c: see ort_run.h. The onnxruntime C API reference: onnxruntime_c_api.h (OrtApi), onnxruntime.ai/docs/api/c/. */
#define _GNU_SOURCE
#include "ort_run.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

struct nora_ort {
    void *lib;
    const OrtApi *api;
    OrtEnv *env;
    OrtMemoryInfo *cpu;
    const char *version;
};

struct nora_graph {
    nora_ort *ort;
    OrtSession *session;
    OrtRunOptions *run;
};

static void fail(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

/* 0 if `st` is NULL (success), else -1 with "<what>: <onnxruntime's message>". */
static int check(const OrtApi *api, OrtStatus *st, const char *what, char *err, size_t n) {
    if (!st) return 0;
    fail(err, n, "onnxruntime %s: %s", what, api->GetErrorMessage(st));
    api->ReleaseStatus(st);
    return -1;
}

int nora_ort_open(const char *lib_path, nora_ort **out, char *err, size_t errlen) {
    if (!out) {
        fail(err, errlen, "nora_ort_open: out is NULL");
        return -1;
    }
    *out = NULL;
    const char *path = lib_path && *lib_path ? lib_path : "libonnxruntime.so.1";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fail(err, errlen, "cannot load onnxruntime from '%s': %s", path, dlerror());
        return -1;
    }
    const OrtApiBase *(*get_base)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
    const OrtApiBase *base = get_base ? get_base() : NULL;
    const OrtApi *api = base ? base->GetApi(ORT_API_VERSION) : NULL;
    if (!api) {
        fail(err, errlen, "'%s' does not serve the onnxruntime C API version %d (library version %s)", path,
             ORT_API_VERSION, base ? base->GetVersionString() : "unknown");
        dlclose(lib);
        return -1;
    }
    nora_ort *o = calloc(1, sizeof *o);
    if (!o) {
        fail(err, errlen, "out of memory");
        dlclose(lib);
        return -1;
    }
    o->lib = lib;
    o->api = api;
    o->version = base->GetVersionString();
    if (check(api, api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "nora-edge", &o->env), "CreateEnv", err, errlen) ||
        check(api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &o->cpu), "CreateCpuMemoryInfo",
              err, errlen)) {
        nora_ort_close(o);
        return -1;
    }
    *out = o;
    return 0;
}

void nora_ort_close(nora_ort *o) {
    if (!o) return;
    if (o->cpu) o->api->ReleaseMemoryInfo(o->cpu);
    if (o->env) o->api->ReleaseEnv(o->env);
    dlclose(o->lib);
    free(o);
}

const char *nora_ort_version(const nora_ort *o) { return o ? o->version : ""; }

int nora_ort_has_provider(nora_ort *o, const char *name, char *list, size_t listlen) {
    if (list && listlen) list[0] = 0;
    if (!o || !name) return -1;
    char **names = NULL;
    int n = 0, found = 0;
    OrtStatus *st = o->api->GetAvailableProviders(&names, &n);
    if (st) {
        o->api->ReleaseStatus(st);
        return -1;
    }
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        if (!strcmp(names[i], name)) found = 1;
        if (list && used + 1 < listlen) {
            int w = snprintf(list + used, listlen - used, "%s%s", i ? ", " : "", names[i]);
            used = w > 0 ? used + (size_t)w : used;
            if (used >= listlen) used = listlen - 1;
        }
    }
    st = o->api->ReleaseAvailableProviders(names, n);
    if (st) o->api->ReleaseStatus(st);
    return found;
}

/* onnxruntime's CUDA EP on device_id (V2 options: keys as in onnxruntime's CUDA EP documentation). */
static int append_cuda(const OrtApi *api, OrtSessionOptions *so, int device_id, char *err, size_t errlen) {
    OrtCUDAProviderOptionsV2 *cuda = NULL;
    char dev[16];
    snprintf(dev, sizeof dev, "%d", device_id);
    const char *keys[] = {"device_id"}, *vals[] = {dev};
    int rc = check(api, api->CreateCUDAProviderOptions(&cuda), "CreateCUDAProviderOptions", err, errlen);
    if (!rc) rc = check(api, api->UpdateCUDAProviderOptions(cuda, keys, vals, 1), "UpdateCUDAProviderOptions", err,
                        errlen);
    if (!rc) rc = check(api, api->SessionOptionsAppendExecutionProvider_CUDA_V2(so, cuda),
                        "SessionOptionsAppendExecutionProvider_CUDA_V2", err, errlen);
    if (cuda) api->ReleaseCUDAProviderOptions(cuda);
    return rc;
}

/* onnxruntime's TensorRT EP (keys as in its TensorRT EP documentation: trt_engine_cache_* keep engines). */
static int append_tensorrt(const OrtApi *api, OrtSessionOptions *so, const nora_graph_options *opt, char *err,
                           size_t errlen) {
    OrtTensorRTProviderOptionsV2 *trt = NULL;
    char dev[16];
    snprintf(dev, sizeof dev, "%d", opt->device_id);
    const char *keys[4] = {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path"};
    const char *vals[4] = {dev, opt->trt_fp16 ? "1" : "0", "1", opt->trt_cache_dir};
    size_t nkeys = opt->trt_cache_dir && *opt->trt_cache_dir ? 4 : 2;
    int rc = check(api, api->CreateTensorRTProviderOptions(&trt), "CreateTensorRTProviderOptions", err, errlen);
    if (!rc) rc = check(api, api->UpdateTensorRTProviderOptions(trt, keys, vals, nkeys),
                        "UpdateTensorRTProviderOptions", err, errlen);
    if (!rc) rc = check(api, api->SessionOptionsAppendExecutionProvider_TensorRT_V2(so, trt),
                        "SessionOptionsAppendExecutionProvider_TensorRT_V2", err, errlen);
    if (trt) api->ReleaseTensorRTProviderOptions(trt);
    return rc;
}

int nora_graph_open(nora_ort *o, const char *onnx_path, int threads, nora_graph **out, char *err, size_t errlen) {
    nora_graph_options opt = {threads, NORA_ORT_CPU, 0, NULL, 0};
    return nora_graph_open_ex(o, onnx_path, &opt, out, err, errlen);
}

int nora_graph_open_ex(nora_ort *o, const char *onnx_path, const nora_graph_options *opt, nora_graph **out,
                       char *err, size_t errlen) {
    if (!o || !onnx_path || !out || !opt || opt->threads < 0) {
        fail(err, errlen, "nora_graph_open: NULL argument or negative threads (%d)", opt ? opt->threads : 0);
        return -1;
    }
    if (opt->provider < NORA_ORT_CPU || opt->provider > NORA_ORT_TENSORRT || opt->device_id < 0) {
        fail(err, errlen, "nora_graph_open: unknown provider %d or negative device_id %d", opt->provider,
             opt->device_id);
        return -1;
    }
    int threads = opt->threads;
    const OrtApi *api = o->api;
    *out = NULL;
    OrtSessionOptions *so = NULL;
    nora_graph *g = calloc(1, sizeof *g);
    if (!g) {
        fail(err, errlen, "out of memory");
        return -1;
    }
    g->ort = o;
    int rc = check(api, api->CreateSessionOptions(&so), "CreateSessionOptions", err, errlen);
    if (!rc) rc = check(api, api->SetIntraOpNumThreads(so, threads), "SetIntraOpNumThreads", err, errlen);
    if (!rc) rc = check(api, api->SetInterOpNumThreads(so, 1), "SetInterOpNumThreads", err, errlen);
    if (!rc) rc = check(api, api->SetSessionGraphOptimizationLevel(so, ORT_ENABLE_ALL), "SetOptimizationLevel", err,
                        errlen);
    /* no idle spinning of the thread pools (the Python runtime's default too: a robot computer runs control loops
     * beside the policy) */
    if (!rc) rc = check(api, api->AddSessionConfigEntry(so, "session.intra_op.allow_spinning", "0"),
                        "AddSessionConfigEntry", err, errlen);
    if (!rc) rc = check(api, api->AddSessionConfigEntry(so, "session.inter_op.allow_spinning", "0"),
                        "AddSessionConfigEntry", err, errlen);
    if (!rc && opt->provider == NORA_ORT_TENSORRT) rc = append_tensorrt(api, so, opt, err, errlen);
    if (!rc && opt->provider != NORA_ORT_CPU) rc = append_cuda(api, so, opt->device_id, err, errlen);
    if (!rc) rc = check(api, api->CreateSession(o->env, onnx_path, so, &g->session), "CreateSession", err, errlen);
    if (!rc) rc = check(api, api->CreateRunOptions(&g->run), "CreateRunOptions", err, errlen);
    if (so) api->ReleaseSessionOptions(so);
    if (rc) {
        nora_graph_close(g);
        return -1;
    }
    *out = g;
    return 0;
}

void nora_graph_close(nora_graph *g) {
    if (!g) return;
    if (g->run) g->ort->api->ReleaseRunOptions(g->run);
    if (g->session) g->ort->api->ReleaseSession(g->session);
    free(g);
}

static size_t elem_size(int elem) {
    switch (elem) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    default: return 0;
    }
}

/* Wrap t's memory (no copy). */
static int wrap(const nora_ort *o, const nora_tensor *t, OrtValue **v, char *err, size_t n) {
    size_t es = elem_size(t->elem), count = 1;
    if (!t->name || !t->data || !t->shape || !es) {
        fail(err, n, "tensor '%s': NULL name/data/shape or unsupported element type %d", t->name ? t->name : "?",
             t->elem);
        return -1;
    }
    for (size_t i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0) {
            fail(err, n, "tensor '%s': negative dim %lld", t->name, (long long)t->shape[i]);
            return -1;
        }
        count *= (size_t)t->shape[i];
    }
    return check(o->api,
                 o->api->CreateTensorWithDataAsOrtValue(o->cpu, t->data, count * es, t->shape, t->ndim,
                                                        (ONNXTensorElementDataType)t->elem, v),
                 t->name, err, n);
}

int nora_graph_run(nora_graph *g, const nora_tensor *in, size_t nin, const nora_tensor *out, size_t nout, char *err,
                   size_t errlen) {
    if (!g || (nin && !in) || (nout && !out)) {
        fail(err, errlen, "nora_graph_run: NULL argument");
        return -1;
    }
    const OrtApi *api = g->ort->api;
    OrtIoBinding *b = NULL;
    /* one OrtValue struct per bound tensor: a few small allocations per call inside onnxruntime (the tensor
     * memory itself is the caller's and is never copied) */
    OrtValue **vals = calloc(nin + nout + 1, sizeof *vals);
    int rc = vals ? 0 : -1;
    if (rc) fail(err, errlen, "out of memory");
    if (!rc) rc = check(api, api->CreateIoBinding(g->session, &b), "CreateIoBinding", err, errlen);
    for (size_t i = 0; !rc && i < nin; i++) {
        rc = wrap(g->ort, &in[i], &vals[i], err, errlen);
        if (!rc) rc = check(api, api->BindInput(b, in[i].name, vals[i]), in[i].name, err, errlen);
    }
    for (size_t i = 0; !rc && i < nout; i++) {
        rc = wrap(g->ort, &out[i], &vals[nin + i], err, errlen);
        if (!rc) rc = check(api, api->BindOutput(b, out[i].name, vals[nin + i]), out[i].name, err, errlen);
    }
    if (!rc) rc = check(api, api->RunWithBinding(g->session, g->run, b), "RunWithBinding", err, errlen);
    for (size_t i = 0; vals && i < nin + nout; i++)
        if (vals[i]) api->ReleaseValue(vals[i]);
    if (b) api->ReleaseIoBinding(b);
    free(vals);
    return rc;
}

/* ---- persistent binding: values created once, bound once, rebound by name without allocating ---- */

struct nora_value {
    OrtValue *v;
    const OrtApi *api;
};

struct nora_binding {
    nora_graph *g;
    OrtIoBinding *b;
};

int nora_value_create(nora_ort *o, const nora_tensor *t, nora_value **out, char *err, size_t errlen) {
    if (!o || !t || !out) {
        fail(err, errlen, "nora_value_create: NULL argument");
        return -1;
    }
    *out = NULL;
    nora_value *nv = calloc(1, sizeof *nv);
    if (!nv) {
        fail(err, errlen, "out of memory");
        return -1;
    }
    nv->api = o->api;
    if (wrap(o, t, &nv->v, err, errlen)) {
        free(nv);
        return -1;
    }
    *out = nv;
    return 0;
}

void nora_value_free(nora_value *v) {
    if (!v) return;
    if (v->v) v->api->ReleaseValue(v->v);
    free(v);
}

int nora_binding_create(nora_graph *g, nora_binding **out, char *err, size_t errlen) {
    if (!g || !out) {
        fail(err, errlen, "nora_binding_create: NULL argument");
        return -1;
    }
    *out = NULL;
    nora_binding *b = calloc(1, sizeof *b);
    if (!b) {
        fail(err, errlen, "out of memory");
        return -1;
    }
    b->g = g;
    if (check(g->ort->api, g->ort->api->CreateIoBinding(g->session, &b->b), "CreateIoBinding", err, errlen)) {
        free(b);
        return -1;
    }
    *out = b;
    return 0;
}

void nora_binding_free(nora_binding *b) {
    if (!b) return;
    if (b->b) b->g->ort->api->ReleaseIoBinding(b->b);
    free(b);
}

int nora_binding_input(nora_binding *b, const char *name, const nora_value *v, char *err, size_t errlen) {
    if (!b || !name || !v) {
        fail(err, errlen, "nora_binding_input: NULL argument");
        return -1;
    }
    return check(b->g->ort->api, b->g->ort->api->BindInput(b->b, name, v->v), name, err, errlen);
}

int nora_binding_output(nora_binding *b, const char *name, const nora_value *v, char *err, size_t errlen) {
    if (!b || !name || !v) {
        fail(err, errlen, "nora_binding_output: NULL argument");
        return -1;
    }
    return check(b->g->ort->api, b->g->ort->api->BindOutput(b->b, name, v->v), name, err, errlen);
}

int nora_binding_run(nora_binding *b, char *err, size_t errlen) {
    if (!b) {
        fail(err, errlen, "nora_binding_run: NULL binding");
        return -1;
    }
    const OrtApi *api = b->g->ort->api;
    return check(api, api->RunWithBinding(b->g->session, b->g->run, b->b), "RunWithBinding", err, errlen);
}
