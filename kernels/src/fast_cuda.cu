/* fast_cuda.cu — the CUDA implementation of nora_fast (device pointers, one stream, asynchronous).
 *
 * Data flow
 *   nora_fast_ctx_cuda_upload: host tables --one cudaMalloc (ctx->dev_block), one cudaMemcpy per table-->
 *     ctx->dev, an nf_view of device pointers (passed by value to every kernel).
 *   nora_fast_select_cuda (B rows):
 *     nf_k_select_scan  one thread per (row b, chunk c): chunks [0, nA) scan FAST ids [c*S, c*S+S) with
 *                       nf_scan_allowed, chunks [nA, nA+nT) scan head rows with nf_scan_top (nT = 0 without
 *                       out_top) -> scratch partials (nA+nT, B) nf_best
 *     nf_k_select_final one thread per row: nf_best_merge of the partials in chunk order (identical to one
 *                       sequential scan: the order is a strict weak order and earlier chunks win ties),
 *                       nf_select_status, out_id/out_top/status, advance (done, pending), mark seen.
 *   nora_fast_decode_cuda (B sequences):
 *     nf_k_decode_seq   one thread per sequence: nf_decode_seq -> coeffs (B, T*D) (the caller's buffer, or
 *                       scratch when coeffs is NULL and actions are wanted), status, error_pos
 *     nf_k_actions      one thread per (b, t, d): nf_action (float64) -> float32, NaN where status is not OK
 *     nf_k_finish       one thread per sequence: any non-finite action -> NORA_FAST_SEQ_NOT_FINITE; a failed
 *                       sequence gets NaN actions and zero coefficients (exactly fast_cpu.c's rules, including
 *                       "no actions requested -> no finiteness check").
 *
 * The per-element math is fast_elem.h, shared with fast_cpu.c; with nvcc --fmad=false the float64 iDCT rounds
 * like the CPU path compiled with -ffp-contract=off. The kernels use no __syncthreads, shared memory, warp
 * shuffles or atomics, so the CPU shim (cuda_shim.h, -DNORA_CUDA_SHIM) runs this same file on the host.
 *
 * Scratch: select/decode allocate their scratch per call with cudaMallocAsync/cudaFreeAsync on the caller's
 * stream (stream-ordered, thread-safe, capturable into a CUDA graph as memory nodes). The device's default
 * memory pool returns freed memory to the OS at each synchronization unless its release threshold is raised;
 * a per-token loop that synchronizes every step should raise it once (cudaDeviceGetDefaultMemPool +
 * cudaMemPoolSetAttribute(cudaMemPoolAttrReleaseThreshold)) or capture the loop in a graph. The library does not
 * change that process-wide setting itself. A device without memory pools gets plain cudaMalloc/cudaFree scratch
 * (correct, but cudaFree waits for the device and such calls cannot be captured).
 * Threading: select/decode only read the context, any number of threads/streams may call them. Upload writes
 * the context: call it once, before any other thread uses the context. The tables live on the device that was
 * current during upload; calls must run with that device current.
 * Differences from the CPU calls (they cannot read device memory synchronously): a length outside
 * [0, id_stride] gives that sequence NORA_FAST_SEQ_ID_OUT_OF_RANGE with error_pos -1 instead of the CPU's
 * NORA_FAST_E_ARGUMENT, and NORA_FAST_E_ROWS is never returned (statuses are valid after the stream syncs).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda_shim.h"
#include "fast_ctx.h"

#define NF_BLOCK 128 /* threads per block of every launch */
#define NF_TARGET_THREADS (1 << 18) /* select: chunks grow past NF_MIN_CHUNK only beyond this many threads */
#define NF_MIN_CHUNK 32
#define NF_MAX_CHUNK 1024

/* ---- kernels ---------------------------------------------------------------------------------------------- */
static __device__ __forceinline__ int64_t nf_tid(void) {
  return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}

/* Pass 1 of select: one partial argmax per (chunk, row), stored at partial[c * batch + b]. seen is NULL unless
 * the penalty applies. */
