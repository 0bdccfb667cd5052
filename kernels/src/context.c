/* context.c — building a nora_fast context: from a bundle's codec/native/ directory or from memory.
 *
 * Data flow: native.txt (format line, sizes, FAST parameters, post-processing programs)
 *   + little-endian arrays (fast_offsets.i32, fast_bytes.u8, automaton_adv.i32, automaton_nxt.i32,
 *     automaton_reach.u8, head_ids.i32, action_rows.i32, idct_basis.f64)
 *   --read, size-checked against native.txt--> nora_fast_tables --nora_fast_ctx_create: validate, copy-->
 *   nora_fast_ctx (immutable; host view for the CPU path, device view after nora_fast_ctx_cuda_upload).
 * The writer is nora_edge.actions.native (Python, at export); manifest.json hashes every file.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fast_ctx.h"

#define NF_MSG_LEN 512
#define NF_LINE_LEN 4096
static _Thread_local char nf_message[NF_MSG_LEN];

int nf_fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(nf_message, sizeof nf_message, fmt, ap);
  va_end(ap);
  return code;
}

void nf_ok(void) { nf_message[0] = '\0'; }

int nora_fast_version(void) { return NORA_FAST_VERSION; }

const char* nora_fast_last_error(void) { return nf_message; }

const char* nora_fast_seq_status_name(int status) {
  static const char* names[] = {"ok", "id_out_of_range", "invalid_utf8", "coefficient_out_of_range",
                                "wrong_count", "not_finite"};
  return status >= 0 && status < (int)(sizeof names / sizeof names[0]) ? names[status] : NULL;
}

const char* nora_fast_sel_status_name(int status) {
  static const char* names[] = {"ok", "bad_state", "top_not_finite", "no_allowed", "not_finite"};
  return status >= 0 && status < (int)(sizeof names / sizeof names[0]) ? names[status] : NULL;
}

/* ---- validation ------------------------------------------------------------------------------------------ */
static int check_tables(const nora_fast_tables* t) {
  if (t->vocab_size < 1 || t->n_bytes < t->vocab_size)
    return nf_fail(NORA_FAST_E_FORMAT, "vocab_size %d / n_bytes %d: need vocab_size >= 1 and >= 1 byte per id",
                   t->vocab_size, t->n_bytes);
  if (t->time_horizon < 1 || t->action_dim < 1 || t->dfa_states < 1 || t->n_rows < 1 || t->n_programs < 0)
    return nf_fail(NORA_FAST_E_FORMAT, "time_horizon %d, action_dim %d, dfa_states %d, n_rows %d, n_programs %d:"
                   " all must be positive (programs >= 0)", t->time_horizon, t->action_dim, t->dfa_states,
                   t->n_rows, t->n_programs);
  if ((int64_t)t->time_horizon * t->action_dim > (1 << 20))
    return nf_fail(NORA_FAST_E_FORMAT, "T*D = %lld is implausibly large",
                   (long long)t->time_horizon * t->action_dim);
  if (!(isfinite(t->scale) && t->scale > 0))
    return nf_fail(NORA_FAST_E_FORMAT, "scale %g must be positive and finite", t->scale);
  if (t->alphabet_max < 0 || t->alphabet_max > 0x10FFFF)
    return nf_fail(NORA_FAST_E_FORMAT, "alphabet_max %d outside [0, 0x10FFFF]", t->alphabet_max);
  if ((int64_t)t->min_token + t->alphabet_max > INT32_MAX)
    return nf_fail(NORA_FAST_E_FORMAT, "min_token %d + alphabet_max %d overflows a 32-bit coefficient",
                   t->min_token, t->alphabet_max);
  if (!t->offsets || !t->bytes || !t->adv || !t->nxt || !t->reach || !t->head_ids || !t->action_rows ||
      !t->idct_basis || (t->n_programs > 0 && (!t->program_keys || !t->program_lengths)))
    return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_tables has a NULL array");
  if (t->offsets[0] != 0 || t->offsets[t->vocab_size] != t->n_bytes)
    return nf_fail(NORA_FAST_E_FORMAT, "offsets must start at 0 and end at n_bytes %d (got %d .. %d)",
                   t->n_bytes, t->offsets[0], t->offsets[t->vocab_size]);
  for (int32_t i = 0; i < t->vocab_size; ++i)
    if (t->offsets[i + 1] <= t->offsets[i])
      return nf_fail(NORA_FAST_E_FORMAT, "id %d owns no bytes (offsets %d, %d)", i, t->offsets[i],
                     t->offsets[i + 1]);
  int64_t qv = (int64_t)t->dfa_states * t->vocab_size;
  for (int64_t k = 0; k < qv; ++k) {
    if (t->adv[k] < 0 || t->nxt[k] < 0 || t->nxt[k] > t->dfa_states)
      return nf_fail(NORA_FAST_E_FORMAT, "automaton entry (state %lld, id %lld): adv %d / nxt %d out of range",
                     (long long)(k / t->vocab_size), (long long)(k % t->vocab_size), t->adv[k], t->nxt[k]);
  }
  int64_t nreach = ((int64_t)t->time_horizon * t->action_dim + 1) * t->dfa_states;
  for (int64_t k = 0; k < nreach; ++k)
    if (t->reach[k] > 1) return nf_fail(NORA_FAST_E_FORMAT, "reach[%lld] = %d is not 0/1", (long long)k, t->reach[k]);
  for (int32_t i = 0; i < t->vocab_size; ++i)
    if (t->action_rows[i] < 0 || t->action_rows[i] >= t->n_rows)
      return nf_fail(NORA_FAST_E_FORMAT, "action_rows[%d] = %d outside the %d logits rows", i, t->action_rows[i],
                     t->n_rows);
  for (int64_t k = 0; k < (int64_t)t->time_horizon * t->time_horizon; ++k)
    if (!isfinite(t->idct_basis[k])) return nf_fail(NORA_FAST_E_FORMAT, "idct_basis[%lld] is not finite", (long long)k);
  int64_t n_ops = 0;
  for (int32_t p = 0; p < t->n_programs; ++p) {
    if (!t->program_keys[p]) return nf_fail(NORA_FAST_E_ARGUMENT, "program %d has a NULL key", p);
    if (t->program_lengths[p] < 0) return nf_fail(NORA_FAST_E_FORMAT, "program %d has %d ops", p, t->program_lengths[p]);
    n_ops += t->program_lengths[p];
  }
  if (n_ops > 0 && !t->ops) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_tables.ops is NULL");
  for (int64_t k = 0; k < n_ops; ++k) {
    const nora_fast_op* op = &t->ops[k];
    if (op->code < NORA_FAST_OP_RANGE || op->code > NORA_FAST_OP_SIGN || op->dim < 0 || op->dim >= t->action_dim ||
        !isfinite(op->a) || !isfinite(op->b))
      return nf_fail(NORA_FAST_E_FORMAT, "post-processing op %lld: code %d, dim %d (action_dim %d), a %g, b %g",
                     (long long)k, op->code, op->dim, t->action_dim, op->a, op->b);
  }
  return NORA_FAST_OK;
}

