/* gpu_check.c — nora_fast's CUDA implementation against its CPU implementation, on a generated corpus; timings.
 *
 * Usage: gpu_check NATIVE_DIR [--seed N]
 * Data flow
 *   NATIVE_DIR (a bundle's codec/native/) --nora_fast_ctx_open--> context A
 *   + a synthetic context B (nora_fast_ctx_create: random automaton, ids with ASCII / multi-byte / invalid bytes,
 *     programs incl. one that overflows float32 -> not_finite)
 *   deterministic PRNG (splitmix64) --> select corpus: logits (random, ties, NaN / +inf / all -inf rows, padded
 *     strides), seen masks, states (snapshots of random CPU-constrained walks from (0, 0), completed states,
 *     random and invalid states), penalties 1 / 1.3 / 0.7, out_top on/off, 3 consecutive steps
 *   --> decode corpus: constrained walks (valid chunks) + mutations (replace, out-of-range id, truncate, append,
 *     swap) + random junk, every program and -1, actions / coeffs requested or not
 *   --> nora_fast_select / nora_fast_decode (host) and the _cuda calls (cudaMalloc'd copies of the same inputs)
 *   --> one line per check: "PASS|FAIL <name> <n compared> ..." (ids, states, tops, statuses, seen, coeffs,
 *     error_pos exact; actions both NaN or |diff| <= 1e-6 * max(1, |cpu|)); then timings. Exit 1 on any FAIL.
 * Built against libnora_fast_cuda.so (make gpu-check) or, with -DNORA_CUDA_SHIM, against the CPU shim build
 * (make gpu-check-shim): the same kernels run on the host, "device" memory is host memory, timings meaningless.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_shim.h"
#include "nora_fast.h"

#ifdef NORA_CUDA_SHIM
#define REPS(n) 2
#else
#define REPS(n) (n)
#endif

static int g_failures = 0;
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

/* ---- utilities -------------------------------------------------------------------------------------------- */
static uint64_t rnd(void) { /* splitmix64 (Steele, Lea, Flood 2014) */
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static int32_t rndi(int64_t n) { return (int32_t)(rnd() % (uint64_t)n); }
static double rndu(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "gpu_check: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(2);
}

static void ck(cudaError_t e, const char* file, int line, const char* what) {
  if (e != cudaSuccess) die("%s:%d %s: %s", file, line, what, cudaGetErrorString(e));
}
#define CK(x) ck((x), __FILE__, __LINE__, #x)

static void* xmalloc(size_t n) {
  void* p = calloc(n ? n : 1, 1);
  if (!p) die("out of memory (%zu bytes)", n);
  return p;
}
static void* dev_alloc(size_t n) {
  void* p = NULL;
  CK(cudaMalloc(&p, n ? n : 1));
  return p;
}
static void* dev_copy(const void* h, size_t n) {
  void* p = dev_alloc(n);
  if (h && n) CK(cudaMemcpy(p, h, n, cudaMemcpyHostToDevice));
  return p;
}
static void to_host(void* h, const void* d, size_t n) {
  if (n) CK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
}

static void report(int ok, const char* name, long long compared, const char* fmt, ...) {
  char extra[256] = "";
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(extra, sizeof extra, fmt, ap);
  va_end(ap);
  if (!ok || compared <= 0) ++g_failures;
  printf("%s %s %lld %s\n", ok && compared > 0 ? "PASS" : "FAIL", name, compared, extra);
  fflush(stdout);
}

/* mismatches between two int32 arrays */
static long long diff_i32(const int32_t* a, const int32_t* b, int64_t n) {
  long long bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += a[i] != b[i];
  return bad;
}
static long long diff_u8(const uint8_t* a, const uint8_t* b, int64_t n) {
  long long bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += a[i] != b[i];
  return bad;
}

/* ---- a context and what the checks know about it ------------------------------------------------------------ */
typedef struct {
  const char* name;
  nora_fast_ctx* ctx;
  nora_fast_info in;
  int32_t total;
  int32_t n_states; /* state pool: snapshots of constrained walks */
  int32_t* pool_done;
  int32_t* pool_pending;
  int32_t n_seq; /* id sequences (n_seq, max_ids) from constrained walks, and their lengths */
  int32_t* seq;
  int32_t* seq_len;
  int32_t ascii_ids; /* ids [0, ascii_ids) are one printable ASCII char each (synthetic context), else 0 */
} subject;

static void fill_logits(float* row, int64_t stride, int32_t n_rows) {
  int kind = rndi(12);
  for (int64_t r = 0; r < stride; ++r) row[r] = r < n_rows ? (float)(16.0 * rndu() - 8.0) : NAN; /* padding: NaN */
  switch (kind) {
    case 0: /* ties among a few levels */
      for (int32_t r = 0; r < n_rows; ++r) row[r] = (float)(rndi(4) - 1) * 0.5f;
      break;
    case 1: /* one constant everywhere */
      for (int32_t r = 0; r < n_rows; ++r) row[r] = 0.25f;
      break;
    case 2: /* NaN somewhere */
      row[rndi(n_rows)] = NAN;
      break;
    case 3: /* +inf somewhere */
      row[rndi(n_rows)] = INFINITY;
      break;
    case 4: /* all -inf */
      for (int32_t r = 0; r < n_rows; ++r) row[r] = -INFINITY;
      break;
    case 5: /* mostly -inf, a few finite */
      for (int32_t r = 0; r < n_rows; ++r) row[r] = rndi(50) ? -INFINITY : (float)rndu();
      break;
    case 6: /* several NaN */
      for (int i = 0; i < 5; ++i) row[rndi(n_rows)] = NAN;
      break;
    default:
      break;
  }
}

/* CPU constrained walks from (0, 0) with random logits: ids of every row until it completes, and a snapshot of
 * each row's state after a random number of steps (the state pool). */
static void build_walks(subject* s, int32_t rows) {
  int32_t n_rows = s->in.n_rows, max_ids = s->in.max_ids;
  float* logits = (float*)xmalloc((size_t)rows * n_rows * sizeof(float));
  int32_t *done = (int32_t*)xmalloc(rows * 4u), *pending = (int32_t*)xmalloc(rows * 4u);
  int32_t *id = (int32_t*)xmalloc(rows * 4u), *st = (int32_t*)xmalloc(rows * 4u);
  int32_t* target = (int32_t*)xmalloc(rows * 4u);
  s->n_seq = s->n_states = rows;
  s->seq = (int32_t*)xmalloc((size_t)rows * max_ids * 4u);
  s->seq_len = (int32_t*)xmalloc(rows * 4u);
  s->pool_done = (int32_t*)xmalloc(rows * 4u);
  s->pool_pending = (int32_t*)xmalloc(rows * 4u);
  for (int32_t b = 0; b < rows; ++b) target[b] = rndi(max_ids + 1);
  for (int32_t step = 0; step <= max_ids; ++step) {
    int active = 0;
    for (int32_t b = 0; b < rows; ++b) {
      if (target[b] == step) s->pool_done[b] = done[b], s->pool_pending[b] = pending[b];
      for (int32_t r = 0; r < n_rows; ++r) logits[(int64_t)b * n_rows + r] = (float)rndu();
    }
    if (step == max_ids) break;
    nora_fast_select(s->ctx, rows, logits, n_rows, NULL, 1.0f, done, pending, id, NULL, st);
    for (int32_t b = 0; b < rows; ++b)
      if (st[b] == NORA_FAST_SEL_OK) s->seq[(int64_t)b * max_ids + s->seq_len[b]++] = id[b], active = 1;
    if (!active) {
      for (int32_t b = 0; b < rows; ++b)
        if (target[b] > step) s->pool_done[b] = done[b], s->pool_pending[b] = pending[b];
      break;
    }
  }
  /* a random automaton rarely walks into a decodable chunk: give half the rows exactly T*D ASCII chars */
  for (int32_t b = 0; s->ascii_ids > 0 && b < rows; b += 2) {
    s->seq_len[b] = s->total;
    for (int32_t i = 0; i < s->total; ++i) s->seq[(int64_t)b * max_ids + i] = rndi(s->ascii_ids);
  }
  free(logits), free(done), free(pending), free(id), free(st), free(target);
}

/* ---- select ------------------------------------------------------------------------------------------------- */
static void check_select(subject* s, int batch, int pad, float penalty, int with_seen, int with_top, int steps) {
  int32_t n_rows = s->in.n_rows, Q = s->in.dfa_states, total = s->total;
  int64_t stride = n_rows + pad, nl = (int64_t)batch * stride;
  float* logits = (float*)xmalloc(nl * sizeof(float));
  uint8_t *seen_c = (uint8_t*)xmalloc(nl), *seen_g = (uint8_t*)xmalloc(nl);
  int32_t* h[2][5]; /* [cpu, gpu][done, pending, id, top, status] */
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < 5; ++j) h[k][j] = (int32_t*)xmalloc(batch * 4u);
  for (int32_t b = 0; b < batch; ++b) {
    int kind = rndi(20);
    int32_t p = rndi(s->n_states), d = s->pool_done[p], q = s->pool_pending[p];
    if (kind == 0) d = -1 - rndi(3);           /* invalid states */
    else if (kind == 1) d = total + 1 + rndi(3);
    else if (kind == 2) q = Q + rndi(2);
    else if (kind == 3) q = -1;
    else if (kind == 4) d = rndi(total + 1), q = rndi(Q); /* in range, maybe unreachable */
    h[0][0][b] = h[1][0][b] = d;
    h[0][1][b] = h[1][1][b] = q;
  }
  for (int64_t i = 0; i < nl; ++i) seen_c[i] = rndi(5) == 0;
  uint8_t* seen_arg = with_seen ? seen_c : NULL;
  float* d_logits = (float*)dev_alloc(nl * sizeof(float));
  uint8_t* d_seen = (uint8_t*)dev_copy(seen_c, nl);
  int32_t* d[5];
  for (int j = 0; j < 5; ++j) d[j] = (int32_t*)dev_copy(h[1][j], batch * 4u);
  long long bad = 0, compared = 0, ok_rows = 0;
  int rc_bad = 0;
  for (int step = 0; step < steps; ++step) {
    for (int32_t b = 0; b < batch; ++b) fill_logits(logits + b * stride, stride, n_rows);
    CK(cudaMemcpy(d_logits, logits, nl * sizeof(float), cudaMemcpyHostToDevice));
    int rc_c = nora_fast_select(s->ctx, batch, logits, stride, seen_arg, penalty, h[0][0], h[0][1], h[0][2],
                                with_top ? h[0][3] : NULL, h[0][4]);
    int rc_g = nora_fast_select_cuda(s->ctx, batch, d_logits, stride, with_seen ? d_seen : NULL, penalty, d[0], d[1],
                                     d[2], with_top ? d[3] : NULL, d[4], NULL);
    CK(cudaDeviceSynchronize());
    if (rc_g != NORA_FAST_OK || (rc_c != NORA_FAST_OK && rc_c != NORA_FAST_E_ROWS)) {
      rc_bad = 1;
      fprintf(stderr, "select rc cpu %d cuda %d: %s\n", rc_c, rc_g, nora_fast_last_error());
    }
    for (int j = 0; j < 5; ++j) to_host(h[1][j], d[j], batch * 4u);
    for (int j = 0; j < 5; ++j) {
      if (j == 3 && !with_top) continue;
      bad += diff_i32(h[0][j], h[1][j], batch);
      compared += batch;
    }
    for (int32_t b = 0; b < batch; ++b) ok_rows += h[0][4][b] == NORA_FAST_SEL_OK;
  }
  if (with_seen) {
    to_host(seen_g, d_seen, nl);
    bad += diff_u8(seen_c, seen_g, nl);
    compared += nl;
  }
  char name[128];
  snprintf(name, sizeof name, "select/%s/b%d/pad%d/pen%g/seen%d/top%d", s->name, batch, pad, penalty, with_seen,
           with_top);
  report(!bad && !rc_bad, name, compared, "mismatches=%lld ok_rows=%lld steps=%d", bad, ok_rows, steps);
  free(logits), free(seen_c), free(seen_g);
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < 5; ++j) free(h[k][j]);
  CK(cudaFree(d_logits)), CK(cudaFree(d_seen));
  for (int j = 0; j < 5; ++j) CK(cudaFree(d[j]));
}