static __global__ void nf_k_select_scan(nf_view v, int32_t batch, const float* logits, int64_t row_stride,
                                        const uint8_t* seen, float penalty, const int32_t* done,
                                        const int32_t* pending, int32_t chunk, int32_t n_allowed, int32_t n_top,
                                        nf_best* partial) {
  int64_t i = nf_tid();
  if (i >= (int64_t)batch * (n_allowed + n_top)) return;
  int32_t c = (int32_t)(i / batch), b = (int32_t)(i % batch); /* b fastest: neighbours share ids, coalesced writes */
  const float* row = logits + (int64_t)b * row_stride;
  const uint8_t* row_seen = seen ? seen + (int64_t)b * row_stride : NULL;
  int32_t d = done[b], q = pending[b];
  nf_best best = nf_best_init();
  if (nf_state_ok(&v, d, q)) {
    if (c < n_allowed) {
      int32_t lo = c * chunk, hi = lo + chunk < v.V ? lo + chunk : v.V;
      nf_scan_allowed(&v, row, row_seen, penalty, d, q, lo, hi, &best);
    } else {
      int32_t lo = (c - n_allowed) * chunk, hi = lo + chunk < v.n_rows ? lo + chunk : v.n_rows;
      nf_scan_top(&v, row, row_seen, penalty, lo, hi, &best);
    }
  }
  partial[i] = best;
}

/* Pass 2 of select: merge, status, advance. Mirrors nora_fast_select's per-row body. */
static __global__ void nf_k_select_final(nf_view v, int32_t batch, int64_t row_stride, uint8_t* seen,
                                         int32_t* done, int32_t* pending, int32_t* out_id, int32_t* out_top,
                                         int32_t* status, int32_t n_allowed, int32_t n_top,
                                         const nf_best* partial) {
  int64_t b = nf_tid();
  if (b >= batch) return;
  out_id[b] = -1;
  if (out_top) out_top[b] = -1;
  if (!nf_state_ok(&v, done[b], pending[b])) {
    status[b] = NORA_FAST_SEL_BAD_STATE;
    return;
  }
  nf_best allowed = nf_best_init(), top = nf_best_init();
  for (int32_t c = 0; c < n_allowed; ++c) nf_best_merge(&allowed, &partial[(int64_t)c * batch + b]);
  for (int32_t c = n_allowed; c < n_allowed + n_top; ++c) nf_best_merge(&top, &partial[(int64_t)c * batch + b]);
  if (out_top) out_top[b] = top.index;
  int32_t st = nf_select_status(out_top ? &top : NULL, &allowed);
  status[b] = st;
  if (st != NORA_FAST_SEL_OK) return;
  int32_t id = allowed.index;
  int64_t k = (int64_t)pending[b] * v.V + id;
  out_id[b] = id;
  done[b] += v.adv[k];
  pending[b] = v.nxt[k];
  if (seen) seen[b * row_stride + v.action_rows[id]] = 1;
}

static __global__ void nf_k_decode_seq(nf_view v, int32_t batch, const int32_t* ids, int64_t id_stride,
                                       const int32_t* lengths, int32_t* coeffs, int32_t* status,
                                       int32_t* error_pos) {
  int64_t b = nf_tid();
  if (b >= batch) return;
  int32_t pos = -1, st, len = lengths[b];
  if (len < 0 || len > id_stride) {
    st = NORA_FAST_SEQ_ID_OUT_OF_RANGE; /* the CPU call refuses it with NORA_FAST_E_ARGUMENT */
  } else {
    st = nf_decode_seq(&v, ids + b * id_stride, len, coeffs ? coeffs + b * v.total : NULL, &pos);
  }
  status[b] = st;
  if (error_pos) error_pos[b] = pos;
}

static __global__ void nf_k_actions(nf_view v, int32_t batch, int32_t program, const int32_t* coeffs,
                                    const int32_t* status, float* actions) {
  int64_t e = nf_tid();
  if (e >= (int64_t)batch * v.total) return;
  int64_t b = e / v.total;
  int32_t r = (int32_t)(e % v.total);
  float x = NAN;
  if (status[b] == NORA_FAST_SEQ_OK) x = (float)nf_action(&v, coeffs + b * v.total, r / v.D, r % v.D, program);
  actions[e] = x;
}

