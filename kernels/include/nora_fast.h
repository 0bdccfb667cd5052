/* nora_fast.h — the FAST+ action codec as a C library: constrained token selection and detokenization.
 *
 * One C ABI for the CPU implementation (always built) and the CUDA implementation (built where nvcc exists).
 *
 * Data flow
 *   codec/native/ of a nora-edge bundle (written by `nora-edge export`, hashed by manifest.json)
 *     --nora_fast_ctx_open--> context: byte table, FAST parameters, constraint automaton, iDCT basis,
 *                                      post-processing programs (one per unnorm key)
 *   decode loop:  action-head logits (B, n_rows) + automaton states (B,)
 *     --nora_fast_select--> chosen FAST id (B,), advanced state (B,), the model's own top row (B,)
 *   after the loop: FAST id sequences (B, L)
 *     --nora_fast_decode--> bytes --strict UTF-8--> code points + min_token = integer DCT coefficients (B, T*D)
 *     --/ scale, orthonormal DCT-III over time--> normalized actions --post program--> (B, T, D) float actions,
 *     one status per sequence. A failed sequence's actions are NaN, never zeros.
 *
 * The algorithm is FAST (Pertsch et al., "FAST: Efficient Action Tokenization for Vision-Language-Action
 * Models", arXiv 2501.09747; physical-intelligence/openpi `src/openpi/models/tokenizer.py` and the
 * `physical-intelligence/fast` processor): coefficients = round(DCT-II(actions) * scale) - min_token are written
 * as characters and compressed with byte-level BPE; decoding inverts each step. Selection reproduces the
 * nora-edge Python runtime (`nora_edge.generate.greedy`): transformers' repetition penalty, masked argmax, ties
 * to the lowest id.
 *
 * Threading: a context is immutable after creation, except nora_fast_ctx_cuda_upload, which writes it: upload
 * before sharing the context between threads, and make later CUDA calls with the upload's device current. Any
 * number of threads may then call select/decode on it.
 * Errors: every function returns a nora_fast_error; nora_fast_last_error() gives this thread's message for the
 * last failing call. Per-row problems are statuses, not call errors.
 */
#ifndef NORA_FAST_H
#define NORA_FAST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NORA_FAST_VERSION_MAJOR 1
#define NORA_FAST_VERSION_MINOR 2
#define NORA_FAST_VERSION (NORA_FAST_VERSION_MAJOR * 1000 + NORA_FAST_VERSION_MINOR)
/* codec/native/native.txt "nora_fast_native <N>": the file format this build reads */
#define NORA_FAST_NATIVE_FORMAT 1

#if defined(_WIN32)
#define NORA_FAST_API __declspec(dllexport)
#else
#define NORA_FAST_API __attribute__((visibility("default")))
#endif

/* ---- call errors --------------------------------------------------------------------------------------- */
typedef enum {
  NORA_FAST_OK = 0,
  NORA_FAST_E_ARGUMENT = 1,    /* NULL pointer, negative size, unknown device */
  NORA_FAST_E_IO = 2,          /* a codec file is missing or unreadable */
  NORA_FAST_E_FORMAT = 3,      /* codec files malformed or inconsistent with each other */
  NORA_FAST_E_NO_MEMORY = 4,
  NORA_FAST_E_UNKNOWN_KEY = 5, /* no post-processing program for that unnorm key (or a key is required) */
  NORA_FAST_E_CUDA = 6,        /* built without CUDA, no device, or a CUDA runtime error */
  NORA_FAST_E_ROWS = 7         /* the call ran, but at least one row/sequence has a non-OK status */
} nora_fast_error;