/* ---- decode ------------------------------------------------------------------------------------------------- */
typedef struct {
  int32_t batch, stride;
  int32_t* ids;     /* (batch, stride) */
  int32_t* lengths; /* (batch,) */
} id_corpus;

static id_corpus build_ids(const subject* s, int32_t batch) {
  int32_t V = s->in.vocab_size, max_ids = s->in.max_ids;
  id_corpus c;
  c.batch = batch;
  c.stride = max_ids + 3;
  c.ids = (int32_t*)xmalloc((size_t)batch * c.stride * 4u);
  c.lengths = (int32_t*)xmalloc(batch * 4u);
  for (int32_t b = 0; b < batch; ++b) {
    int32_t* row = c.ids + (int64_t)b * c.stride;
    for (int32_t i = 0; i < c.stride; ++i) row[i] = INT32_MIN + i; /* padding past the length: never read */
    int32_t w = rndi(s->n_seq), len = s->seq_len[w];
    memcpy(row, s->seq + (int64_t)w * max_ids, (size_t)len * 4u);
    int kind = rndi(10);
    if (kind == 1 && len > 0) row[rndi(len)] = rndi(V); /* replace */
    else if (kind == 2 && len > 0) row[rndi(len)] = rndi(2) ? -1 - rndi(5) : V + rndi(5); /* out of range */
    else if (kind == 3 && len > 0) len = rndi(len); /* truncate */
    else if (kind == 4 && len < c.stride) row[len++] = rndi(V); /* append */
    else if (kind == 5 && len > 1) {
      int32_t i = rndi(len), j = rndi(len), t = row[i];
      row[i] = row[j], row[j] = t;
    } else if (kind >= 6 && kind <= 7) { /* random junk */
      len = rndi(c.stride + 1);
      for (int32_t i = 0; i < len; ++i) row[i] = rndi(V);
    } else if (kind == 8 && rndi(4) == 0) {
      len = 0;
    }
    c.lengths[b] = len;
  }
  return c;
}

