/* bench_decode.c — a tiny driver for instruction counts of libnora_fast under callgrind.
 *
 * Data flow: a bundle's codec/native/ directory --nora_fast_ctx_open--> context; a corpus file written by
 * bench/kernels_callgrind.py (nora_edge.bench.kernels_callgrind.write_corpus) --read--> FAST id sequences and
 * selection rows --one mode below--> statuses checked, a checksum printed (so nothing is optimised away).
 *
 * Modes (MODE argument):
 *   decode-batch   one nora_fast_decode call over all N sequences
 *   decode-each    N nora_fast_decode calls of one sequence each
 *   select-batch   one nora_fast_select call over all M rows
 *   select-each    M nora_fast_select calls of one row each
 *   none           open the context and read the corpus only
 * Run under `valgrind --tool=callgrind --toggle-collect=nora_fast_decode` (or nora_fast_select) so that only the
 * library call is counted; Ir / N is the instruction count per chunk (per token for select).
 *
 * Corpus file (little-endian):
 *   char magic[4] = "NFBC"; int32 version = 1; int32 n_seq, id_stride, n_sel, n_rows; float32 penalty;
 *   int32 program; int32 lengths[n_seq]; int32 ids[n_seq][id_stride]; int32 state[n_sel][2] (done, pending);
 *   float32 logits[n_sel][n_rows]; uint8 seen[n_sel][n_rows].
 *
 * Build: cc -std=c11 -O2 -Wall -Wextra -Werror -Ikernels/include kernels/tools/bench_decode.c
 *        kernels/build/libnora_fast.a -lm -o bench_decode
 * Usage: bench_decode NATIVE_DIR CORPUS MODE
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nora_fast.h"

typedef struct {
  int32_t n_seq, id_stride, n_sel, n_rows, program;
  float penalty;
  int32_t* lengths;
  int32_t* ids;
  int32_t* state;
  float* logits;
  uint8_t* seen;
} corpus;

static void* read_block(FILE* f, size_t count, size_t elem, const char* what) {
  void* p = malloc(count * elem > 0 ? count * elem : 1);
  if (!p || fread(p, elem, count, f) != count) {
    fprintf(stderr, "bench_decode: corpus truncated or out of memory reading %s (%zu x %zu bytes)\n", what, count,
            elem);
    exit(2);
  }
  return p;
}

static corpus read_corpus(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "bench_decode: cannot open corpus %s\n", path);
    exit(2);
  }
  char magic[4];
  int32_t head[5];
  corpus c;
  if (fread(magic, 1, 4, f) != 4 || memcmp(magic, "NFBC", 4) != 0 || fread(head, 4, 5, f) != 5 || head[0] != 1 ||
      fread(&c.penalty, 4, 1, f) != 1 || fread(&c.program, 4, 1, f) != 1) {
    fprintf(stderr, "bench_decode: %s is not a version-1 NFBC corpus\n", path);
    exit(2);
  }
  c.n_seq = head[1], c.id_stride = head[2], c.n_sel = head[3], c.n_rows = head[4];
  if (c.n_seq < 0 || c.id_stride < 0 || c.n_sel < 0 || c.n_rows < 0) {
    fprintf(stderr, "bench_decode: %s has negative sizes\n", path);
    exit(2);
  }
  c.lengths = read_block(f, (size_t)c.n_seq, 4, "lengths");
  c.ids = read_block(f, (size_t)c.n_seq * (size_t)c.id_stride, 4, "ids");
  c.state = read_block(f, (size_t)c.n_sel * 2, 4, "states");
  c.logits = read_block(f, (size_t)c.n_sel * (size_t)c.n_rows, 4, "logits");
  c.seen = read_block(f, (size_t)c.n_sel * (size_t)c.n_rows, 1, "seen");
  fclose(f);
  return c;
}

static int run_decode(const nora_fast_ctx* ctx, const corpus* c, int each, int total) {
  float* actions = malloc((size_t)c->n_seq * (size_t)total * sizeof(float) + 1);
  int32_t* status = malloc((size_t)c->n_seq * sizeof(int32_t) + 1);
  if (!actions || !status) return 2;
  int rc = NORA_FAST_OK;
  if (each) {
    for (int32_t b = 0; b < c->n_seq && rc == NORA_FAST_OK; ++b)
      rc = nora_fast_decode(ctx, 1, c->ids + (int64_t)b * c->id_stride, c->id_stride, c->lengths + b, c->program,
                            actions + (int64_t)b * total, NULL, status + b, NULL);
  } else {
    rc = nora_fast_decode(ctx, c->n_seq, c->ids, c->id_stride, c->lengths, c->program, actions, NULL, status, NULL);
  }
  double sum = 0.0;
  for (int64_t i = 0; i < (int64_t)c->n_seq * total; ++i) sum += actions[i];
  printf("decode %s: %d chunks, rc %d, checksum %.6f\n", each ? "each" : "batch", c->n_seq, rc, sum);
  free(actions);
  free(status);
  return rc == NORA_FAST_OK ? 0 : 1;
}

static int run_select(const nora_fast_ctx* ctx, corpus* c, int each) {
  size_t m = (size_t)c->n_sel + 1;
  int32_t *done = malloc(m * 4), *pending = malloc(m * 4), *id = malloc(m * 4), *top = malloc(m * 4);
  int32_t* status = malloc(m * 4);
  if (!done || !pending || !id || !top || !status) return 2;
  for (int32_t b = 0; b < c->n_sel; ++b) done[b] = c->state[2 * b], pending[b] = c->state[2 * b + 1];
  int rc = NORA_FAST_OK;
  if (each) {
    for (int32_t b = 0; b < c->n_sel && rc == NORA_FAST_OK; ++b)
      rc = nora_fast_select(ctx, 1, c->logits + (int64_t)b * c->n_rows, c->n_rows, c->seen + (int64_t)b * c->n_rows,
                            c->penalty, done + b, pending + b, id + b, top + b, status + b);
  } else {
    rc = nora_fast_select(ctx, c->n_sel, c->logits, c->n_rows, c->seen, c->penalty, done, pending, id, top, status);
  }
  int64_t sum = 0;
  for (int32_t b = 0; b < c->n_sel; ++b) sum += id[b] + top[b];
  printf("select %s: %d rows, rc %d, checksum %lld\n", each ? "each" : "batch", c->n_sel, rc, (long long)sum);
  free(done), free(pending), free(id), free(top), free(status);
  return rc == NORA_FAST_OK ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s NATIVE_DIR CORPUS decode-batch|decode-each|select-batch|select-each|none\n", argv[0]);
    return 2;
  }
  nora_fast_ctx* ctx = NULL;
  if (nora_fast_ctx_open(argv[1], &ctx) != NORA_FAST_OK) {
    fprintf(stderr, "bench_decode: %s\n", nora_fast_last_error());
    return 2;
  }
  nora_fast_info info;
  nora_fast_ctx_info(ctx, &info);
  corpus c = read_corpus(argv[2]);
  if (c.n_sel > 0 && c.n_rows != info.n_rows) {
    fprintf(stderr, "bench_decode: corpus rows %d, the codec's head has %d\n", c.n_rows, info.n_rows);
    return 2;
  }
  const char* mode = argv[3];
  int rc = 0;
  if (!strcmp(mode, "decode-batch") || !strcmp(mode, "decode-each")) {
    rc = run_decode(ctx, &c, mode[7] == 'e', info.time_horizon * info.action_dim);
  } else if (!strcmp(mode, "select-batch") || !strcmp(mode, "select-each")) {
    rc = run_select(ctx, &c, mode[7] == 'e');
  } else if (strcmp(mode, "none") != 0) {
    fprintf(stderr, "bench_decode: unknown mode %s\n", mode);
    rc = 2;
  }
  if (rc == 1) fprintf(stderr, "bench_decode: %s\n", nora_fast_last_error());
  free(c.lengths), free(c.ids), free(c.state), free(c.logits), free(c.seen);
  nora_fast_ctx_free(ctx);
  return rc;
}