static void* dup_array(const void* src, size_t n, size_t elem) {
  size_t bytes = n * elem;
  void* p = malloc(bytes ? bytes : 1);
  if (p && bytes) memcpy(p, src, bytes);
  return p;
}

void nora_fast_ctx_free(nora_fast_ctx* ctx) {
  if (!ctx) return;
  nf_cuda_release(ctx);
  if (ctx->keys)
    for (int32_t p = 0; p < ctx->host.n_programs; ++p) free(ctx->keys[p]);
  free(ctx->keys);
  free(ctx->offsets);
  free(ctx->bytes);
  free(ctx->adv);
  free(ctx->nxt);
  free(ctx->reach);
  free(ctx->head_ids);
  free(ctx->action_rows);
  free(ctx->basis);
  free(ctx->prog_start);
  free(ctx->prog_len);
  free(ctx->ops);
  free(ctx);
}

int nora_fast_ctx_create(const nora_fast_tables* t, nora_fast_ctx** out) {
  if (!t || !out) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_ctx_create: NULL tables or out");
  *out = NULL;
  int rc = check_tables(t);
  if (rc) return rc;
  nora_fast_ctx* c = (nora_fast_ctx*)calloc(1, sizeof *c);
  if (!c) return nf_fail(NORA_FAST_E_NO_MEMORY, "out of memory allocating the context");
  int32_t total = t->time_horizon * t->action_dim;
  size_t qv = (size_t)t->dfa_states * t->vocab_size;
  int64_t n_ops = 0;
  for (int32_t p = 0; p < t->n_programs; ++p) n_ops += t->program_lengths[p];
  c->offsets = (int32_t*)dup_array(t->offsets, (size_t)t->vocab_size + 1, sizeof(int32_t));
  c->bytes = (uint8_t*)dup_array(t->bytes, (size_t)t->n_bytes, 1);
  c->adv = (int32_t*)dup_array(t->adv, qv, sizeof(int32_t));
  c->nxt = (int32_t*)dup_array(t->nxt, qv, sizeof(int32_t));
  c->reach = (uint8_t*)dup_array(t->reach, ((size_t)total + 1) * t->dfa_states, 1);
  c->head_ids = (int32_t*)dup_array(t->head_ids, (size_t)t->n_rows, sizeof(int32_t));
  c->action_rows = (int32_t*)dup_array(t->action_rows, (size_t)t->vocab_size, sizeof(int32_t));
  c->basis = (double*)dup_array(t->idct_basis, (size_t)t->time_horizon * t->time_horizon, sizeof(double));
  c->prog_start = (int32_t*)calloc((size_t)t->n_programs + 1, sizeof(int32_t));
  c->prog_len = (int32_t*)dup_array(t->program_lengths, (size_t)t->n_programs, sizeof(int32_t));
  c->ops = (nora_fast_op*)dup_array(t->ops, (size_t)n_ops, sizeof(nora_fast_op));
  c->keys = (char**)calloc((size_t)t->n_programs + 1, sizeof(char*));
  int ok = c->offsets && c->bytes && c->adv && c->nxt && c->reach && c->head_ids && c->action_rows && c->basis &&
           c->prog_start && c->prog_len && c->ops && c->keys;
  for (int32_t p = 0; ok && p < t->n_programs; ++p) {
    c->keys[p] = (char*)dup_array(t->program_keys[p], strlen(t->program_keys[p]) + 1, 1);
    ok = c->keys[p] != NULL;
    if (p > 0) c->prog_start[p] = c->prog_start[p - 1] + t->program_lengths[p - 1];
  }
  nf_view* v = &c->host;
  v->n_programs = t->n_programs; /* set before any free so the key loop knows its bound */
  if (!ok) {
    nora_fast_ctx_free(c);
    return nf_fail(NORA_FAST_E_NO_MEMORY, "out of memory copying the codec tables");
  }
  v->V = t->vocab_size;
  v->N = t->n_bytes;
  v->min_token = t->min_token;
  v->alphabet_max = t->alphabet_max;
  v->T = t->time_horizon;
  v->D = t->action_dim;
  v->Q = t->dfa_states;
  v->n_rows = t->n_rows;
  v->total = total;
  v->scale = t->scale;
  v->offsets = c->offsets;
  v->bytes = c->bytes;
  v->adv = c->adv;
  v->nxt = c->nxt;
  v->reach = c->reach;
  v->head_ids = c->head_ids;
  v->action_rows = c->action_rows;
  v->basis = c->basis;
  v->prog_start = c->prog_start;
  v->prog_len = c->prog_len;
  v->ops = c->ops;
  c->max_ids = 4 * total + 1;
  if (!c->host.reach[(int64_t)total * v->Q + 0]) {
    nora_fast_ctx_free(c);
    return nf_fail(NORA_FAST_E_FORMAT, "no FAST id sequence decodes into exactly %d coefficients (reach)", total);
  }
  *out = c;
  nf_ok();
  return NORA_FAST_OK;
}