static void check_decode(const subject* s, const id_corpus* c, int program, int want_actions, int want_coeffs) {
  int32_t B = c->batch, total = s->total;
  size_t na = (size_t)B * total;
  float *a_c = (float*)xmalloc(na * 4), *a_g = (float*)xmalloc(na * 4);
  int32_t *k_c = (int32_t*)xmalloc(na * 4), *k_g = (int32_t*)xmalloc(na * 4);
  int32_t *st_c = (int32_t*)xmalloc(B * 4u), *st_g = (int32_t*)xmalloc(B * 4u);
  int32_t *ep_c = (int32_t*)xmalloc(B * 4u), *ep_g = (int32_t*)xmalloc(B * 4u);
  int32_t* d_ids = (int32_t*)dev_copy(c->ids, (size_t)B * c->stride * 4u);
  int32_t* d_len = (int32_t*)dev_copy(c->lengths, B * 4u);
  float* d_a = (float*)dev_alloc(na * 4);
  int32_t *d_k = (int32_t*)dev_alloc(na * 4), *d_st = (int32_t*)dev_alloc(B * 4u), *d_ep = (int32_t*)dev_alloc(B * 4u);
  int rc_c = nora_fast_decode(s->ctx, B, c->ids, c->stride, c->lengths, program, want_actions ? a_c : NULL,
                              want_coeffs ? k_c : NULL, st_c, ep_c);
  int rc_g = nora_fast_decode_cuda(s->ctx, B, d_ids, c->stride, d_len, program, want_actions ? d_a : NULL,
                                   want_coeffs ? d_k : NULL, d_st, d_ep, NULL);
  CK(cudaDeviceSynchronize());
  int rc_bad = rc_g != NORA_FAST_OK || (rc_c != NORA_FAST_OK && rc_c != NORA_FAST_E_ROWS);
  if (rc_bad) fprintf(stderr, "decode rc cpu %d cuda %d: %s\n", rc_c, rc_g, nora_fast_last_error());
  to_host(st_g, d_st, B * 4u), to_host(ep_g, d_ep, B * 4u);
  long long bad = diff_i32(st_c, st_g, B) + diff_i32(ep_c, ep_g, B), compared = 2LL * B, exact = 0;
  if (want_coeffs) {
    to_host(k_g, d_k, na * 4);
    bad += diff_i32(k_c, k_g, (int64_t)na);
    compared += (long long)na;
  }
  double worst = 0.0;
  if (want_actions) {
    to_host(a_g, d_a, na * 4);
    for (size_t i = 0; i < na; ++i) {
      float x = a_c[i], y = a_g[i];
      if (isnan(x) || isnan(y)) {
        bad += !(isnan(x) && isnan(y));
      } else {
        double diff = fabs((double)x - (double)y), tol = 1e-6 * fmax(1.0, fabs((double)x));
        bad += diff > tol;
        exact += x == y;
        if (diff > worst) worst = diff;
      }
    }
    compared += (long long)na;
  }
  int hist[6] = {0};
  for (int32_t b = 0; b < B; ++b)
    if (st_c[b] >= 0 && st_c[b] < 6) hist[st_c[b]]++;
  char name[128];
  snprintf(name, sizeof name, "decode/%s/prog%d/actions%d/coeffs%d", s->name, program, want_actions, want_coeffs);
  report(!bad && !rc_bad, name, compared,
         "mismatches=%lld exact_actions=%lld max_abs_diff=%.3g"
         " status[ok,range,utf8,alpha,count,finite]=%d,%d,%d,%d,%d,%d",
         bad, exact, worst, hist[0], hist[1], hist[2], hist[3], hist[4], hist[5]);
  free(a_c), free(a_g), free(k_c), free(k_g), free(st_c), free(st_g), free(ep_c), free(ep_g);
  CK(cudaFree(d_ids)), CK(cudaFree(d_len)), CK(cudaFree(d_a)), CK(cudaFree(d_k)), CK(cudaFree(d_st));
  CK(cudaFree(d_ep));
}