static __global__ void nf_k_finish(nf_view v, int32_t batch, float* actions, int32_t* coeffs, int32_t* status) {
  int64_t b = nf_tid();
  if (b >= batch) return;
  int32_t st = status[b];
  float* act = actions ? actions + b * v.total : NULL;
  if (st == NORA_FAST_SEQ_OK && act) {
    for (int32_t i = 0; i < v.total; ++i)
      if (!isfinite(act[i])) st = NORA_FAST_SEQ_NOT_FINITE;
    status[b] = st;
  }
  if (st != NORA_FAST_SEQ_OK) {
    if (act)
      for (int32_t i = 0; i < v.total; ++i) act[i] = NAN;
    if (coeffs)
      for (int32_t i = 0; i < v.total; ++i) coeffs[b * v.total + i] = 0;
  }
}

/* ---- host side -------------------------------------------------------------------------------------------- */
static unsigned int nf_blocks(int64_t threads) { return (unsigned int)((threads + NF_BLOCK - 1) / NF_BLOCK); }

/* The launch just made (or an earlier asynchronous failure) as a call error. */
static int nf_launch_status(const char* fn, const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return nf_fail(NORA_FAST_E_CUDA, "%s: %s failed: %s", fn, what, cudaGetErrorString(e));
  return NORA_FAST_OK;
}

static int nf_alloc_fail(const char* fn, cudaError_t e, size_t bytes) {
  int code = e == cudaErrorMemoryAllocation ? NORA_FAST_E_NO_MEMORY : NORA_FAST_E_CUDA;
  return nf_fail(code, "%s: allocating %zu scratch bytes failed: %s", fn, bytes, cudaGetErrorString(e));
}

/* Stream-ordered scratch; where the device has no memory pools (cudaMallocAsync: cudaErrorNotSupported), plain
 * cudaMalloc/cudaFree: correct, but cudaFree waits for the device and the call cannot be graph-captured. */