int nora_fast_ctx_info(const nora_fast_ctx* ctx, nora_fast_info* out) {
  if (!ctx || !out) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_ctx_info: NULL ctx or out");
  const nf_view* v = &ctx->host;
  out->version = NORA_FAST_VERSION;
  out->vocab_size = v->V;
  out->n_bytes = v->N;
  out->min_token = v->min_token;
  out->alphabet_max = v->alphabet_max;
  out->time_horizon = v->T;
  out->action_dim = v->D;
  out->dfa_states = v->Q;
  out->n_rows = v->n_rows;
  out->n_programs = v->n_programs;
  out->scale = v->scale;
  out->max_ids = ctx->max_ids;
  out->cuda_ready = ctx->cuda_ready;
  nf_ok();
  return NORA_FAST_OK;
}

int nora_fast_program(const nora_fast_ctx* ctx, const char* key, int* err) {
  int dummy;
  if (!err) err = &dummy;
  if (!ctx) return (*err = nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_program: NULL ctx")), -1;
  int32_t n = ctx->host.n_programs;
  if (!key) {
    if (n == 1) return (*err = NORA_FAST_OK), 0;
    *err = nf_fail(NORA_FAST_E_UNKNOWN_KEY, "an unnorm key is required: the bundle has %d post-processing programs",
                   n);
    return -1;
  }
  for (int32_t p = 0; p < n; ++p)
    if (strcmp(ctx->keys[p], key) == 0) return (*err = NORA_FAST_OK), p;
  *err = nf_fail(NORA_FAST_E_UNKNOWN_KEY, "unknown unnorm key '%s' (%d programs)", key, n);
  return -1;
}

/* ---- codec/native/ reader -------------------------------------------------------------------------------- */
typedef struct {
  nora_fast_tables t;
  char** keys;
  int32_t* lengths;
  nora_fast_op* ops;
  void* arrays[8];
} nf_loaded;

static void loaded_free(nf_loaded* L) {
  if (L->keys)
    for (int32_t p = 0; p < L->t.n_programs; ++p) free(L->keys[p]);
  free(L->keys);
  free(L->lengths);
  free(L->ops);
  for (int i = 0; i < 8; ++i) free(L->arrays[i]);
}

/* Read exactly `count` elements of `elem` bytes from dir/name (the file size must match). */
static int read_array(const char* dir, const char* name, size_t count, size_t elem, void** out) {
  char path[NF_LINE_LEN];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f) return nf_fail(NORA_FAST_E_IO, "cannot open %s: %s", path, strerror(errno));
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  if (size < 0 || (size_t)size != count * elem) {
    fclose(f);
    return nf_fail(NORA_FAST_E_FORMAT, "%s has %ld bytes, native.txt implies %zu", path, size, count * elem);
  }
  *out = malloc((count * elem) > 0 ? count * elem : 1);
  if (!*out) {
    fclose(f);
    return nf_fail(NORA_FAST_E_NO_MEMORY, "out of memory reading %s", path);
  }
  size_t got = count ? fread(*out, elem, count, f) : 0;
  fclose(f);
  if (got != count) return nf_fail(NORA_FAST_E_IO, "short read on %s", path);
  return NORA_FAST_OK;
}

