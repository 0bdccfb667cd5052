/* decode_dump.c — decode one batch of FAST id sequences with nora_fast_decode_f64 and write the float64 actions,
 * so a build for another ISA (mk/cross.mk: aarch64 under qemu) can be compared bit for bit with the host build.
 *
 *   decode_dump <native_dir> <ids.i32> <lengths.i32> <batch> <id_stride> <program> <out.f64>
 *
 * Inputs are the little-endian files tests/kernels/corpus.py (CorpusWriter.decode) writes: ids (batch, id_stride)
 * int32, lengths (batch,) int32. Output: (batch, T*D) float64 actions (NaN for a failed sequence), then one line
 * "decoded <batch> <values> <ok>" (ok = sequences with status 0). Exit status 0 when the call ran (return code
 * NORA_FAST_OK, or NORA_FAST_E_ROWS: some sequences failed, their status says why) and the file was written.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "nora_fast.h"

/* Read exactly n bytes of path into a new buffer; NULL on any mismatch. */
static void* read_exact(const char* path, size_t n) {
  FILE* f = fopen(path, "rb");
  void* buf = f ? malloc(n ? n : 1) : NULL;
  int ok = buf && fread(buf, 1, n, f) == n && fgetc(f) == EOF;
  if (f) fclose(f);
  if (!ok) {
    free(buf);
    fprintf(stderr, "decode_dump: cannot read exactly %zu bytes from %s\n", n, path);
    return NULL;
  }
  return buf;
}

int main(int argc, char** argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s <native_dir> <ids.i32> <lengths.i32> <batch> <id_stride> <program> <out.f64>\n",
            argv[0]);
    return 2;
  }
  const long batch = strtol(argv[4], NULL, 10), stride = strtol(argv[5], NULL, 10);
  const int program = (int)strtol(argv[6], NULL, 10);
  nora_fast_ctx* ctx = NULL;
  nora_fast_info info;
  if (batch < 1 || batch > INT32_MAX || stride < 1 || nora_fast_ctx_open(argv[1], &ctx) != 0 ||
      nora_fast_ctx_info(ctx, &info) != 0) {
    fprintf(stderr, "decode_dump: batch %ld, id_stride %ld, %s: %s\n", batch, stride, argv[1],
            nora_fast_last_error());
    nora_fast_ctx_free(ctx);
    return 2;
  }
  const size_t b = (size_t)batch, total = (size_t)info.time_horizon * (size_t)info.action_dim;
  int32_t* ids = read_exact(argv[2], b * (size_t)stride * sizeof(int32_t));
  int32_t* lengths = read_exact(argv[3], b * sizeof(int32_t));
  double* actions = malloc(b * total * sizeof(double));
  int32_t* coeffs = malloc(b * total * sizeof(int32_t));
  int32_t* status = malloc(b * sizeof(int32_t));
  int32_t* pos = malloc(b * sizeof(int32_t));
  int rc = 2;
  if (ids && lengths && actions && coeffs && status && pos) {
    rc = nora_fast_decode_f64(ctx, (int)batch, ids, stride, lengths, program, actions, coeffs, status, pos);
    if (rc == NORA_FAST_E_ROWS) rc = NORA_FAST_OK; /* per-sequence failures are data (NaN rows), not errors */
    FILE* f = rc == NORA_FAST_OK ? fopen(argv[7], "wb") : NULL;
    if (rc != NORA_FAST_OK || !f || fwrite(actions, sizeof(double), b * total, f) != b * total) {
      fprintf(stderr, "decode_dump: decode rc %d (%s) or cannot write %s\n", rc, nora_fast_last_error(), argv[7]);
      rc = 2;
    } else {
      size_t ok = 0;
      for (size_t i = 0; i < b; ++i) ok += status[i] == 0;
      printf("decoded %zu %zu %zu\n", b, b * total, ok);
    }
    if (f && fclose(f) != 0) rc = 2;
  }
  free(ids);
  free(lengths);
  free(actions);
  free(coeffs);
  free(status);
  free(pos);
  nora_fast_ctx_free(ctx);
  return rc;
}