static cudaError_t nf_scratch_alloc(void** p, size_t bytes, cudaStream_t s, int* pooled) {
  *pooled = 1;
  cudaError_t e = cudaMallocAsync(p, bytes, s);
  if (e == cudaErrorNotSupported) {
    (void)cudaGetLastError();
    *pooled = 0;
    e = cudaMalloc(p, bytes);
  }
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

static int nf_scratch_free(const char* fn, void* p, cudaStream_t s, int pooled, int rc) {
  cudaError_t e = pooled ? cudaFreeAsync(p, s) : cudaFree(p);
  if (!rc && e != cudaSuccess)
    rc = nf_fail(NORA_FAST_E_CUDA, "%s: freeing scratch failed: %s", fn, cudaGetErrorString(e));
  return rc;
}

static int nf_check_args(const nora_fast_ctx* ctx, int batch, const char* fn) {
  if (!ctx) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL context", fn);
  if (batch < 0) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: batch %d < 0", fn, batch);
  return NORA_FAST_OK;
}

static int nf_not_uploaded(const char* fn) {
  return nf_fail(NORA_FAST_E_CUDA, "%s: the context is not on the device (call nora_fast_ctx_cuda_upload first)",
                 fn);
}

extern "C" {

int nora_fast_cuda_available(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError(); /* do not leave "no device" behind for the next launch check */
    return 0;
  }
  return n > 0;
}

void nf_cuda_release(struct nora_fast_ctx* ctx) {
  if (!ctx || !ctx->dev_block) return;
  (void)cudaFree(ctx->dev_block); /* may fail at process teardown (runtime unloaded): nothing left to do */
  (void)cudaGetLastError();
  ctx->dev_block = NULL;
  ctx->cuda_ready = 0;
  memset(&ctx->dev, 0, sizeof ctx->dev);
}

int nora_fast_ctx_cuda_upload(nora_fast_ctx* ctx) {
  static const char fn[] = "nora_fast_ctx_cuda_upload";
  if (!ctx) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL context", fn);
  if (ctx->cuda_ready) {
    nf_ok();
    return NORA_FAST_OK;
  }
  int n_dev = 0;
  cudaError_t e = cudaGetDeviceCount(&n_dev);
  if (e != cudaSuccess || n_dev < 1) {
    (void)cudaGetLastError();
    return nf_fail(NORA_FAST_E_CUDA, "%s: no CUDA device: %s", fn,
                   e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found 0 devices");
  }
  const nf_view* h = &ctx->host;
  int64_t n_ops = 0;
  for (int32_t p = 0; p < h->n_programs; ++p) n_ops += h->prog_len[p];
  /* every table at a 256-byte aligned offset inside one allocation */
  struct {
    const void* src;
    size_t bytes;
    size_t offset;
  } t[11] = {
      {h->offsets, ((size_t)h->V + 1) * sizeof(int32_t), 0},
      {h->bytes, (size_t)h->N, 0},
      {h->adv, (size_t)h->Q * h->V * sizeof(int32_t), 0},
      {h->nxt, (size_t)h->Q * h->V * sizeof(int32_t), 0},
      {h->reach, ((size_t)h->total + 1) * h->Q, 0},
      {h->head_ids, (size_t)h->n_rows * sizeof(int32_t), 0},
      {h->action_rows, (size_t)h->V * sizeof(int32_t), 0},
      {h->basis, (size_t)h->T * h->T * sizeof(double), 0},
      {h->prog_start, (size_t)h->n_programs * sizeof(int32_t), 0},
      {h->prog_len, (size_t)h->n_programs * sizeof(int32_t), 0},
      {h->ops, (size_t)n_ops * sizeof(nora_fast_op), 0},
  };
  size_t total = 0;
  for (int i = 0; i < 11; ++i) {
    t[i].offset = total;
    total += (t[i].bytes + 255) / 256 * 256;
  }
  void* block = NULL;
  e = cudaMalloc(&block, total ? total : 256);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return nf_fail(e == cudaErrorMemoryAllocation ? NORA_FAST_E_NO_MEMORY : NORA_FAST_E_CUDA,
                   "%s: cudaMalloc of %zu bytes failed: %s", fn, total, cudaGetErrorString(e));
  }
  char* base = (char*)block;
  for (int i = 0; i < 11 && e == cudaSuccess; ++i)
    if (t[i].bytes) e = cudaMemcpy(base + t[i].offset, t[i].src, t[i].bytes, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    (void)cudaFree(block);
    return nf_fail(NORA_FAST_E_CUDA, "%s: copying the tables failed: %s", fn, cudaGetErrorString(e));
  }
  nf_view d = *h;
  d.offsets = (const int32_t*)(base + t[0].offset);
  d.bytes = (const uint8_t*)(base + t[1].offset);
  d.adv = (const int32_t*)(base + t[2].offset);
  d.nxt = (const int32_t*)(base + t[3].offset);
  d.reach = (const uint8_t*)(base + t[4].offset);
  d.head_ids = (const int32_t*)(base + t[5].offset);
  d.action_rows = (const int32_t*)(base + t[6].offset);
  d.basis = (const double*)(base + t[7].offset);
  d.prog_start = (const int32_t*)(base + t[8].offset);
  d.prog_len = (const int32_t*)(base + t[9].offset);
  d.ops = (const nora_fast_op*)(base + t[10].offset);
  ctx->dev = d;
  ctx->dev_block = block;
  ctx->cuda_ready = 1;
  nf_ok();
  return NORA_FAST_OK;
}

int nora_fast_select_cuda(const nora_fast_ctx* ctx, int batch, const float* logits, int64_t row_stride,
                          uint8_t* seen, float penalty, int32_t* done, int32_t* pending, int32_t* out_id,
                          int32_t* out_top, int32_t* status, void* stream) {
  static const char fn[] = "nora_fast_select_cuda";
  int rc = nf_check_args(ctx, batch, fn);
  if (rc) return rc;
  const nf_view* v = &ctx->dev;
  if (batch > 0 && (!logits || !done || !pending || !out_id || !status))
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL logits, done, pending, out_id or status", fn);
  if (row_stride < ctx->host.n_rows)
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: row_stride %lld < the head's %d rows", fn, (long long)row_stride,
                   ctx->host.n_rows);
  if (!(penalty > 0.0f)) return nf_fail(NORA_FAST_E_ARGUMENT, "%s: penalty %g must be > 0", fn, penalty);
  if (!ctx->cuda_ready) return nf_not_uploaded(fn);
  if (batch == 0) {
    nf_ok();
    return NORA_FAST_OK;
  }
  cudaStream_t s = (cudaStream_t)stream;
  uint8_t* row_seen = seen != NULL && penalty != 1.0f ? seen : NULL;
  /* chunk: NF_MIN_CHUNK ids per thread, more (powers of two) once the grid would pass NF_TARGET_THREADS */
  int64_t work = (int64_t)batch * (v->V + (out_top ? v->n_rows : 0));
  int32_t chunk = NF_MIN_CHUNK;
  while (chunk < NF_MAX_CHUNK && work / chunk > NF_TARGET_THREADS) chunk *= 2;
  int32_t n_allowed = (v->V + chunk - 1) / chunk, n_top = out_top ? (v->n_rows + chunk - 1) / chunk : 0;
  int64_t n_partial = (int64_t)batch * (n_allowed + n_top);
  size_t bytes = (size_t)n_partial * sizeof(nf_best);
  (void)cudaGetLastError(); /* a stale non-sticky error from unrelated code is not ours to report */
  nf_best* partial = NULL;
  int pooled = 1;
  cudaError_t e = nf_scratch_alloc((void**)&partial, bytes, s, &pooled);
  if (e != cudaSuccess) return nf_alloc_fail(fn, e, bytes);
  NF_LAUNCH(nf_k_select_scan, nf_blocks(n_partial), NF_BLOCK, s, *v, (int32_t)batch, logits, row_stride, row_seen,
            penalty, done, pending, chunk, n_allowed, n_top, partial);
  rc = nf_launch_status(fn, "nf_k_select_scan launch");
  if (!rc) {
    NF_LAUNCH(nf_k_select_final, nf_blocks(batch), NF_BLOCK, s, *v, (int32_t)batch, row_stride, row_seen, done,
              pending, out_id, out_top, status, n_allowed, n_top, partial);
    rc = nf_launch_status(fn, "nf_k_select_final launch");
  }
  rc = nf_scratch_free(fn, partial, s, pooled, rc);
  if (!rc) nf_ok();
  return rc;
}