/* CUDA-only: a length outside [0, id_stride] (the CPU call refuses the whole batch) is id_out_of_range, pos -1 */
static void check_bad_lengths(const subject* s) {
  int32_t ids[8] = {0}, len[3] = {-1, 9, 0}, st[3], ep[3];
  int32_t *d_ids = (int32_t*)dev_copy(ids, sizeof ids), *d_len = (int32_t*)dev_copy(len, sizeof len);
  int32_t *d_st = (int32_t*)dev_alloc(sizeof st), *d_ep = (int32_t*)dev_alloc(sizeof ep);
  int rc = nora_fast_decode_cuda(s->ctx, 3, d_ids, 8, d_len, -1, NULL, NULL, d_st, d_ep, NULL);
  CK(cudaDeviceSynchronize());
  to_host(st, d_st, sizeof st), to_host(ep, d_ep, sizeof ep);
  int rc_cpu = nora_fast_decode(s->ctx, 3, ids, 8, len, -1, NULL, NULL, st, ep); /* st/ep not read after this */
  to_host(st, d_st, sizeof st), to_host(ep, d_ep, sizeof ep);
  int ok = rc == NORA_FAST_OK && rc_cpu == NORA_FAST_E_ARGUMENT && st[0] == NORA_FAST_SEQ_ID_OUT_OF_RANGE &&
           st[1] == NORA_FAST_SEQ_ID_OUT_OF_RANGE && ep[0] == -1 && ep[1] == -1 && st[2] == NORA_FAST_SEQ_WRONG_COUNT;
  report(ok, "decode/bad_lengths_cuda", 3, "status=%d,%d,%d cpu_rc=%d", st[0], st[1], st[2], rc_cpu);
  CK(cudaFree(d_ids)), CK(cudaFree(d_len)), CK(cudaFree(d_st)), CK(cudaFree(d_ep));
}

