/* check_corpus.c — replay a corpus written by tests/kernels/corpus.py against libnora_fast, under any build
 * (plain: `make -C kernels check`, AddressSanitizer + UBSan: `make -C kernels asan`).
 *
 *   check_corpus <corpus_dir> <native_dir>
 *
 * Data flow: <native_dir> --nora_fast_ctx_open--> context; <corpus_dir>/manifest.txt names the cases (format in
 * tests/kernels/corpus.py): "select" cases (logits, seen masks, states + the numpy reference's ids, states,
 * tops, statuses, seen masks), "decode" cases (id sequences + the reference's statuses, error positions, integer
 * coefficients, float64 actions) and "open" cases (broken native dirs + the expected nora_fast_error) --run the
 * library, compare--> one "PASS|FAIL <check> <name> <count>" line per case, then the API misuse checks, then
 * "PASS|FAIL total <count>". Exit status 0 only when everything matched.
 * Actions are float32 against a float64 reference: |c - r| <= 1e-6 * max(1, |r|); everything else is exact.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nora_fast.h"

#define PATH_LEN 4096
#define ACTION_TOL 1e-6

static int n_failed = 0;
static long n_compared = 0;

/* dir/name into out (PATH_LEN); 0 when it does not fit */
static int join(char* out, const char* dir, const char* sep, const char* name) {
  int n = snprintf(out, PATH_LEN, "%s%s%s", dir, sep, name);
  return n >= 0 && n < PATH_LEN;
}

/* Read dir/name holding exactly `count` elements of `elem` bytes; NULL (and a FAIL line) otherwise. */
static void* read_exact(const char* dir, const char* name, size_t elem, size_t count) {
  char path[PATH_LEN];
  FILE* f = join(path, dir, "/", name) ? fopen(path, "rb") : NULL;
  if (!f) {
    printf("FAIL read %s (missing)\n", path);
    return NULL;
  }
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  void* buf = malloc(count * elem > 0 ? count * elem : 1);
  size_t got = buf && count ? fread(buf, elem, count, f) : 0;
  fclose(f);
  if (!buf || size < 0 || (size_t)size != count * elem || got != count) {
    printf("FAIL read %s (%ld bytes, expected %zu)\n", path, size, count * elem);
    free(buf);
    return NULL;
  }
  return buf;
}

static void* read_case(const char* dir, const char* name, const char* suffix, size_t elem, size_t count) {
  char file[PATH_LEN];
  if (!join(file, name, ".", suffix)) return NULL;
  return read_exact(dir, file, elem, count);
}

/* Count mismatches of two int32 arrays (skip where `expected` == skip_value when use_skip), printing the first. */
static long diff_i32(const char* what, const char* name, const int32_t* got, const int32_t* expected, long n,
                     int use_skip, int32_t skip_value) {
  long bad = 0;
  for (long i = 0; i < n; ++i) {
    if (use_skip && expected[i] == skip_value) continue;
    if (got[i] != expected[i] && bad++ == 0)
      printf("  %s %s[%ld]: got %d, expected %d\n", name, what, i, got[i], expected[i]);
  }
  return bad;
}

static void report(const char* check, const char* name, long bad, long count) {
  printf("%s %s %s %ld\n", bad ? "FAIL" : "PASS", check, name, bad ? bad : count);
  if (bad) ++n_failed;
  else n_compared += count;
}

static void run_select(const nora_fast_ctx* ctx, const char* dir, const char* name, int b, long stride,
                       float penalty, int has_seen, int has_top) {
  size_t bs = (size_t)b * (size_t)stride;
  float* logits = (float*)read_case(dir, name, "logits.f32", 4, bs);
  uint8_t* seen = has_seen ? (uint8_t*)read_case(dir, name, "seen.u8", 1, bs) : NULL;
  uint8_t* x_seen = has_seen ? (uint8_t*)read_case(dir, name, "x_seen.u8", 1, bs) : NULL;
  int32_t* done = (int32_t*)read_case(dir, name, "done.i32", 4, (size_t)b);
  int32_t* pending = (int32_t*)read_case(dir, name, "pending.i32", 4, (size_t)b);
  int32_t* x[5];
  const char* fields[5] = {"x_id.i32", "x_done.i32", "x_pending.i32", "x_status.i32", "x_top.i32"};
  int ok = logits && done && pending && (!has_seen || (seen && x_seen));
  for (int k = 0; k < 5; ++k) ok &= (x[k] = (int32_t*)read_case(dir, name, fields[k], 4, (size_t)b)) != NULL;
  int32_t* id = (int32_t*)calloc((size_t)b + 1, 4);
  int32_t* top = (int32_t*)calloc((size_t)b + 1, 4);
  int32_t* status = (int32_t*)calloc((size_t)b + 1, 4);
  long bad = 1;
  if (ok && id && top && status) {
    int rc = nora_fast_select(ctx, b, logits, stride, seen, penalty, done, pending, id, has_top ? top : NULL, status);
    int all_ok = 1;
    for (int i = 0; i < b; ++i) all_ok &= x[3][i] == NORA_FAST_SEL_OK;
    bad = rc != (all_ok ? NORA_FAST_OK : NORA_FAST_E_ROWS);
    if (bad) printf("  %s: return code %d (%s)\n", name, rc, nora_fast_last_error());
    bad += diff_i32("id", name, id, x[0], b, 0, 0);
    bad += diff_i32("done", name, done, x[1], b, 0, 0);
    bad += diff_i32("pending", name, pending, x[2], b, 0, 0);
    bad += diff_i32("status", name, status, x[3], b, 0, 0);
    if (has_top) bad += diff_i32("top", name, top, x[4], b, 1, -1);
    for (size_t i = 0; has_seen && i < bs; ++i)
      if (seen[i] != x_seen[i] && bad++ == 0) printf("  %s seen[%zu] differs\n", name, i);
  }
  report("select", name, bad, b);
  free(logits), free(seen), free(x_seen), free(done), free(pending), free(id), free(top), free(status);
  for (int k = 0; k < 5; ++k) free(x[k]);
}

