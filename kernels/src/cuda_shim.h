/* cuda_shim.h — the CUDA runtime surface fast_cuda.cu (and tools/gpu_check.c) use, in two builds.
 *
 * nvcc (NORA_CUDA_SHIM undefined): includes the real runtime and defines NF_LAUNCH as a <<<grid, block, 0,
 *   stream>>> launch. Nothing else.
 * CPU shim (-DNORA_CUDA_SHIM, fast_cuda.cu compiled by g++ -x c++): the same source runs on the host. Device
 *   memory is host memory (cudaMalloc = malloc, cudaMemcpy = memcpy, the *Async calls run at once, streams and
 *   events are dummies, events read a monotonic clock), threadIdx/blockIdx/blockDim/gridDim are thread-local
 *   globals, and NF_LAUNCH runs every (block, thread) of the grid one after another. That is exact for the
 *   nora_fast kernels because they use no __syncthreads, shared memory, warp shuffles or atomics: each thread
 *   reads what earlier launches wrote and writes only its own outputs.
 * The C part (runtime functions) is usable from C (gpu_check.c's shim build); the kernel part needs C++.
 */
#ifndef NORA_CUDA_SHIM_H
#define NORA_CUDA_SHIM_H

#ifndef NORA_CUDA_SHIM
/* ---- real CUDA ------------------------------------------------------------------------------------------ */
#include <cuda_runtime_api.h>
#if defined(__CUDACC__)
#define NF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#else
/* ---- CPU shim --------------------------------------------------------------------------------------------- */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef enum {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorNoDevice = 100,
  cudaErrorNotSupported = 801
} cudaError_t;

typedef enum {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
} cudaMemcpyKind;

typedef struct nf_shim_stream* cudaStream_t;
typedef struct nf_shim_event {
  double seconds;
}* cudaEvent_t;

static inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error (CPU shim)";
    case cudaErrorInvalidValue:
      return "invalid argument (CPU shim)";
    case cudaErrorMemoryAllocation:
      return "out of memory (CPU shim)";
    case cudaErrorNotSupported:
      return "operation not supported (CPU shim)";
    default:
      return "no CUDA-capable device is detected (CPU shim)";
  }
}
static inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
static inline cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
static inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
static inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
static inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
static inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t s) {
  (void)s;
  return cudaMalloc(p, n);
}
static inline cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  (void)s;
  return cudaFree(p);
}
static inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind k) {
  (void)k;
  if (n) memcpy(dst, src, n);
  return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t s) {
  (void)s;
  return cudaMemcpy(dst, src, n, k);
}
static inline cudaError_t cudaMemset(void* p, int value, size_t n) {
  if (n) memset(p, value, n);
  return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s) {
  (void)s;
  return cudaMemset(p, value, n);
}
static inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
static inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = NULL;
  return cudaSuccess;
}
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
  (void)s;
  return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  (void)s;
  return cudaSuccess;
}
static inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = (cudaEvent_t)calloc(1, sizeof **e);
  return *e ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  free(e);
  return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  (void)s;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  e->seconds = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
  return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  (void)e;
  return cudaSuccess;
}
static inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = (float)(1e3 * (end->seconds - start->seconds));
  return cudaSuccess;
}

#ifdef __cplusplus
/* ---- kernels on the host: qualifiers, thread indices, sequential launch ---------------------------------- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx(0, 0, 0);
inline thread_local dim3 blockIdx(0, 0, 0);
inline thread_local dim3 blockDim(1, 1, 1);
inline thread_local dim3 gridDim(1, 1, 1);

/* Every block, every thread, in order (z, y, x outermost to innermost); launch errors cannot happen. */
#define NF_LAUNCH(kernel, grid, block, stream, ...)                                          \
  do {                                                                                       \
    const dim3 nf_grid_ = (grid), nf_block_ = (block);                                       \
    (void)(stream);                                                                          \
    gridDim = nf_grid_;                                                                      \
    blockDim = nf_block_;                                                                    \
    for (unsigned int nf_bz = 0; nf_bz < nf_grid_.z; ++nf_bz)                                \
      for (unsigned int nf_by = 0; nf_by < nf_grid_.y; ++nf_by)                              \
        for (unsigned int nf_bx = 0; nf_bx < nf_grid_.x; ++nf_bx) {                          \
          blockIdx = dim3(nf_bx, nf_by, nf_bz);                                              \
          for (unsigned int nf_tz = 0; nf_tz < nf_block_.z; ++nf_tz)                         \
            for (unsigned int nf_ty = 0; nf_ty < nf_block_.y; ++nf_ty)                       \
              for (unsigned int nf_tx = 0; nf_tx < nf_block_.x; ++nf_tx) {                   \
                threadIdx = dim3(nf_tx, nf_ty, nf_tz);                                       \
                kernel(__VA_ARGS__);                                                         \
              }                                                                              \
        }                                                                                    \
  } while (0)
#endif /* __cplusplus */

#endif /* NORA_CUDA_SHIM */
#endif /* NORA_CUDA_SHIM_H */