/* ---- per-sequence decode status (same reasons as nora_edge's DetokenizationError.reason) ---------------- */
typedef enum {
  NORA_FAST_SEQ_OK = 0,
  NORA_FAST_SEQ_ID_OUT_OF_RANGE = 1,     /* an id outside [0, vocab_size) */
  NORA_FAST_SEQ_INVALID_UTF8 = 2,        /* the concatenated bytes are not strict UTF-8 */
  NORA_FAST_SEQ_COEFF_OUT_OF_RANGE = 3,  /* a code point above the coefficient alphabet */
  NORA_FAST_SEQ_WRONG_COUNT = 4,         /* not exactly T*D coefficients */
  NORA_FAST_SEQ_NOT_FINITE = 5           /* an action is NaN or infinite after post-processing */
} nora_fast_seq_status;

/* ---- per-row select status -------------------------------------------------------------------------------- */
typedef enum {
  NORA_FAST_SEL_OK = 0,
  NORA_FAST_SEL_BAD_STATE = 1,       /* (done, pending) outside the automaton */
  NORA_FAST_SEL_TOP_NOT_FINITE = 2,  /* top requested and the best score over all rows is NaN/inf or NaN present */
  NORA_FAST_SEL_NO_ALLOWED = 3,      /* no id keeps the chunk decodable (e.g. the state is already complete) */
  NORA_FAST_SEL_NOT_FINITE = 4       /* the best allowed score is not finite (NaN among allowed, or all -inf) */
} nora_fast_sel_status;

/* ---- post-processing program ops (applied per action dim, in order, in float64) ----------------------- */
typedef enum {
  NORA_FAST_OP_RANGE = 1,  /* x = 0.5 * (x + 1) * (b - a) + a        (q01/q99 and min/max unnormalize) */
  NORA_FAST_OP_AFFINE = 2, /* x = x * a + b                          (mean/std unnormalize, gripper rescale) */
  NORA_FAST_OP_SCALE = 3,  /* x = x * a                              (gripper invert) */
  NORA_FAST_OP_SIGN = 4    /* x = sign(x), sign(0) = 0               (gripper binarize) */
} nora_fast_op_code;

typedef struct {
  int32_t code; /* nora_fast_op_code */
  int32_t dim;  /* 0 <= dim < action_dim */
  double a;
  double b;
} nora_fast_op;

/* Everything a context is built from (nora_fast_ctx_create copies all arrays). Row-major throughout. */
typedef struct {
  int32_t vocab_size;     /* V: FAST ids */
  int32_t n_bytes;        /* N */
  const int32_t* offsets; /* (V+1,): id i owns bytes[offsets[i] : offsets[i+1]], every id >= 1 byte */
  const uint8_t* bytes;   /* (N,) */
  int32_t min_token;      /* coefficient = code point + min_token */
  double scale;           /* > 0 */
  int32_t alphabet_max;   /* largest code point a coefficient may use */
  int32_t time_horizon;   /* T */
  int32_t action_dim;     /* D */
  int32_t dfa_states;     /* Q: UTF-8 DFA states (0 = char boundary); Q itself is the dead state */
  const int32_t* adv;     /* (Q, V): coefficients an id completes from each state */
  const int32_t* nxt;     /* (Q, V): state after the id (Q = invalid) */
  const uint8_t* reach;   /* (T*D+1, Q): 1 iff from state q exactly r more coefficients can complete */
  int32_t n_rows;         /* logits rows of the decoder head */
  const int32_t* head_ids;    /* (n_rows,): model (Qwen) id of each row; ties go to the lowest */
  const int32_t* action_rows; /* (V,): logits row of each FAST id */
  const double* idct_basis;   /* (T, T): orthonormal DCT-III, basis[t, k] */
  int32_t n_programs;
  const char* const* program_keys; /* (n_programs,) unnorm key each program serves ("" = the fixed chain) */
  const int32_t* program_lengths;  /* (n_programs,) ops per program */
  const nora_fast_op* ops;         /* all programs' ops back to back */
} nora_fast_tables;