static void run_decode(const nora_fast_ctx* ctx, const char* dir, const char* name, int b, long stride,
                       int program, long total) {
  int32_t* ids = (int32_t*)read_case(dir, name, "ids.i32", 4, (size_t)b * (size_t)stride);
  int32_t* lengths = (int32_t*)read_case(dir, name, "lengths.i32", 4, (size_t)b);
  int32_t* x_status = (int32_t*)read_case(dir, name, "x_status.i32", 4, (size_t)b);
  int32_t* x_pos = (int32_t*)read_case(dir, name, "x_pos.i32", 4, (size_t)b);
  int32_t* x_coeffs = (int32_t*)read_case(dir, name, "x_coeffs.i32", 4, (size_t)b * (size_t)total);
  double* x_actions = (double*)read_case(dir, name, "x_actions.f64", 8, (size_t)b * (size_t)total);
  float* actions = (float*)malloc(((size_t)b * (size_t)total + 1) * sizeof(float));
  int32_t* coeffs = (int32_t*)malloc(((size_t)b * (size_t)total + 1) * sizeof(int32_t));
  int32_t* status = (int32_t*)calloc((size_t)b + 1, 4);
  int32_t* pos = (int32_t*)calloc((size_t)b + 1, 4);
  long bad = 1;
  if (ids && lengths && x_status && x_pos && x_coeffs && x_actions && actions && coeffs && status && pos) {
    int rc = nora_fast_decode(ctx, b, ids, stride, lengths, program, actions, coeffs, status, pos);
    int all_ok = 1;
    for (int i = 0; i < b; ++i) all_ok &= x_status[i] == NORA_FAST_SEQ_OK;
    bad = rc != (all_ok ? NORA_FAST_OK : NORA_FAST_E_ROWS);
    if (bad) printf("  %s: return code %d (%s)\n", name, rc, nora_fast_last_error());
    bad += diff_i32("status", name, status, x_status, b, 0, 0);
    bad += diff_i32("error_pos", name, pos, x_pos, b, 0, 0);
    bad += diff_i32("coeffs", name, coeffs, x_coeffs, (long)b * total, 0, 0);
    for (long i = 0; i < (long)b * total; ++i) {
      double got = actions[i], want = x_actions[i];
      int same = x_status[i / total] != NORA_FAST_SEQ_OK ? isnan(got)
                                                          : fabs(got - want) <= ACTION_TOL * fmax(1.0, fabs(want));
      if (!same && bad++ == 0) printf("  %s actions[%ld]: got %.9g, expected %.17g\n", name, i, got, want);
    }
  }
  report("decode", name, bad, b);
  free(ids), free(lengths), free(x_status), free(x_pos), free(x_coeffs), free(x_actions);
  free(actions), free(coeffs), free(status), free(pos);
}

static void run_open(const char* dir, const char* name, int expected) {
  char path[PATH_LEN];
  nora_fast_ctx* ctx = NULL;
  int rc = join(path, dir, "/", name) ? nora_fast_ctx_open(path, &ctx) : -1;
  long bad = rc != expected || (rc != NORA_FAST_OK) != (ctx == NULL) || (rc && !nora_fast_last_error()[0]);
  printf("  open %s: %d (%s)\n", name, rc, rc ? nora_fast_last_error() : "ok");
  nora_fast_ctx_free(ctx);
  report("open", name, bad, 1);
}