/* ---- the synthetic context ---------------------------------------------------------------------------------- */
static nora_fast_ctx* synthetic_ctx(void) {
  enum { V = 1500, EXTRA = 613, Q = 4, T = 5, D = 4 };
  const int32_t total = T * D, n_rows = V + EXTRA;
  int32_t* offsets = (int32_t*)xmalloc((V + 1) * 4);
  uint8_t* bytes = (uint8_t*)xmalloc(V * 3);
  int32_t n = 0;
  for (int32_t i = 0; i < V; ++i) {
    offsets[i] = n;
    int kind = i < 95 ? -1 : rndi(20);
    if (kind < 0) { /* every printable ASCII char as one id */
      bytes[n++] = (uint8_t)(0x20 + i);
    } else if (kind < 13) {
      for (int32_t k = 0, len = 1 + rndi(3); k < len; ++k) bytes[n++] = (uint8_t)(0x20 + rndi(95));
    } else if (kind < 15) { /* a two-byte char U+0080..U+00FF (some above alphabet_max) */
      int32_t cp = 0x80 + rndi(0x80);
      bytes[n++] = (uint8_t)(0xC0 | (cp >> 6)), bytes[n++] = (uint8_t)(0x80 | (cp & 0x3F));
    } else if (kind == 15) {
      bytes[n++] = (uint8_t)(0xC2 + rndi(2)); /* lone lead byte */
    } else if (kind == 16) {
      bytes[n++] = (uint8_t)(0x80 + rndi(0x40)); /* continuation byte */
    } else if (kind == 17) {
      static const uint8_t bad[4] = {0xFF, 0xC0, 0xE0, 0xED};
      bytes[n++] = bad[rndi(4)], bytes[n++] = (uint8_t)(0x80 + rndi(0x40));
    } else {
      bytes[n++] = (uint8_t)(0x20 + rndi(95)), bytes[n++] = (uint8_t)(0xC2 + rndi(2));
    }
  }
  offsets[V] = n;
  int32_t *adv = (int32_t*)xmalloc(Q * V * 4), *nxt = (int32_t*)xmalloc(Q * V * 4);
  for (int32_t k = 0; k < Q * V; ++k) adv[k] = rndi(3), nxt[k] = rndi(4) ? rndi(Q) : Q;
  uint8_t* reach = (uint8_t*)xmalloc((total + 1) * Q);
  for (int32_t k = 0; k < (total + 1) * Q; ++k) reach[k] = rndi(10) < 7;
  reach[total * Q] = 1;
  int32_t *head_ids = (int32_t*)xmalloc(n_rows * 4), *action_rows = (int32_t*)xmalloc(V * 4);
  for (int32_t r = 0; r < n_rows; ++r) head_ids[r] = 151000 - 7 * r + rndi(3); /* some equal keys */
  for (int32_t i = 0; i < V; ++i) action_rows[i] = rndi(100) ? (i * 7 + 3) % n_rows : rndi(n_rows); /* a few shared */
  double* basis = (double*)xmalloc(T * T * 8);
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < T; ++k)
      basis[t * T + k] = sqrt((k == 0 ? 1.0 : 2.0) / T) * cos(3.14159265358979323846 * (2 * t + 1) * k / (2.0 * T));
  static const char* keys[3] = {"", "overflow", "empty"};
  int32_t lengths[3] = {5, 2, 0};
  nora_fast_op ops[7] = {{NORA_FAST_OP_RANGE, 0, -0.5, 2.0},  {NORA_FAST_OP_AFFINE, 1, 2.0, -1.0},
                         {NORA_FAST_OP_SCALE, 2, -1.5, 0.0},  {NORA_FAST_OP_SIGN, 3, 0.0, 0.0},
                         {NORA_FAST_OP_AFFINE, 3, 0.5, 0.25}, {NORA_FAST_OP_AFFINE, 2, 1e300, 0.0},
                         {NORA_FAST_OP_SIGN, 1, 0.0, 0.0}};
  nora_fast_tables t = {V, n, offsets, bytes, -64, 10.0, 200, T, D, Q, adv, nxt, reach, n_rows, head_ids,
                        action_rows, basis, 3, keys, lengths, ops};
  nora_fast_ctx* ctx = NULL;
  if (nora_fast_ctx_create(&t, &ctx)) die("synthetic context: %s", nora_fast_last_error());
  free(offsets), free(bytes), free(adv), free(nxt), free(reach), free(head_ids), free(action_rows), free(basis);
  return ctx;
}