typedef struct {
  int32_t version;      /* NORA_FAST_VERSION of the library */
  int32_t vocab_size, n_bytes, min_token, alphabet_max, time_horizon, action_dim, dfa_states, n_rows, n_programs;
  double scale;
  int32_t max_ids;      /* longest sequence constrained decoding can produce (4 * T * D + 1) */
  int32_t cuda_ready;   /* 1 once nora_fast_ctx_cuda_upload succeeded */
} nora_fast_info;

typedef struct nora_fast_ctx nora_fast_ctx;

/* ---- library ---------------------------------------------------------------------------------------------- */
NORA_FAST_API int nora_fast_version(void);
/* this thread's message for its last failing call ("" if none) */
NORA_FAST_API const char* nora_fast_last_error(void);
/* symbolic names: "ok", "id_out_of_range", ... (the Python reasons); NULL for an unknown code */
NORA_FAST_API const char* nora_fast_seq_status_name(int status);
NORA_FAST_API const char* nora_fast_sel_status_name(int status);
/* 1 if this build has the CUDA implementation and a device is visible, else 0 */
NORA_FAST_API int nora_fast_cuda_available(void);

/* ---- context ---------------------------------------------------------------------------------------------- */
/* Read a bundle's codec/native/ directory (native.txt + the binary arrays it names). */
NORA_FAST_API int nora_fast_ctx_open(const char* native_dir, nora_fast_ctx** out);
/* Build from memory (the arrays are validated and copied). */
NORA_FAST_API int nora_fast_ctx_create(const nora_fast_tables* tables, nora_fast_ctx** out);
NORA_FAST_API void nora_fast_ctx_free(nora_fast_ctx* ctx);
NORA_FAST_API int nora_fast_ctx_info(const nora_fast_ctx* ctx, nora_fast_info* out);
/* Index of the program for an unnorm key; key NULL works when there is exactly one program.
 * -1 (and NORA_FAST_E_UNKNOWN_KEY in *err when err is not NULL) otherwise. */
NORA_FAST_API int nora_fast_program(const nora_fast_ctx* ctx, const char* key, int* err);

/* ---- CPU (host pointers) ---------------------------------------------------------------------------------- */
/* One selection step for B rows.
 *   logits    (B, row_stride) float32, the first n_rows of each row used
 *   seen      optional (B, row_stride) uint8 in/out: rows already in the sequence (prompt included) for the
 *             repetition penalty; the chosen row is marked. NULL or penalty == 1: no penalty.
 *   done, pending  (B,) in/out automaton state; advanced where status is OK, unchanged otherwise
 *   out_id    (B,) chosen FAST id, -1 where status is not OK
 *   out_top   optional (B,) the model's own choice: the row of the best penalised score over all rows
 *   status    (B,) nora_fast_sel_status
 * Returns NORA_FAST_E_ROWS when some row's status is not OK. */
NORA_FAST_API int nora_fast_select(const nora_fast_ctx* ctx, int batch, const float* logits, int64_t row_stride,
                                   uint8_t* seen, float penalty, int32_t* done, int32_t* pending,
                                   int32_t* out_id, int32_t* out_top, int32_t* status);

/* Decode B FAST id sequences.
 *   ids       (B, id_stride) int32, sequence b holds lengths[b] ids
 *   program   from nora_fast_program, or -1 for normalized actions (no post-processing)
 *   actions   optional (B, T, D) float32; NaN in every element of a sequence whose status is not OK
 *   coeffs    optional (B, T*D) int32 integer DCT coefficients (0 where status is not OK)
 *   status    (B,) nora_fast_seq_status
 *   error_pos optional (B,): index of the id holding the first problem (-1 when OK or for a count/finite error)
 * NORA_FAST_SEQ_NOT_FINITE is only checked when actions is not NULL.
 * Returns NORA_FAST_E_ROWS when some sequence's status is not OK. */
NORA_FAST_API int nora_fast_decode(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                                   const int32_t* lengths, int program, float* actions, int32_t* coeffs,
                                   int32_t* status, int32_t* error_pos);