/* Calls that must be refused with NORA_FAST_E_ARGUMENT (and must not touch their outputs), plus the name tables. */
static void run_api(const nora_fast_ctx* ctx, const nora_fast_info* info) {
  long bad = 0, n = 0;
  float* logits = (float*)calloc((size_t)info->n_rows, sizeof(float));
  int32_t done = 0, pending = 0, id = 7, status = 7, length = 1, ids[1] = {0}, pos = 7;
  float actions[1];
#define EXPECT(call, code)                        \
  do {                                            \
    int rc_ = (call);                             \
    ++n;                                          \
    if (rc_ != (code)) {                          \
      ++bad;                                      \
      printf("  api: %s -> %d\n", #call, rc_);    \
    }                                             \
  } while (0)
  EXPECT(nora_fast_select(NULL, 1, logits, info->n_rows, NULL, 1.0f, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, -1, logits, info->n_rows, NULL, 1.0f, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, 1, NULL, info->n_rows, NULL, 1.0f, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, 1, logits, info->n_rows - 1, NULL, 1.0f, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, 1, logits, info->n_rows, NULL, 0.0f, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, 1, logits, info->n_rows, NULL, NAN, &done, &pending, &id, NULL, &status), 1);
  EXPECT(nora_fast_select(ctx, 0, NULL, info->n_rows, NULL, 1.0f, NULL, NULL, NULL, NULL, NULL), 0);
  if (id != 7 || status != 7 || done != 0 || pending != 0) ++bad, printf("  api: a refused select wrote outputs\n");
  EXPECT(nora_fast_decode(ctx, 1, ids, 1, &length, info->n_programs, actions, NULL, &status, &pos), 1);
  EXPECT(nora_fast_decode(ctx, 1, ids, 1, &length, -2, actions, NULL, &status, &pos), 1);
  length = 2;
  EXPECT(nora_fast_decode(ctx, 1, ids, 1, &length, -1, actions, NULL, &status, &pos), 1);
  length = -1;
  EXPECT(nora_fast_decode(ctx, 1, ids, 1, &length, -1, actions, NULL, &status, &pos), 1);
  EXPECT(nora_fast_decode(ctx, 1, NULL, 1, &length, -1, actions, NULL, &status, &pos), 1);
  EXPECT(nora_fast_decode(ctx, 0, NULL, 0, NULL, -1, NULL, NULL, NULL, NULL), 0);
  if (status != 7 || pos != 7) ++bad, printf("  api: a refused decode wrote outputs\n");
  EXPECT(nora_fast_ctx_open(NULL, NULL), 1);
  EXPECT(nora_fast_ctx_create(NULL, NULL), 1);
  EXPECT(nora_fast_ctx_info(NULL, NULL), 1);
  int err = 0;
  EXPECT(nora_fast_program(ctx, "no such key \xff", &err), -1);
  if (err != NORA_FAST_E_UNKNOWN_KEY) ++bad, printf("  api: unknown key -> error %d\n", err);
  for (int s = -1; s <= 6; ++s) {
    n += 2;
    if ((nora_fast_seq_status_name(s) != NULL) != (s >= 0 && s <= 5)) ++bad, printf("  api: seq name %d\n", s);
    if ((nora_fast_sel_status_name(s) != NULL) != (s >= 0 && s <= 4)) ++bad, printf("  api: sel name %d\n", s);
  }
  EXPECT(nora_fast_version(), NORA_FAST_VERSION);
#undef EXPECT
  free(logits);
  report("api", "misuse", bad, n);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s <corpus_dir> <native_dir>\n", argv[0]);
    return 2;
  }
  const char* dir = argv[1];
  nora_fast_ctx* ctx = NULL;
  nora_fast_info info;
  int rc = nora_fast_ctx_open(argv[2], &ctx);
  if (rc != NORA_FAST_OK || nora_fast_ctx_info(ctx, &info) != NORA_FAST_OK) {
    printf("FAIL open %s %d: %s\n", argv[2], rc, nora_fast_last_error());
    return 1;
  }
  char path[PATH_LEN], line[PATH_LEN];
  FILE* f = join(path, dir, "/", "manifest.txt") ? fopen(path, "r") : NULL;
  if (!f) {
    printf("FAIL read %s (missing)\n", path);
    nora_fast_ctx_free(ctx);
    return 1;
  }
  long total = (long)info.time_horizon * info.action_dim;
  while (fgets(line, sizeof line, f)) {
    char kind[32], name[256];
    int b = 0, p1 = 0, p2 = 0;
    long stride = 0;
    float penalty = 1.0f;
    if (sscanf(line, "%31s %255s", kind, name) != 2) continue;
    if (strcmp(kind, "select") == 0 &&
        sscanf(line, "%*s %*s %d %ld %f %d %d", &b, &stride, &penalty, &p1, &p2) == 5 && b >= 0 && stride > 0)
      run_select(ctx, dir, name, b, stride, penalty, p1, p2);
    else if (strcmp(kind, "decode") == 0 && sscanf(line, "%*s %*s %d %ld %d", &b, &stride, &p1) == 3 && b >= 0)
      run_decode(ctx, dir, name, b, stride, p1, total);
    else if (strcmp(kind, "open") == 0 && sscanf(line, "%*s %*s %d", &p1) == 1)
      run_open(dir, name, p1);
    else
      printf("FAIL manifest '%.80s'\n", line), ++n_failed;
  }
  fclose(f);
  run_api(ctx, &info);
  nora_fast_ctx_free(ctx);
  printf("%s total %ld\n", n_failed ? "FAIL" : "PASS", n_failed ? (long)n_failed : n_compared);
  return n_failed ? 1 : 0;
}