/* ---- timings ------------------------------------------------------------------------------------------------ */
/* per-token select: CPU wall time and CUDA (event time and host wall time incl. launches), `steps` tokens */
static void time_select(subject* s, int batch, const char* label) {
  int32_t n_rows = s->in.n_rows, steps = 32, reps = REPS(20);
  int64_t nl = (int64_t)batch * n_rows;
  float* logits = (float*)xmalloc(nl * 4);
  for (int64_t i = 0; i < nl; ++i) logits[i] = (float)rndu();
  uint8_t* seen = (uint8_t*)xmalloc(nl);
  int32_t *done = (int32_t*)xmalloc(batch * 4u), *pending = (int32_t*)xmalloc(batch * 4u);
  int32_t *id = (int32_t*)xmalloc(batch * 4u), *top = (int32_t*)xmalloc(batch * 4u);
  int32_t* st = (int32_t*)xmalloc(batch * 4u);
  double cpu = 0;
  for (int r = 0; r < reps; ++r) {
    memset(done, 0, batch * 4u), memset(pending, 0, batch * 4u), memset(seen, 0, nl);
    double t0 = now_s();
    for (int k = 0; k < steps; ++k)
      nora_fast_select(s->ctx, batch, logits, n_rows, seen, 1.3f, done, pending, id, top, st);
    cpu += now_s() - t0;
  }
  float* d_logits = (float*)dev_copy(logits, nl * 4);
  uint8_t* d_seen = (uint8_t*)dev_alloc(nl);
  int32_t *d_done = (int32_t*)dev_alloc(batch * 4u), *d_pending = (int32_t*)dev_alloc(batch * 4u);
  int32_t *d_id = (int32_t*)dev_alloc(batch * 4u), *d_top = (int32_t*)dev_alloc(batch * 4u);
  int32_t* d_st = (int32_t*)dev_alloc(batch * 4u);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)), CK(cudaEventCreate(&e1));
  double wall = 0, ev = 0;
  for (int r = 0; r < reps + 1; ++r) { /* rep 0: warm-up */
    CK(cudaMemset(d_done, 0, batch * 4u)), CK(cudaMemset(d_pending, 0, batch * 4u)), CK(cudaMemset(d_seen, 0, nl));
    CK(cudaDeviceSynchronize());
    double t0 = now_s();
    CK(cudaEventRecord(e0, NULL));
    for (int k = 0; k < steps; ++k)
      if (nora_fast_select_cuda(s->ctx, batch, d_logits, n_rows, d_seen, 1.3f, d_done, d_pending, d_id, d_top, d_st,
                                NULL))
        die("select_cuda: %s", nora_fast_last_error());
    CK(cudaEventRecord(e1, NULL));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r > 0) wall += now_s() - t0, ev += ms * 1e-3;
  }
  double n = (double)reps * steps;
  printf("TIME select/%s b%d %s: cpu %.2f us/token, cuda %.2f us/token (events), %.2f us/token (host wall)\n",
         s->name, batch, label, 1e6 * cpu / n, 1e6 * ev / n, 1e6 * wall / n);
  CK(cudaEventDestroy(e0)), CK(cudaEventDestroy(e1));
  free(logits), free(seen), free(done), free(pending), free(id), free(top), free(st);
  CK(cudaFree(d_logits)), CK(cudaFree(d_seen)), CK(cudaFree(d_done)), CK(cudaFree(d_pending)), CK(cudaFree(d_id));
  CK(cudaFree(d_top)), CK(cudaFree(d_st));
}

