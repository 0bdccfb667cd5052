/* fast_ctx.h — the context behind the opaque nora_fast_ctx, and the internal error helpers (not installed). */
#ifndef NORA_FAST_CTX_H
#define NORA_FAST_CTX_H

#include "fast_elem.h"

#ifdef __cplusplus
extern "C" {
#endif

struct nora_fast_ctx {
  nf_view host;       /* views into the owned host arrays below */
  nf_view dev;        /* device pointers after nora_fast_ctx_cuda_upload (NULL pointers before) */
  int cuda_ready;
  void* dev_block;    /* the one device allocation holding every table (freed by nora_fast_ctx_free) */
  int32_t max_ids;    /* 4 * T * D + 1 */
  char** keys;        /* (n_programs,) owned strings */
  /* owned host arrays (the views point here) */
  int32_t* offsets;
  uint8_t* bytes;
  int32_t* adv;
  int32_t* nxt;
  uint8_t* reach;
  int32_t* head_ids;
  int32_t* action_rows;
  double* basis;
  int32_t* prog_start;
  int32_t* prog_len;
  nora_fast_op* ops;
};

/* Record this thread's error message and return `code` (printf-style). */
int nf_fail(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Clear this thread's message (a successful call). */
void nf_ok(void);
/* Release the device copy (defined by the CUDA build; a no-op in the CPU-only build). */
void nf_cuda_release(struct nora_fast_ctx* ctx);

#ifdef __cplusplus
}
#endif
#endif /* NORA_FAST_CTX_H */
