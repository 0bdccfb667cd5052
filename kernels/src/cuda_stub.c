/* cuda_stub.c — the CUDA half of the nora_fast ABI in the CPU-only build (libnora_fast.so / .a).
 *
 * Every CUDA entry point exists so that one header serves both builds; here they fail with NORA_FAST_E_CUDA and
 * a message naming the library to use instead. The CUDA implementation is fast_cuda.cu (libnora_fast_cuda.so).
 */
#include "fast_ctx.h"

#define NF_NO_CUDA                                                                                              \
  "libnora_fast was built without CUDA (CPU-only build); use libnora_fast_cuda.so (make -C kernels cuda) for "   \
  "%s"

int nora_fast_cuda_available(void) { return 0; }

void nf_cuda_release(struct nora_fast_ctx* ctx) { (void)ctx; }

int nora_fast_ctx_cuda_upload(nora_fast_ctx* ctx) {
  (void)ctx;
  return nf_fail(NORA_FAST_E_CUDA, NF_NO_CUDA, "nora_fast_ctx_cuda_upload");
}

int nora_fast_select_cuda(const nora_fast_ctx* ctx, int batch, const float* logits, int64_t row_stride,
                          uint8_t* seen, float penalty, int32_t* done, int32_t* pending, int32_t* out_id,
                          int32_t* out_top, int32_t* status, void* stream) {
  (void)ctx, (void)batch, (void)logits, (void)row_stride, (void)seen, (void)penalty, (void)done, (void)pending;
  (void)out_id, (void)out_top, (void)status, (void)stream;
  return nf_fail(NORA_FAST_E_CUDA, NF_NO_CUDA, "nora_fast_select_cuda");
}

int nora_fast_decode_cuda(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                          const int32_t* lengths, int program, float* actions, int32_t* coeffs, int32_t* status,
                          int32_t* error_pos, void* stream) {
  (void)ctx, (void)batch, (void)ids, (void)id_stride, (void)lengths, (void)program, (void)actions, (void)coeffs;
  (void)status, (void)error_pos, (void)stream;
  return nf_fail(NORA_FAST_E_CUDA, NF_NO_CUDA, "nora_fast_decode_cuda");
}