/* nora_fast_decode with float64 actions (B, T, D): the post program's float64 result, not rounded to float32
 * (what the runtimes hand a robot). CPU only. Since 1.1. */
NORA_FAST_API int nora_fast_decode_f64(const nora_fast_ctx* ctx, int batch, const int32_t* ids, int64_t id_stride,
                                       const int32_t* lengths, int program, double* actions, int32_t* coeffs,
                                       int32_t* status, int32_t* error_pos);

/* ---- automaton queries and the tie margin (CPU only; since 1.2) -------------------------------------------- */
/* Multi-token decoding (nora-edge's nora_edge/multitoken.py, nora_edge/drafts.py `admissible`): how long a prefix
 * of proposed FAST ids the constraint automaton accepts from (done, pending), advancing a copy of the state:
 * the walk stops at a complete state (done == T*D, nothing pending), at an id outside [0, V) and at the first
 * id not allowed. *out_count receives the prefix length; done / pending (may be NULL) the state after it.
 * NORA_FAST_E_ARGUMENT for a NULL ctx / out_count, n < 0, ids NULL with n > 0, or a state outside the automaton. */
NORA_FAST_API int nora_fast_admissible(const nora_fast_ctx* ctx, int32_t done, int32_t pending, const int32_t* ids,
                                       int n, int32_t* out_count, int32_t* out_done, int32_t* out_pending);

/* The top-2 gaps of one logits row (n_rows,) float32 after the repetition penalty (seen / penalty as in
 * nora_fast_select, not written): gap_all over every head row, gap_allowed over the FAST ids allowed in
 * (done, pending). Each gap is the float32 difference of the two largest scores (ties: 0); +inf with fewer than
 * two candidates; NaN when a candidate is NaN or the two largest are both +inf or both -inf (the values numpy's
 * top-2 gives). The caller compares min(gap_all, gap_allowed) with its margin. NORA_FAST_E_ARGUMENT for NULL
 * pointers, penalty <= 0 or a state outside the automaton. */
NORA_FAST_API int nora_fast_gap(const nora_fast_ctx* ctx, const float* logits, const uint8_t* seen, float penalty,
                                int32_t done, int32_t pending, float* gap_all, float* gap_allowed);

/* ---- CUDA (device pointers; same semantics as the CPU calls) ---------------------------------------------- */
/* Copy the tables to the current device (once per context). */
NORA_FAST_API int nora_fast_ctx_cuda_upload(nora_fast_ctx* ctx);
/* stream: a cudaStream_t (NULL = default stream). The calls are asynchronous: statuses are valid after the
 * stream synchronizes, and the return value covers launch errors only (NORA_FAST_E_ROWS is never returned).
 * Scratch is allocated per call with cudaMallocAsync on the stream (capturable in a CUDA graph; where the device
 * has no memory pools, plain cudaMalloc, which is not). The library leaves the pool's release threshold alone.
 * decode_cuda: lengths live on the device, so a length outside [0, id_stride] gives that sequence
 * NORA_FAST_SEQ_ID_OUT_OF_RANGE (error_pos -1) where the CPU call rejects the batch with NORA_FAST_E_ARGUMENT. */
NORA_FAST_API int nora_fast_select_cuda(const nora_fast_ctx* ctx, int batch, const float* logits,
                                        int64_t row_stride, uint8_t* seen, float penalty, int32_t* done,
                                        int32_t* pending, int32_t* out_id, int32_t* out_top, int32_t* status,
                                        void* stream);
NORA_FAST_API int nora_fast_decode_cuda(const nora_fast_ctx* ctx, int batch, const int32_t* ids,
                                        int64_t id_stride, const int32_t* lengths, int program, float* actions,
                                        int32_t* coeffs, int32_t* status, int32_t* error_pos, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* NORA_FAST_H */