static void time_decode(subject* s, int32_t batch, int program) {
  id_corpus c = build_ids(s, batch);
  int32_t total = s->total, reps = REPS(20);
  size_t na = (size_t)batch * total;
  float* a = (float*)xmalloc(na * 4);
  int32_t *k = (int32_t*)xmalloc(na * 4), *st = (int32_t*)xmalloc(batch * 4u);
  double t0 = now_s();
  for (int r = 0; r < reps; ++r) nora_fast_decode(s->ctx, batch, c.ids, c.stride, c.lengths, program, a, k, st, NULL);
  double cpu = (now_s() - t0) / reps;
  int32_t* d_ids = (int32_t*)dev_copy(c.ids, (size_t)batch * c.stride * 4u);
  int32_t* d_len = (int32_t*)dev_copy(c.lengths, batch * 4u);
  float* d_a = (float*)dev_alloc(na * 4);
  int32_t *d_k = (int32_t*)dev_alloc(na * 4), *d_st = (int32_t*)dev_alloc(batch * 4u);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)), CK(cudaEventCreate(&e1));
  nora_fast_decode_cuda(s->ctx, batch, d_ids, c.stride, d_len, program, d_a, d_k, d_st, NULL, NULL); /* warm-up */
  CK(cudaDeviceSynchronize());
  CK(cudaEventRecord(e0, NULL));
  for (int r = 0; r < reps; ++r)
    if (nora_fast_decode_cuda(s->ctx, batch, d_ids, c.stride, d_len, program, d_a, d_k, d_st, NULL, NULL))
      die("decode_cuda: %s", nora_fast_last_error());
  CK(cudaEventRecord(e1, NULL));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  printf("TIME decode/%s %d chunks prog%d: cpu %.1f us, cuda %.1f us (events)\n", s->name, batch, program, 1e6 * cpu,
         1e3 * ms / reps);
  CK(cudaEventDestroy(e0)), CK(cudaEventDestroy(e1));
  free(a), free(k), free(st), free(c.ids), free(c.lengths);
  CK(cudaFree(d_ids)), CK(cudaFree(d_len)), CK(cudaFree(d_a)), CK(cudaFree(d_k)), CK(cudaFree(d_st));
}

#ifndef NORA_CUDA_SHIM
/* A CUDA graph of `steps` batch-1 select calls (captured once, replayed): timing, and the replay's result equals
 * the CPU running the same steps. */
static void graph_select(subject* s) {
  int32_t n_rows = s->in.n_rows, steps = 16, reps = 50;
  float* logits = (float*)xmalloc(n_rows * 4u);
  for (int32_t r = 0; r < n_rows; ++r) logits[r] = (float)rndu();
  uint8_t* seen = (uint8_t*)xmalloc(n_rows);
  int32_t h[5] = {0}, g[5] = {0}, zero[2] = {0, 0}; /* done, pending, id, top, status */
  float* d_logits = (float*)dev_copy(logits, n_rows * 4u);
  uint8_t* d_seen = (uint8_t*)dev_copy(seen, n_rows);
  int32_t* d = (int32_t*)dev_copy(g, sizeof g);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int k = 0; k < steps; ++k)
    if (nora_fast_select_cuda(s->ctx, 1, d_logits, n_rows, d_seen, 1.3f, d, d + 1, d + 2, d + 3, d + 4, st))
      die("select_cuda under capture: %s", nora_fast_last_error());
  CK(cudaStreamEndCapture(st, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  CK(cudaGraphLaunch(exec, st));
  CK(cudaStreamSynchronize(st));
  to_host(g, d, sizeof g);
  for (int k = 0; k < steps; ++k)
    nora_fast_select(s->ctx, 1, logits, n_rows, seen, 1.3f, h, h + 1, h + 2, h + 3, h + 4);
  uint8_t* seen_g = (uint8_t*)xmalloc(n_rows);
  to_host(seen_g, d_seen, n_rows);
  long long bad = diff_i32(h, g, 5) + diff_u8(seen, seen_g, n_rows);
  report(!bad, "graph/select_b1", 5 + n_rows, "steps=%d mismatches=%lld", steps, bad);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)), CK(cudaEventCreate(&e1));
  double wall = 0, ev = 0;
  for (int r = 0; r < reps; ++r) {
    CK(cudaMemcpyAsync(d, zero, sizeof zero, cudaMemcpyHostToDevice, st));
    CK(cudaStreamSynchronize(st));
    double t0 = now_s();
    CK(cudaEventRecord(e0, st));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    wall += now_s() - t0;
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ev += ms * 1e-3;
  }
  printf("TIME graph select/%s b1: %.2f us/token (events), %.2f us/token (host wall), %d tokens per graph\n",
         s->name, 1e6 * ev / (reps * steps), 1e6 * wall / (reps * steps), steps);
  CK(cudaEventDestroy(e0)), CK(cudaEventDestroy(e1));
  CK(cudaGraphExecDestroy(exec)), CK(cudaGraphDestroy(graph)), CK(cudaStreamDestroy(st));
  CK(cudaFree(d_logits)), CK(cudaFree(d_seen)), CK(cudaFree(d));
  free(logits), free(seen), free(seen_g);
}
#endif