/* Parse a whole word as a 32-bit integer; 0 on success. */
static int parse_i32(const char* word, int32_t* out) {
  char* end = NULL;
  errno = 0;
  long long v = strtoll(word, &end, 10);
  if (end == word || *end || errno || v < INT32_MIN || v > INT32_MAX) return -1;
  *out = (int32_t)v;
  return 0;
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* %XX-decoding of a program key written as "=<percent-encoded>" */
static int decode_key(const char* word, char** out) {
  if (word[0] != '=') return -1;
  size_t n = strlen(word);
  char* s = (char*)malloc(n + 1);
  if (!s) return -1;
  size_t j = 0;
  for (size_t i = 1; i < n; ++i) {
    if (word[i] == '%') {
      int hi = i + 2 < n ? hex_digit(word[i + 1]) : -1, lo = i + 2 < n ? hex_digit(word[i + 2]) : -1;
      if (hi < 0 || lo < 0) {
        free(s);
        return -1;
      }
      s[j++] = (char)(hi * 16 + lo);
      i += 2;
    } else {
      s[j++] = word[i];
    }
  }
  s[j] = '\0';
  *out = s;
  return 0;
}

static int parse_native(FILE* f, const char* path, nf_loaded* L) {
  char line[NF_LINE_LEN];
  int lineno = 0, programs_seen = 0;
  int32_t format = -1;
  int64_t n_ops = 0, ops_cap = 0, program_first_op = 0; /* ops of the current program start here */
  nora_fast_tables* t = &L->t;
  t->n_programs = -1;
  while (fgets(line, sizeof line, f)) {
    ++lineno;
    char key[64], w1[NF_LINE_LEN / 2], w2[64], w3[64], w4[64];
    int n = sscanf(line, "%63s %2047s %63s %63s %63s", key, w1, w2, w3, w4);
    if (n <= 0 || key[0] == '#') continue;
#define NF_BAD() nf_fail(NORA_FAST_E_FORMAT, "%s line %d: cannot parse '%.80s'", path, lineno, line)
    if (n < 2) return NF_BAD();
    char* end = NULL;
    errno = 0;
    if (strcmp(key, "nora_fast_native") == 0) {
      if (parse_i32(w1, &format)) return NF_BAD();
    } else if (strcmp(key, "scale") == 0) {
      t->scale = strtod(w1, &end);
      if (*end) return NF_BAD();
    } else if (strcmp(key, "program") == 0) {
      if (n < 3 || t->n_programs < 0 || programs_seen >= t->n_programs) return NF_BAD();
      if (programs_seen > 0 && n_ops - program_first_op != L->lengths[programs_seen - 1])
        return nf_fail(NORA_FAST_E_FORMAT, "%s line %d: program %d declares %d ops but has %lld", path, lineno,
                       programs_seen - 1, L->lengths[programs_seen - 1], (long long)(n_ops - program_first_op));
      if (parse_i32(w1, &L->lengths[programs_seen]) || L->lengths[programs_seen] < 0 ||
          decode_key(w2, &L->keys[programs_seen]) != 0)
        return NF_BAD();
      program_first_op = n_ops;
      ++programs_seen;
    } else if (strcmp(key, "op") == 0) {
      if (programs_seen == 0 || n < 3) return NF_BAD();
      if (n_ops == ops_cap) {
        ops_cap = ops_cap ? 2 * ops_cap : 16;
        nora_fast_op* grown = (nora_fast_op*)realloc(L->ops, (size_t)ops_cap * sizeof(nora_fast_op));
        if (!grown) return nf_fail(NORA_FAST_E_NO_MEMORY, "out of memory parsing %s", path);
        L->ops = grown;
      }
      nora_fast_op* op = &L->ops[n_ops++];
      memset(op, 0, sizeof *op);
      if (parse_i32(w2, &op->dim)) return NF_BAD();
      if (strcmp(w1, "range") == 0 || strcmp(w1, "affine") == 0) {
        if (n < 5) return NF_BAD();
        op->code = w1[0] == 'r' ? NORA_FAST_OP_RANGE : NORA_FAST_OP_AFFINE;
        op->a = strtod(w3, &end);
        if (*end) return NF_BAD();
        op->b = strtod(w4, &end);
        if (*end) return NF_BAD();
      } else if (strcmp(w1, "scale") == 0) {
        if (n < 4) return NF_BAD();
        op->code = NORA_FAST_OP_SCALE;
        op->a = strtod(w3, &end);
        if (*end) return NF_BAD();
      } else if (strcmp(w1, "sign") == 0) {
        op->code = NORA_FAST_OP_SIGN;
      } else {
        return NF_BAD();
      }
    } else {
      int32_t v;
      if (parse_i32(w1, &v)) return NF_BAD();
      if (strcmp(key, "vocab_size") == 0) t->vocab_size = v;
      else if (strcmp(key, "n_bytes") == 0) t->n_bytes = v;
      else if (strcmp(key, "min_token") == 0) t->min_token = v;
      else if (strcmp(key, "alphabet_max") == 0) t->alphabet_max = v;
      else if (strcmp(key, "time_horizon") == 0) t->time_horizon = v;
      else if (strcmp(key, "action_dim") == 0) t->action_dim = v;
      else if (strcmp(key, "dfa_states") == 0) t->dfa_states = v;
      else if (strcmp(key, "n_rows") == 0) t->n_rows = v;
      else if (strcmp(key, "programs") == 0) {
        if (t->n_programs >= 0 || v < 0 || v > 1 << 16) return NF_BAD();
        t->n_programs = v;
        L->keys = (char**)calloc((size_t)v + 1, sizeof(char*));
        L->lengths = (int32_t*)calloc((size_t)v + 1, sizeof(int32_t));
        if (!L->keys || !L->lengths) return nf_fail(NORA_FAST_E_NO_MEMORY, "out of memory parsing %s", path);
      } else {
        return nf_fail(NORA_FAST_E_FORMAT, "%s line %d: unknown field '%s'", path, lineno, key);
      }
    }
#undef NF_BAD
  }
  if (format != NORA_FAST_NATIVE_FORMAT)
    return nf_fail(NORA_FAST_E_FORMAT, "%s: format %d, this library (v%d) reads nora_fast_native %d", path, format,
                   NORA_FAST_VERSION, NORA_FAST_NATIVE_FORMAT);
  if (t->n_programs < 0) t->n_programs = 0;
  if (programs_seen != t->n_programs)
    return nf_fail(NORA_FAST_E_FORMAT, "%s: 'programs %d' but %d program lines", path, t->n_programs, programs_seen);
  if (programs_seen > 0 && n_ops - program_first_op != L->lengths[programs_seen - 1])
    return nf_fail(NORA_FAST_E_FORMAT, "%s: program %d declares %d ops but has %lld", path, programs_seen - 1,
                   L->lengths[programs_seen - 1], (long long)(n_ops - program_first_op));
  int64_t declared = 0;
  for (int32_t p = 0; p < t->n_programs; ++p) declared += L->lengths[p];
  if (declared != n_ops)
    return nf_fail(NORA_FAST_E_FORMAT, "%s: programs declare %lld ops, found %lld", path, (long long)declared,
                   (long long)n_ops);
  if (t->vocab_size < 1 || t->n_bytes < 1 || t->time_horizon < 1 || t->action_dim < 1 || t->dfa_states < 1 ||
      t->n_rows < 1)
    return nf_fail(NORA_FAST_E_FORMAT, "%s: vocab_size, n_bytes, time_horizon, action_dim, dfa_states and n_rows"
                   " must all be present and positive", path);
  t->program_keys = (const char* const*)L->keys;
  t->program_lengths = L->lengths;
  t->ops = L->ops;
  return NORA_FAST_OK;
}

int nora_fast_ctx_open(const char* dir, nora_fast_ctx** out) {
  if (!dir || !out) return nf_fail(NORA_FAST_E_ARGUMENT, "nora_fast_ctx_open: NULL dir or out");
  *out = NULL;
  char path[NF_LINE_LEN];
  snprintf(path, sizeof path, "%s/native.txt", dir);
  FILE* f = fopen(path, "r");
  if (!f) return nf_fail(NORA_FAST_E_IO, "cannot open %s: %s", path, strerror(errno));
  nf_loaded L;
  memset(&L, 0, sizeof L);
  int rc = parse_native(f, path, &L);
  fclose(f);
  nora_fast_tables* t = &L.t;
  if (!rc) {
    size_t qv = (size_t)t->dfa_states * t->vocab_size;
    size_t total = (size_t)t->time_horizon * t->action_dim;
    if (!rc) rc = read_array(dir, "fast_offsets.i32", (size_t)t->vocab_size + 1, 4, &L.arrays[0]);
    if (!rc) rc = read_array(dir, "fast_bytes.u8", (size_t)t->n_bytes, 1, &L.arrays[1]);
    if (!rc) rc = read_array(dir, "automaton_adv.i32", qv, 4, &L.arrays[2]);
    if (!rc) rc = read_array(dir, "automaton_nxt.i32", qv, 4, &L.arrays[3]);
    if (!rc) rc = read_array(dir, "automaton_reach.u8", (total + 1) * (size_t)t->dfa_states, 1, &L.arrays[4]);
    if (!rc) rc = read_array(dir, "head_ids.i32", (size_t)t->n_rows, 4, &L.arrays[5]);
    if (!rc) rc = read_array(dir, "action_rows.i32", (size_t)t->vocab_size, 4, &L.arrays[6]);
    if (!rc) rc = read_array(dir, "idct_basis.f64", (size_t)t->time_horizon * t->time_horizon, 8, &L.arrays[7]);
  }
  if (!rc) {
    t->offsets = (const int32_t*)L.arrays[0];
    t->bytes = (const uint8_t*)L.arrays[1];
    t->adv = (const int32_t*)L.arrays[2];
    t->nxt = (const int32_t*)L.arrays[3];
    t->reach = (const uint8_t*)L.arrays[4];
    t->head_ids = (const int32_t*)L.arrays[5];
    t->action_rows = (const int32_t*)L.arrays[6];
    t->idct_basis = (const double*)L.arrays[7];
    rc = nora_fast_ctx_create(t, out);
    if (rc) {
      /* keep the message, prefix the directory */
      char msg[NF_MSG_LEN];
      snprintf(msg, sizeof msg, "%s", nora_fast_last_error());
      nf_fail(rc, "%s: %s", dir, msg);
    }
  }
  loaded_free(&L);
  return rc;
}