int nora_fast_decode_cuda(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                          const int32_t* lengths, int program, float* actions, int32_t* coeffs, int32_t* status,
                          int32_t* error_pos, void* stream) {
  static const char fn[] = "nora_fast_decode_cuda";
  int rc = nf_check_args(ctx, batch, fn);
  if (rc) return rc;
  const nf_view* v = &ctx->dev;
  if (batch > 0 && (!ids || !lengths || !status))
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: NULL ids, lengths or status", fn);
  if (program < -1 || program >= ctx->host.n_programs)
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: program %d outside [-1, %d)", fn, program, ctx->host.n_programs);
  if (batch > 0 && id_stride < 0)
    return nf_fail(NORA_FAST_E_ARGUMENT, "%s: id_stride %lld < 0", fn, (long long)id_stride);
  if (!ctx->cuda_ready) return nf_not_uploaded(fn);
  if (batch == 0) {
    nf_ok();
    return NORA_FAST_OK;
  }
  cudaStream_t s = (cudaStream_t)stream;
  int64_t total = ctx->host.total;
  (void)cudaGetLastError(); /* see nora_fast_select_cuda */
  int32_t* ctmp = coeffs;
  size_t bytes = 0;
  int pooled = 1;
  if (!coeffs && actions) { /* nf_action needs the coefficients somewhere */
    bytes = (size_t)batch * (size_t)total * sizeof(int32_t);
    cudaError_t e = nf_scratch_alloc((void**)&ctmp, bytes, s, &pooled);
    if (e != cudaSuccess) return nf_alloc_fail(fn, e, bytes);
  }
  NF_LAUNCH(nf_k_decode_seq, nf_blocks(batch), NF_BLOCK, s, *v, (int32_t)batch, ids, id_stride, lengths, ctmp,
            status, error_pos);
  rc = nf_launch_status(fn, "nf_k_decode_seq launch");
  if (!rc && actions) {
    NF_LAUNCH(nf_k_actions, nf_blocks((int64_t)batch * total), NF_BLOCK, s, *v, (int32_t)batch, (int32_t)program,
              (const int32_t*)ctmp, (const int32_t*)status, actions);
    rc = nf_launch_status(fn, "nf_k_actions launch");
  }
  if (!rc && (actions || coeffs)) {
    NF_LAUNCH(nf_k_finish, nf_blocks(batch), NF_BLOCK, s, *v, (int32_t)batch, actions, coeffs, status);
    rc = nf_launch_status(fn, "nf_k_finish launch");
  }
  if (bytes) rc = nf_scratch_free(fn, ctmp, s, pooled, rc);
  if (!rc) nf_ok();
  return rc;
}

} /* extern "C" */