/* ---- main --------------------------------------------------------------------------------------------------- */
static void run_subject(subject* s, int walk_rows) {
  if (nora_fast_ctx_info(s->ctx, &s->in)) die("%s: %s", s->name, nora_fast_last_error());
  s->total = s->in.time_horizon * s->in.action_dim;
  if (nora_fast_ctx_cuda_upload(s->ctx)) die("%s: upload: %s", s->name, nora_fast_last_error());
  build_walks(s, walk_rows);
  static const float penalties[3] = {1.0f, 1.3f, 0.7f};
  for (int i = 0; i < 3; ++i)
    for (int cfg = 0; cfg < 4; ++cfg) check_select(s, 257, cfg & 1 ? 5 : 0, penalties[i], cfg & 1, cfg >> 1, 3);
  check_select(s, 1, 0, 1.3f, 1, 1, 8);
  check_select(s, 1024, 3, 1.3f, 1, 1, 2);
  id_corpus c = build_ids(s, 1024);
  for (int p = -1; p < s->in.n_programs; ++p) check_decode(s, &c, p, 1, 1);
  check_decode(s, &c, s->in.n_programs - 1, 1, 0);
  check_decode(s, &c, -1, 0, 1);
  check_decode(s, &c, -1, 0, 0);
  free(c.ids), free(c.lengths);
}

int main(int argc, char** argv) {
  if (argc < 2) die("usage: gpu_check NATIVE_DIR [--seed N]");
  if (argc >= 4 && strcmp(argv[2], "--seed") == 0) g_rng = strtoull(argv[3], NULL, 10);
  double t_start = now_s();
#ifdef NORA_CUDA_SHIM
  printf("gpu_check: CPU shim build (kernels run sequentially on the host; timings are not GPU timings)\n");
#else
  struct cudaDeviceProp prop;
  int dev = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  printf("gpu_check: device %d %s (sm_%d%d), CUDA runtime built %d\n", dev, prop.name, prop.major, prop.minor,
         CUDART_VERSION);
#endif
  if (!nora_fast_cuda_available()) die("nora_fast_cuda_available() = 0");
  subject real = {0}, synth = {0};
  real.name = "native";
  if (nora_fast_ctx_open(argv[1], &real.ctx)) die("%s", nora_fast_last_error());
  /* argument errors before anything runs: not uploaded, bad penalty, bad program */
  {
    int32_t x[1] = {0};
    float l[1] = {0};
    int rc1 = nora_fast_select_cuda(real.ctx, 1, l, 1 << 20, NULL, 1.0f, x, x, x, NULL, x, NULL);
    int rc2 = nora_fast_select_cuda(real.ctx, 1, l, 1 << 20, NULL, 0.0f, x, x, x, NULL, x, NULL);
    int rc3 = nora_fast_decode_cuda(real.ctx, 1, x, 1, x, 99, NULL, NULL, x, NULL, NULL);
    report(rc1 == NORA_FAST_E_CUDA && rc2 == NORA_FAST_E_ARGUMENT && rc3 == NORA_FAST_E_ARGUMENT, "errors/arguments",
           3, "not_uploaded=%d penalty0=%d program99=%d", rc1, rc2, rc3);
  }
  run_subject(&real, 512);
  check_bad_lengths(&real);
  synth.name = "synthetic";
  synth.ctx = synthetic_ctx();
  synth.ascii_ids = 95;
  run_subject(&synth, 256);
  printf("checks done in %.1f s, %d failed\n", now_s() - t_start, g_failures);
  time_select(&real, 1, "pool default");
  time_select(&real, 1024, "pool default");
#ifndef NORA_CUDA_SHIM
  { /* keep freed scratch in the default pool across synchronizations (see fast_cuda.cu) */
    cudaMemPool_t pool;
    uint64_t keep = UINT64_MAX;
    CK(cudaDeviceGetDefaultMemPool(&pool, 0));
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  }
  time_select(&real, 1, "pool kept");
  time_select(&real, 1024, "pool kept");
  graph_select(&real);
#endif
  time_decode(&real, 1024, 0);
  time_decode(&real, 1024, -1);
  nora_fast_ctx_free(real.ctx);
  nora_fast_ctx_free(synth.ctx);
  free(real.seq), free(real.seq_len), free(real.pool_done), free(real.pool_pending);
  free(synth.seq), free(synth.seq_len), free(synth.pool_done), free(synth.pool_pending);
  printf("gpu_check: %d failed, %.1f s\n", g_failures, now_s() - t_start);
  return g_failures ? 1 : 0;
}
